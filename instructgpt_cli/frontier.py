"""The reward-vs-KL frontier of a PPO run (``igpt eval ppo --checkpoints all``): which models it measures, and
the gold judge that tells over-optimisation from progress.

Gao et al. 2022 ("Scaling laws for reward model overoptimization") show the proxy reward model's score rising
with the KL to the initial policy while a gold reward peaks and falls: past the peak PPO exploits the proxy's
errors. Here each saved PPO checkpoint is a point: the SFT model (step 0, KL 0), every complete checkpoint in
``ppo/checkpoints/`` (or the steps listed), and ``ppo/final/policy`` (a checkpoint of the final step holds the
same weights and is left out). The gold is a second reward model (``--gold-rm PATH``), a Python function
(``--gold python:MODULE:FUNCTION``, one call per response) or a local LM judge (``--gold model:PATH``): a
pairwise judge gives no score, so its gold number is the win rate over the SFT model's response to the same
prompt (ties half; the SFT point is 0.5 by definition, not judged). Torch is not imported at module level.

Because a point of the frontier is a model a user then picks, this module also reads every model reference of
eval, compare and sample (:func:`model_or_checkpoint`): a stage, a directory, or a stage's checkpoint
(``ppo@step-N``, ``sft@step-N``, ``dpo@step-N``) loaded on the model that stage trained from.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, NamedTuple

from . import checkpoint, judges
from .errors import BadInput
from .presets import saved_config
from .rundir import (CHECKPOINT_PREFIX, STAGE_MODELS, complete_checkpoints, read_manifest, read_metrics, stage_model,
                     stored_path)
from .stats import WIN_VALUE, t_quantile, win_rate
from .storage import COMPLETED, weights_sha256


class Point(NamedTuple):
    """One model of the frontier: its label, PPO step, episodes (step x rollout_batch_size) and weights: a model
    directory, or a checkpoint folder (``checkpoint`` True) to load on the run's SFT model."""

    label: str
    step: int
    episodes: int
    path: Path
    checkpoint: bool = False


class PPORun(NamedTuple):
    """What a PPO run's checkpoints need to load as models: the SFT model it started from, its LoRA block."""

    sft: Path
    rm: Path  # the reward model PPO trained against: the frontier's proxy
    lora: Any  # config.LoraConfig
    points: list[Point]


def ppo_run(run_dir: Path, spec: str, named: str | None = None) -> PPORun:
    """The frontier's points of ``run_dir``'s PPO stage for ``--checkpoints spec`` (config.CHECKPOINTS_SPEC), oldest
    first, the SFT model first. BadInput, naming them as the user did (``named``, default ``--checkpoints SPEC``),
    when the run has no PPO stage, a listed step has no complete checkpoint, or there is no checkpoint at all."""
    named = named or f"--checkpoints {spec}"
    ppo = saved_config(run_dir / "ppo")
    entry = read_manifest(run_dir).get("stages", {}).get("ppo", {})
    if ppo is None or not entry:
        raise BadInput([f"{named}: {run_dir} has no PPO stage ({run_dir / 'ppo' / 'config.yaml'} missing); run igpt "
                        "ppo first"])
    inputs = entry.get("inputs", {})
    sft, rm = (stored_path(run_dir, inputs[k]["path"]) if isinstance(inputs.get(k), dict)
               else Path(getattr(ppo, k) or run_dir / f"{k}/final") for k in ("sft", "rm"))
    if not (sft / "config.json").is_file():
        raise BadInput([f"{named}: the SFT model PPO started from, {sft}, is gone; its checkpoints need it"])
    batch = ppo.rollout_batch_size
    episodes = {r["step"]: r["episode"] for r in read_metrics(run_dir / "ppo" / "metrics.jsonl") if "episode" in r}
    final = run_dir / "ppo" / "final" / "policy"
    final_step = entry.get("steps") if (final / "config.json").is_file() else None
    found = {int(p.name[len(CHECKPOINT_PREFIX):]): p for p in complete_checkpoints(run_dir / "ppo" / "checkpoints")}
    if not found:
        raise BadInput([f"{named}: {run_dir / 'ppo' / 'checkpoints'} holds no complete checkpoint; PPO "
                        "keeps the newest --keep-checkpoints (default 2) of those it saves every --save-every "
                        "iterations: for a frontier run it with e.g. --save-every 5 --keep-checkpoints 100"])
    steps = sorted(found) if spec == "all" else [int(s) for s in spec.split(",")]
    missing = [s for s in steps if s not in found and s != final_step]
    if missing:
        raise BadInput([f"{named}: no complete checkpoint of step {', '.join(map(str, missing))} in "
                        f"{run_dir / 'ppo' / 'checkpoints'} (there are: {', '.join(map(str, sorted(found)))})"])
    points = [Point("sft", 0, 0, sft)]
    points += [Point(f"step-{s}", s, episodes.get(s, s * batch), found[s], True) for s in sorted(set(steps))
               if s != final_step]
    if final_step is not None:
        points.append(Point(f"final (step {final_step})", final_step, episodes.get(final_step, final_step * batch),
                            final))
    lora = ppo.lora
    recorded = (inputs.get("sft") or {}).get("sha256") if isinstance(inputs.get("sft"), dict) else None
    if lora.enabled and recorded and weights_sha256(sft) != recorded:  # adapters on other base weights: wrong model
        raise BadInput([f"{named}: {sft} was retrained after PPO ran (its weights differ from those PPO "
                        "recorded); the LoRA checkpoints adapt the old weights"])
    return PPORun(sft, rm, lora, points)


