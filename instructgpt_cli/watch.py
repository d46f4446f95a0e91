"""``igpt ppo --watch JUDGE``: over-optimisation watched while PPO runs, not audited afterwards.

Gao et al. 2022 show the shape: as the policy moves away from SFT (d = sqrt(KL) grows) the proxy reward model's
score keeps rising while a gold judge's rises, peaks and falls. Every ``--watch-every`` iterations, and once
before the first (the SFT point), the watch samples the validation prompts (``--watch-prompts``) at a fixed
seed with the policy as it stands, and measures the proxy RM's mean score, the gold judge's (with its 95%
interval), the KL to SFT at PPO's temperature and the response length. It uses PPO's own models and sampler
(no second copy of the policy, reference or RM in memory: a gold reward model is the one model it loads) and
draws from its own random stream, so a watched run trains exactly as an unwatched one.

Whenever the gold beats its best so far the policy is saved as ``ppo/best/`` (a plain HF directory like
``final/policy``, sealed; its step and figures in the manifest; ``ppo@best`` names it). With
``--watch-patience P`` the run ends, as a normal finish, once the gold has not beaten its best for P watches
while the proxy rose (``overopt.should_stop``; ``--watch-significance``: only when the drop is also beyond the
gold's noise). Every point is kept in the PPO state (a resumed run restores the best so far and the patience
count exactly) and in ``ppo/watch.json`` with Gao et al.'s fit over the points (``overopt.gao_fit``).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import distributed, overopt
from .batches import render_queries
from .console import say
from .data import read_prompts
from .errors import BadInput
from .frontier import Gold, load_gold, mean_sd
from .judges import Settings
from .report import number
from .rollout import decode_response, kl_and_scores, score_responses
from .stats import mean_interval

WATCH_SEED_OFFSET = 7_919  # the watch's own random stream: cfg.seed + this, the same at every watch


@dataclass
class WatchRecord:
    """What a resume needs of the watch (saved in every PPO checkpoint): each point, the stop rule's state, the
    newest point's per-prompt gold values (the significance rule compares them with the best's) and the SFT
    point's responses (a pairwise judge's reference)."""

    points: list[dict] = field(default_factory=list)
    state: Any = None  # overopt.WatchState: the best point (its per-prompt gold too) and the patience count
    last_values: list[float] = field(default_factory=list)  # the newest point's, per prompt
    sft_texts: list[str] | None = None  # the SFT point's responses: a pairwise judge compares each with them
    stopped: str | None = None  # why the stop rule ended the run: a resumed run finishes without training on

    def to_dict(self) -> dict:
        return {"points": self.points, "state": self.state.to_dict() if self.state is not None else None,
                "last_values": self.last_values, "sft_texts": self.sft_texts, "stopped": self.stopped}

    @classmethod
    def from_dict(cls, d: dict | None) -> "WatchRecord":
        if not d:
            return cls()
        return cls(d["points"], overopt.WatchState.from_dict(d["state"]) if d["state"] else None, d["last_values"],
                   d["sft_texts"], d.get("stopped"))


def proxy_and_kl(models: Any, tokenizer: Any, queries: list[list[int]], responses: list[list[int]],
                 temperature: float, batch_size: int, step: int) -> tuple[list[float], list[float]]:
    """The proxy reward model's score and the KL to SFT at PPO's temperature of each response (0 at the SFT
    point, step 0, where the policy is the SFT model): the three models' lowest layers run once where they hold
    the same ones (``rollout.kl_and_scores``; PPO's presets train all three from one base with LoRA on the top
    layers)."""
    if step == 0:
        scores = score_responses(models.reward, tokenizer, queries, responses, batch_size)
        return scores.tolist(), [0.0] * len(responses)
    kl, proxy = kl_and_scores(models.policy, models.reference, models.reward, tokenizer, queries, responses,
                              temperature, batch_size)
    return proxy.tolist(), kl.tolist()


def judge_spec(spec: str) -> tuple[str, str]:
    """``--watch``'s judge as (gold, gold_rm) for ``frontier.load_gold``: rm:PATH is a reward model."""
    return ("", spec[3:]) if spec.startswith("rm:") else (spec, "")