class Side(NamedTuple):
    """A model a command reads (:func:`model_or_checkpoint`): its short name (its report's folder name), its weights
    (a model directory, a model name, or a checkpoint folder), the model it loads on (its config and tokenizer: the
    same directory, or the stage's base model under a checkpoint) and, for a checkpoint, its stage's LoRA block and
    the prefix of the trained weights it reads (``checkpoint.POLICY`` for PPO, '' for sft and dpo)."""

    name: str
    path: Path
    base: Path
    lora: Any = None  # config.LoraConfig of the checkpoint's stage
    prefix: str | None = None  # None: ``path`` is a model (directory or name), not a checkpoint
    base_seed: int | None = None  # a base named ``tiny`` is random: the seed its stage built it with

    def load(self, tokenizer: Any, device: Any, dtype: str, seed: int) -> Any:
        """The model, in eval mode: a checkpoint as its step's weights on the base (``models.load_trained_policy``)."""
        from .config import ModelConfig
        from .models import load_model, load_trained_policy, model_path

        if self.prefix is not None:
            return load_trained_policy(self.path, self.base, self.lora, tokenizer, device, dtype,
                                       seed if self.base_seed is None else self.base_seed, self.prefix)
        return load_model(ModelConfig(name=str(self.path), dtype=dtype), tokenizer, model_path(str(self.path)),
                          device, seed).eval()


# ``STAGE@step-N`` (or ``STAGE@N``): the weights a stage had after iteration N, from its checkpoint
CHECKPOINT_REF = re.compile(r"(sft|ppo|dpo)@(?:step-)?(\d+)")


def model_or_checkpoint(spec: str, run_dir: Path, flag: str) -> Side:
    """The one reading of a model reference, shared by eval, compare and sample: a stage of the run (``sft``,
    ``ppo``, ``dpo``, ``ppo_ema``: ``rundir.stage_model``), a model directory, a model name (``tiny``,
    ``smollm2-135m``), a stage's checkpoint ``sft@step-N`` / ``ppo@step-N`` / ``dpo@step-N`` (the weights after
    iteration N: the final model when N is the stage's last step), or a checkpoint folder given as a path
    (``RUN/ppo/checkpoints/step-000040``, read as ``ppo@step-40`` of its own run). The model must be a causal LM
    (``models.require_role``), checked before any weights load. BadInput when there is no such model."""
    from .models import SMOLLM2, TINY, require_role

    match = CHECKPOINT_REF.fullmatch(spec)
    folder = Path(spec)
    if match is None and folder.parent.name == "checkpoints" and folder.parent.parent.name in ("sft", "ppo", "dpo") \
            and folder.name.startswith(CHECKPOINT_PREFIX) and (folder / COMPLETED).is_file():
        run_dir = folder.parent.parent.parent
        match = CHECKPOINT_REF.fullmatch(f"{folder.parent.parent.name}@{int(folder.name[len(CHECKPOINT_PREFIX):])}")
    if match is None:
        if "@" in spec and not folder.exists():
            stage = spec.split("@")[0]
            raise BadInput([f"{flag} {spec}: a {stage.upper()} checkpoint is {stage}@step-N (or {stage}@N), N an "
                            "iteration it saved" if stage in ("sft", "ppo", "dpo") else
                            f"{flag} {spec}: a checkpoint is sft@step-N, ppo@step-N or dpo@step-N"])
        if spec in (TINY, SMOLLM2):
            return Side(spec, Path(spec), Path(spec))
        name, path = stage_model(spec, run_dir, flag)
        require_role(path, "policy", flag)
        return Side(name, path, path)
    stage, step = match.group(1), int(match.group(2))
    named = f"{flag} {spec}"
    last = read_manifest(run_dir).get("stages", {}).get(stage, {}).get("steps")
    if step == last and (run_dir / STAGE_MODELS[stage] / "config.json").is_file():
        name, path = stage_model(stage, run_dir, flag)  # the final model, whether or not its checkpoint was kept
        return Side(name, path, path)
    if stage == "ppo":
        run = ppo_run(run_dir, str(step), named)
        ckpt, base, lora, seed = next(p for p in run.points[1:] if p.step == step).path, run.sft, run.lora, None
    else:
        ckpt, base, lora, seed = stage_checkpoint(run_dir, stage, step, named)
    checkpoint.require_whole(ckpt, named)  # before anything runs, not when another model has sampled
    return Side(f"{stage}-step-{step}", ckpt, base, lora, checkpoint.POLICY if stage == "ppo" else "", seed)


def model_refs(specs: dict[str, str], run_dir: Path) -> list[Side]:
    """Each model reference of ``{flag: spec}`` read by :func:`model_or_checkpoint`, in order; every bad one in
    one BadInput, so a command that names two models learns of both at once."""
    sides, errors = [], []
    for flag, spec in specs.items():
        try:
            sides.append(model_or_checkpoint(spec, run_dir, flag))
        except BadInput as e:
            errors += e.messages
    if errors:
        raise BadInput(errors)
    return sides


def stage_checkpoint(run_dir: Path, stage: str, step: int, named: str) -> tuple[Path, Path, Any, int | None]:
    """sft's or dpo's complete checkpoint of ``step``, the model that stage trained from (a directory, or a
    model name such as ``tiny``), its LoRA block and, for a named base, the seed it was built with. BadInput,
    ``named`` as the user named it, when the stage has not run, has no such checkpoint, or its base model is gone
    or (under LoRA) retrained since."""
    cfg = saved_config(run_dir / stage)
    source = read_manifest(run_dir).get("stages", {}).get(stage, {}).get("inputs", {}).get(
        "model" if stage == "sft" else "sft")
    if cfg is None or source is None:
        raise BadInput([f"{named}: {run_dir} has no {stage} stage; run igpt {stage} first"])
    found = {int(p.name[len(CHECKPOINT_PREFIX):]): p for p in complete_checkpoints(run_dir / stage / "checkpoints")}
    if step not in found:
        raise BadInput([f"{named}: no complete checkpoint of step {step} in {run_dir / stage / 'checkpoints'} (there "
                        f"are: {', '.join(map(str, sorted(found))) or 'none'})"])
    if not isinstance(source, dict):
        return found[step], Path(source), cfg.lora, cfg.seed  # a model name: built again as the stage built it
    base = stored_path(run_dir, source["path"])
    if not (base / "config.json").is_file():
        raise BadInput([f"{named}: the model {stage} started from, {base}, is gone; its checkpoints need it"])
    if cfg.lora.enabled and weights_sha256(base) != source.get("sha256"):  # adapters on other weights: wrong model
        raise BadInput([f"{named}: {base} was retrained after {stage} ran; the LoRA checkpoints adapt the old weights"])
    return found[step], base, cfg.lora, None