class Watch:
    """The watch of one PPO run: its prompts (rendered as PPO renders its own), the gold judge, what it has
    recorded so far."""

    def __init__(self, cfg: Any, tokenizer: Any, context: int | None, run_dir: Path, sft_path: Path):
        if cfg.watch_every < 1:
            raise BadInput([f"--watch-every {cfg.watch_every}: must be >= 1 (iterations)"])
        if not cfg.watch_prompts:
            raise BadInput(["--watch-prompts: required with --watch (validation prompts, never trained on)"])
        self.cfg, self.tokenizer = cfg, tokenizer
        self.prompts = read_prompts(cfg.watch_prompts)
        gold, gold_rm = judge_spec(cfg.watch)
        try:
            self.gold: Gold = load_gold(gold, gold_rm, Settings(2 * cfg.optim.batch_size, cfg.device, cfg.model.dtype,
                                                                0.0, cfg.seed), run_dir)
        except BadInput as e:  # the frontier's and compare's flags named in the judge's messages are --watch here
            raise BadInput([m.replace("--gold-rm ", "--watch rm:").replace("--gold", "--watch")
                            .replace("--judge", "--watch") for m in e.messages])
        if self.gold.rm_path is not None:  # a gold reward model reads the policy's tokens, prompt and response
            from .models import position_limit, require_same_tokenizer

            require_same_tokenizer(tokenizer, sft_path, {"--watch rm:": self.gold.rm_path},
                                   "the gold reward model must read the policy's tokens")
            context = min(filter(None, [context, position_limit(str(self.gold.rm_path))]), default=None)
        self.queries = render_queries(tokenizer, self.prompts, cfg.max_new_tokens, context)
        self.record = WatchRecord()

    def due(self, step: int, total: int) -> bool:
        """Whether the watch runs after ``step`` iterations: before the first, every watch_every, after the last."""
        return step == 0 or step % self.cfg.watch_every == 0 or step == total

    def measure(self, models: Any, step: int, save_best: Any, tell: Any = say) -> dict:
        """Watch the policy after ``step`` iterations: sample, score with the proxy and the gold, KL to SFT;
        update the best point (``save_best(point)`` writes ppo/best/ when this one is better) and the stop
        rule's state, and ``tell`` the point in one line. Returns the ``watch/`` metrics of this point."""
        cfg, tok = self.cfg, self.tokenizer
        t0 = time.perf_counter()
        batch = 2 * cfg.optim.batch_size
        with torch.random.fork_rng(devices=[models.policy.device] if models.policy.device.type == "cuda" else []):
            torch.manual_seed(cfg.seed + WATCH_SEED_OFFSET)  # PPO's own stream is left as it was
            responses = models.policy.generate(tok, self.queries, cfg.max_new_tokens, cfg.temperature, batch)
        proxy, kl = proxy_and_kl(models, tok, self.queries, responses, cfg.temperature, batch, step)
        texts = [decode_response(tok, r) for r in responses]
        # the SFT point (step 0): a pairwise judge's win rate over the SFT model's own responses is 0.5
        values, summary = self.gold.score(self.prompts, self.queries, responses, texts,
                                          None if step == 0 else self.record.sft_texts, tok,
                                          self.gold_rm_loader(models), batch)
        if step == 0:
            self.record.sft_texts = texts
        # per prompt, or per group where the prompts have one (framings of one message move together: counting
        # them as independent would make the interval, and the stop rule's paired one, too narrow)
        numeric = by_group([{"A": 1.0, "tie": 0.5, "B": 0.0}[v] if isinstance(v, str) else float(v) for v in values],
                           [p.group for p in self.prompts])
        point = {"step": step, "proxy": overopt.finite(mean(proxy)), "gold": overopt.finite(summary["gold_mean"]),
                 "gold_ci": summary.get("gold_ci") or t_interval(numeric), "kl": overopt.finite(mean(kl)),
                 "length": mean([len(r) for r in responses]), "words": mean([len(t.split()) for t in texts]),
                 "seconds": 0.0}
        better = False
        if point["gold"] is not None and point["proxy"] is not None:  # a NaN score is no point to keep or compare
            self.record.state, better = overopt.update(self.record.state or overopt.WatchState(), step,
                                                       point["proxy"], point["gold"], point["gold_ci"], numeric)
            self.record.last_values = numeric
        # every rank decides as one (under torchrun a sharded policy is gathered for best/ on all of them)
        better = bool(distributed.max_over_ranks(int(better)))
        point["best"] = better
        if better:
            save_best(point)
        point["seconds"] = time.perf_counter() - t0
        self.record.points.append(point)
        best = self.record.state
        kept = (" (new best)" if better else "" if best is None or best.best_gold is None
                else f" (best {best.best_gold:.3f} at {best.best_iteration})")
        tell(f"watch after iteration {step}: gold {number(point['gold'], '.3f')}{ci_text(point['gold_ci'])}{kept}, "
             f"proxy {number(point['proxy'], '.3f')}, KL {number(point['kl'], '.3f')}, {point['words']:.1f} words, "
             f"{point['seconds']:.1f}s")
        return {"watch/proxy": point["proxy"], "watch/gold": point["gold"],
                "watch/gold_ci_low": point["gold_ci"][0] if point["gold_ci"] else None,
                "watch/gold_ci_high": point["gold_ci"][1] if point["gold_ci"] else None,
                "watch/kl": point["kl"], "watch/response_length": point["length"], "watch/seconds": point["seconds"]}

    def gold_rm_loader(self, models: Any) -> Any:
        """How the gold judge loads a gold reward model (once, kept on the judge)."""
        from .config import ModelConfig
        from .models import load_model
        from .runners import Runner

        def load(path: Path) -> Runner:
            m = load_model(ModelConfig(name=str(path), dtype=self.cfg.model.dtype), self.tokenizer, path,
                           models.policy.device, self.cfg.seed, "reward")
            return Runner.for_eval(m.eval())
        return load

    def stop_reason(self) -> str | None:
        """Why the run should end after the newest watch (``--watch-patience``), or None; every rank takes rank
        0's decision. Kept in the record, so a run stopped or killed on its way to the finish resumes to it."""
        reason = None
        if self.cfg.watch_patience and self.record.state is not None:
            reason = overopt.should_stop(self.record.state, self.cfg.watch_patience, self.cfg.watch_significance,
                                         self.record.state.best_values, self.record.last_values)
        self.record.stopped = distributed.broadcast(reason)
        return self.record.stopped

    def summary(self) -> dict:
        """ppo/watch.json: every point, the best, and Gao et al.'s fit of gold against sqrt(KL)."""
        pts = self.record.points
        fit = overopt.gao_fit([p["kl"] for p in pts], [p["gold"] for p in pts]) if pts else None
        best = self.record.state
        return {"judge": self.cfg.watch, "gold_kind": self.gold.kind, "prompts": self.cfg.watch_prompts,
                "every": self.cfg.watch_every, "points": pts, "fit": fit,
                "best": None if best is None else {"step": best.best_iteration, "gold": best.best_gold}}

    def write(self, stage_dir: Path) -> None:
        """ppo/watch.json (:meth:`summary`), written by rank 0."""
        from .storage import atomic_write_text

        if distributed.is_main():
            atomic_write_text(stage_dir / "watch.json",
                              json.dumps(self.summary(), indent=2, allow_nan=False) + "\n")


def mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def by_group(values: list[float], groups: list) -> list[float]:
    """``values`` (one per prompt) as the mean of each group, in order of first appearance, where every prompt has
    a ``group``; else as they are (each prompt its own)."""
    if not groups or any(g is None for g in groups):
        return values
    members: dict = {}
    for g, v in zip(groups, values):
        members.setdefault(g, []).append(v)
    return [sum(vs) / len(vs) for vs in members.values()]


def t_interval(xs: list[float]) -> list[float] | None:
    """The 95% t-interval of the mean of ``xs``; None for fewer than 2."""
    return mean_interval(*mean_sd(xs), len(xs))


def ci_text(ci: list[float] | None) -> str:
    return "" if not ci else f" [{ci[0]:.3f}, {ci[1]:.3f}]"