def mean_sd(xs: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample sd (n - 1) of ``xs``; None where undefined (no item; one item's sd)."""
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None)


class Gold:
    """The gold judge of the frontier: ``kind`` 'score' (a reward model or a Python function: a number per
    response, summarised as mean and sd) or 'win rate' (a pairwise LM judge: each response against the SFT
    model's to the same prompt, summarised as the win rate with its 95% Wilson interval)."""

    def __init__(self, name: str, kind: str, judge: Any = None, rm_path: Path | None = None):
        self.name, self.kind, self.judge, self.rm_path, self.rm = name, kind, judge, rm_path, None

    def score(self, prompts: list, queries: list, responses: list, texts: list[str], sft_texts: list[str] | None,
              tokenizer: Any, load_rm: Any, batch_size: int) -> tuple[list, dict]:
        """Per response: the gold value (a score, or the pairwise winner 'A' / 'B' / 'tie' against the SFT
        response); and the summary {gold_mean, gold_sd} or {gold_mean (the win rate), gold_ci, gold_n}.
        ``sft_texts`` None: these are the SFT model's own responses (win rate 0.5 by definition)."""
        if self.kind == "win rate":
            if sft_texts is None:
                return ["tie"] * len(texts), {"gold_mean": 0.5, "gold_ci": None, "gold_n": 0}
            pairs = [{"prompt": p.prompt, "a": t, "b": s} for p, t, s in zip(prompts, texts, sft_texts)]
            won = [j["winner"] for j in self.judge.compare(pairs)]
            r = win_rate(won.count("A"), won.count("tie"), won.count("B"))
            return won, {"gold_mean": r["win_rate"], "gold_ci": [r["ci_low"], r["ci_high"]], "gold_n": r["n"]}
        if self.rm_path is not None:
            from .rollout import score_responses

            self.rm = self.rm or load_rm(self.rm_path)
            values = score_responses(self.rm, tokenizer, queries, responses, batch_size).tolist()
        else:
            values = [self.judge.scores(p.prompt, [t], f"prompt {i + 1}")[0]
                      for i, (p, t) in enumerate(zip(prompts, texts))]
        m, sd = mean_sd(values)
        return values, {"gold_mean": m, "gold_sd": sd}


def load_gold(gold: str, gold_rm: str, settings: judges.Settings) -> Gold | None:
    """The gold judge of ``--gold`` / ``--gold-rm`` (at most one), checked before any model loads; None without."""
    if gold and gold_rm:
        raise BadInput([f"--gold {gold} and --gold-rm {gold_rm}: give one gold judge"])
    if gold_rm:
        if not (Path(gold_rm) / "config.json").is_file():
            raise BadInput([f"--gold-rm {gold_rm}: not a model directory with config.json"])
        from .models import require_role

        require_role(gold_rm, "reward", "--gold-rm")
        return Gold(f"rm:{gold_rm}", "score", rm_path=Path(gold_rm))
    if not gold:
        return None
    judge = judges.load(gold, settings)
    return Gold(gold, "win rate" if gold.startswith("model:") else "score", judge=judge)


def best(points: list[dict], key: str) -> str | None:
    """The label of the point with the highest ``key`` (the earliest of equal ones); None if none has it."""
    scored = [p for p in points if p.get(key) is not None]
    return max(scored, key=lambda p: p[key])["label"] if scored else None


def gold_drop(points: list[dict], best_gold: str | None, best_proxy: str | None, values: dict[str, list],
              groups: list | None = None) -> dict | None:
    """How far the gold fell from its best point to the proxy's pick, where the pick is a later point (so the
    proxy rose past the gold's peak), with a 95% interval; None where there is no such pair.

    ``values``: each point's per-prompt gold (scores, or a pairwise judge's 'A' / 'tie' / 'B' against the SFT
    response, 1 / 0.5 / 0), the same prompts in the same order at every point. The drop is the mean of the
    per-prompt differences best - pick (paired: a prompt's difficulty cancels), its interval Student's t on
    their sd (n - 1). ``significant``, the frontier's over-optimisation, only when the interval lies above 0:
    two points' means differ by chance by about their sd / sqrt(n), and on a few dozen prompts a drop of that
    size is noise (Gao et al. 2022 read the fall over many points of a curve). The interval does not allow
    for the best gold point being the maximum of several noisy ones (it errs towards a drop).

    ``groups``: each prompt's ``group`` (prompts framed from one message share one). Where every prompt has
    one, the differences are averaged within each group first and the drop and its interval are taken over the
    group means (n - 1 = groups - 1): prompts of one message move together, so counting them as independent
    would make the interval too narrow. With groups of one size (the gold prompts: 4 framings each) the drop is
    the mean over prompts as before; with unequal ones each group weighs alike."""
    step = {p["label"]: p["step"] for p in points}
    if best_gold is None or best_proxy is None or step[best_proxy] <= step[best_gold]:
        return None
    proxy = {p["label"]: p["score_mean"] for p in points}
    if not proxy[best_proxy] > proxy[best_gold]:  # the earliest of equal proxies is its pick: never here
        return None
    a, b = ([WIN_VALUE.get(v, v) if isinstance(v, str) else v for v in values[k]] for k in (best_gold, best_proxy))
    diffs = [x - y for x, y in zip(a, b)]
    units = diffs
    if groups and all(g is not None for g in groups):
        by_group: dict = {}
        for g, d in zip(groups, diffs):
            by_group.setdefault(g, []).append(d)
        units = [sum(v) / len(v) for v in by_group.values()]
    n = len(units)
    m, sd = mean_sd(units)
    out = {"from": best_gold, "to": best_proxy, "n": len(diffs), "clusters": n if units is not diffs else None,
           "drop": m, "ci": None, "significant": False}
    if n >= 2:
        half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
        out.update(ci=[m - half, m + half], significant=m - half > 0)
    return out


def show(report: dict, out: Path) -> None:
    """The frontier as a table: one row per point, the best gold marked *, the proxy's pick marked ^."""
    from rich.table import Table

    from .console import console
    from .report import drop_text, number, temperatures_text

    gold = report.get("gold")
    table = Table(title=f"igpt eval ppo --checkpoints  ({out / 'report.json'})", title_justify="left")
    cols = ["model", "episodes", f"KL to SFT (T={report['kl_temperature']:g})", "proxy RM score"]
    cols += [f"gold ({'win rate vs sft' if report['gold_kind'] == 'win rate' else gold})"] if gold else []
    for col in cols + ["length", "EOS rate", ""]:
        table.add_column(col, justify="left" if col == "model" else "right")
    for p in report["points"]:
        marks = ("*" if p["label"] == report.get("best_gold") else "") + ("^" if p["label"] == report["best_proxy"]
                                                                         else "")
        cells = [p["label"], str(p["episodes"]), number(p["kl_to_sft"], ".3f"), number(p.get("score_mean"), ".3f")]
        cells += [number(p.get("gold_mean"), ".3f")] if gold else []
        table.add_row(*cells, number(p["response_length"], ".1f"), number(p["eos_rate"], ".0%"), marks)
    console().print(table)
    console().print(temperatures_text(report))
    if gold:
        console().print(f"* best gold: {report['best_gold']}; ^ the proxy would pick: {report['best_proxy']}")
        if report.get("gold_drop"):
            console().print(drop_text(report["gold_drop"]))
