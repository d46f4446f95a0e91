"""Step 2 of InstructGPT: a reward model from labelers' rankings of K responses per prompt.

Each of the K responses of a prompt goes through the model once; all C(K,2) pairs (ties skipped) give
-log sigmoid(r_better - r_worse), averaged per prompt (the paper's 1/C(K,2)), so a ranking costs K
forwards instead of the 2*C(K,2) of pairwise tools (its prompt runs once for all K: ``Layout.shared``),
and a prompt's pairs never leave its batch element (the paper: shuffling pairs across the data set makes
the RM overfit in one pass). After training a bias is set so the demonstrations score mean 0, as the
paper does before RL (Ouyang et al. 2022, sec. 3.5, appendix C.2: 1 epoch, cosine schedule to 10%, batch
64 prompts).
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch

from .. import distributed
from ..config import ModelConfig, RMConfig
from ..batches import RankedGroup, hold_out, tokenize_rankings, tokenize_scored
from ..data import read_demos, read_rankings
from ..distributed import resolve_device
from ..console import banner, model_rows, processes_note, say
from ..errors import BadInput
from ..families import backbone, frozen_layers, supports_packing, supports_sharing, unwrapped
from ..forward import REWARD_BIAS, REWARD_POOL, TRANSFORMERS
from ..losses import ranking_loss
from ..models import apply_lora, context_window, load_model, load_tokenizer, require_role, save_final, stage_inputs
from ..rewards import (ENSEMBLE, MEMBERS, REWARD_STATS, FrozenStates, Layout, frozen_states_bytes,
                       frozen_weights_key)
from ..runners import Runner
from ..rundir import Stage, file_input, model_input, read_manifest, stored_path
from ..stats import describe_rm_accuracy, rm_accuracy
from ..lifecycle import begin_stage, finish_stage, open_stage
from ..storage import atomic_write_text, building
from ..checkpoint import restore
from ..train import (HeldOut, Session, TrainState, build_optimizer, build_scheduler, micro_batches, plan_steps,
                     step_chunks)

STAGE = "rm"
TRIALS, SWEEP = "trials", "sweep.json"  # train-rm --sweep: the trials' run directories under rm/, their results
# --sweep's keys: the setting each one sets, and how its values are read
SWEEP_KEYS = {"lr": ("optim.lr", float), "epochs": ("epochs", int), "weight_decay": ("optim.weight_decay", float),
              "lora_r": ("lora.r", int), "lora_layers": ("lora.layers", int)}


def parse_sweep(spec: str) -> list[dict]:
    """``lr=1e-4,3e-4,epochs=1,2`` (commas, semicolons or spaces between items; a value without ``=`` is one more
    of the key before it) as its grid, every combination in order: [{"lr": 1e-4, "epochs": 1}, ...]; [] for ""."""
    import itertools
    import math
    import re

    values: dict[str, list] = {}
    key = None
    for item in filter(None, re.split(r"[,;\s]+", spec.strip())):
        if "=" in item:
            key, item = item.split("=", 1)
            if key not in SWEEP_KEYS:
                raise BadInput([f"--sweep {spec}: {key}: not a setting it can sweep ({', '.join(SWEEP_KEYS)})"])
            if key in values:
                raise BadInput([f"--sweep {spec}: {key}: given twice"])
            values[key] = []
            if not item:  # KEY= with its values after the next separator, or none
                continue
        if key is None:
            raise BadInput([f"--sweep {spec}: {item}: a value before any KEY= (e.g. lr=1e-4,3e-4,epochs=1,2)"])
        try:
            value = SWEEP_KEYS[key][1](item)
        except ValueError:
            kind = "an integer" if SWEEP_KEYS[key][1] is int else "a number"
            raise BadInput([f"--sweep {spec}: {key}={item}: not {kind}"]) from None
        if not math.isfinite(value) or not (value > 0 or key in ("weight_decay", "lora_layers") and value == 0):
            raise BadInput([f"--sweep {spec}: {key}={item}: must be > 0" + (" (or 0)" if key in ("weight_decay",
                            "lora_layers") else "")])
        values[key].append(value)
    if any(not v for v in values.values()):
        raise BadInput([f"--sweep {spec}: {', '.join(k for k, v in values.items() if not v)}: no value"])
    return [dict(zip(values, combo)) for combo in itertools.product(*values.values())] if values else []


def with_settings(cfg: RMConfig, settings: dict) -> RMConfig:
    """``cfg`` with a sweep trial's settings (keys of :data:`SWEEP_KEYS`)."""
    for key, value in settings.items():
        path = SWEEP_KEYS[key][0].split(".")
        if len(path) == 1:
            cfg = replace(cfg, **{path[0]: value})
        else:
            cfg = replace(cfg, **{path[0]: replace(getattr(cfg, path[0]), **{path[1]: value})})
    return cfg


def choose_trial(trials: list[dict]) -> dict:
    """The trial of highest held-out accuracy, then lowest held-out loss, then the first."""
    return min(trials, key=lambda t: (-(t["accuracy"] if t["accuracy"] is not None else -1.0),
                                      t["loss"] if t["loss"] is not None else float("inf"), t["trial"]))


def trial_name(settings: dict) -> str:
    """A trial's directory under rm/trials/, named by its settings (lr-0.0003_epochs-2): a resume with another grid
    finds each finished trial by what it trained with, never by its place in the grid."""
    return "_".join(f"{k}-{v:g}" for k, v in settings.items())


def describe_settings(trial: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in trial["settings"].items())


def rank_forward(runner: Runner, groups: list[RankedGroup], pad_id: int, device: torch.device,
                 layout: Layout = Layout(), frozen: FrozenStates | None = None):
    """Score every response of ``groups`` in one forward pass; returns (per-prompt losses, per-pair
    correctness, the sequences' tokens). One ranking of K responses costs at most K sequence forwards, and
    fewer with ``layout.shared``: the prompt runs once and each response attends to it and to itself (where
    that saves a tenth of the tokens); else, with ``layout.packed``, the sequences run end to end in one row
    (where padding would waste a tenth), else as K padded rows. ``frozen``: the frozen layers' kept output
    (:func:`frozen_states`), so that only the layers above run."""
    rankings = [g.sequences for g in groups]
    scores = runner.ranking_scores(rankings, pad_id, layout, starts=[s for g in groups for s in g.starts()],
                                   frozen=frozen)
    losses, correct = grouped_ranking_loss(scores, groups, device)
    return losses, correct, sum(len(q) for ranking in rankings for q in ranking)


def grouped_ranking_loss(rewards: torch.Tensor, groups: list[RankedGroup], device: torch.device):
    """:func:`losses.ranking_loss` of ``rewards`` (N,), every response of ``groups`` in order: (per-prompt losses,
    per-pair correctness)."""
    better, worse, group, offset = [], [], [], 0
    for gi, g in enumerate(groups):
        for b, w in g.pairs:
            better.append(offset + b)
            worse.append(offset + w)
            group.append(gi)
        offset += len(g.sequences)
    as_index = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return ranking_loss(rewards, as_index(better), as_index(worse), as_index(group), len(groups))


@torch.no_grad()
def ensemble_accuracy(sources: list, groups: list[RankedGroup], cfg: RMConfig, model_cfg: ModelConfig, tokenizer,
                      device: torch.device) -> dict:
    """The held-out pairwise accuracy of the mean score of an ensemble's members (each a trained model's runner,
    or a final/ directory loaded in turn), with its interval clustered by ranking (``stats.rm_accuracy``):
    whether the ensemble ranks better than its members alone. Every rank scores every ranking."""
    total = torch.zeros(sum(len(g.sequences) for g in groups), dtype=torch.float64)
    for source in sources:
        model = (None if isinstance(source, Runner) else
                 load_model(ModelConfig(**{**vars(model_cfg), "name": str(source)}), tokenizer, source, device, 0,
                            kind="reward").eval())
        runner = source if model is None else Runner(model, device, False, trainable=False)
        layout = Layout(shared=cfg.share_prompts and supports_sharing(runner.model),
                        packed=cfg.padding_free and supports_packing(runner.model))
        runner.eval()
        total += torch.cat([runner.ranking_scores([g.sequences for g in chunk], tokenizer.pad_token_id, layout,
                                                  starts=[s for g in chunk for s in g.starts()]).cpu()
                            for chunk in micro_batches(groups, cfg.optim.batch_size)]).double()
        del runner, model
    _, correct = grouped_ranking_loss(total / len(sources), groups, torch.device("cpu"))
    sizes = [len(g.pairs) for g in groups]
    return rm_accuracy([round(c.sum().item()) for c in correct.split(sizes)], sizes)


def train_step(runner: Runner, state: TrainState, chunks: list[list[RankedGroup]], pad_id: int, layout: Layout,
               device: torch.device, grad_clip: float, frozen: FrozenStates | None = None) -> dict:
    """One optimizer step over micro-batches of prompts (every rank passes all of the step's and trains on
    its share); the loss is the mean over all prompts of the step."""
    n_prompts = sum(len(c) for c in chunks)
    scale = distributed.world_size()  # DDP and FSDP average gradients over ranks; the loss wants their sum
    mine = distributed.rank_chunks(chunks)
    loss_total, correct_total, pairs, tokens = 0.0, 0.0, 0, 0
    for j, (chunk, weight) in enumerate(mine):
        with runner.syncing(j == len(mine) - 1):
            losses, correct, n_tokens = rank_forward(runner, chunk, pad_id, device, layout, frozen)
            (losses.sum() / n_prompts * (scale * weight)).backward()
        if weight:
            loss_total += losses.sum().item()
            correct_total += correct.sum().item()
            pairs += correct.numel()
            tokens += n_tokens
    local_loss = loss_total if distributed.world_size() == 1 else None  # ranks agree on the norm; not on a loss
    grad_norm = state.optimizer_step(grad_clip, local_loss)
    sums = distributed.reduce_metrics({"loss": loss_total, "correct": correct_total, "pairs": pairs, "tokens": tokens},
                                      sums=("loss", "correct", "pairs", "tokens"))
    return {"train/loss": sums["loss"] / n_prompts, "train/accuracy": sums["correct"] / max(sums["pairs"], 1),
            "train/grad_norm": grad_norm, "train/tokens": sums["tokens"], "train/comparisons": sums["pairs"]}


@torch.no_grad()
def evaluate(runner: Runner, groups: list[RankedGroup], batch_size: int, pad_id: int, layout: Layout,
             device: torch.device, frozen: FrozenStates | None = None) -> dict:
    """Held-out K-wise loss (mean per prompt) and pairwise accuracy (over all pairs) with its 95% interval
    (``stats.rm_accuracy``); each rank scores its share of the micro-batches."""
    runner.eval()
    loss_total, counts = 0.0, []  # counts: (correct pairs, pairs) of each held-out ranking
    for chunk, weight in distributed.rank_chunks(micro_batches(groups, batch_size)):
        losses, correct, _ = rank_forward(runner, chunk, pad_id, device, layout, frozen)
        if weight:  # a weight-0 chunk only keeps the ranks in step
            loss_total += losses.sum().item()
            sizes = [len(g.pairs) for g in chunk]
            counts += [(round(c.sum().item()), n) for c, n in zip(correct.split(sizes), sizes)]
    runner.train()
    loss = distributed.reduce_metrics({"loss": loss_total}, sums=("loss",))["loss"]
    counts = [c for part in distributed.gather(counts) for c in part]
    # accuracy with its 95% interval clustered by ranking (pairs of one prompt are not independent)
    accuracy = rm_accuracy([c for c, _ in counts], [n for _, n in counts])
    return {"eval/loss": loss / max(len(groups), 1), **{f"eval/{k}": v for k, v in accuracy.items()}}


def frozen_states(cfg: RMConfig, model, data: Rankings, layout: Layout,
                  kept: dict[tuple, FrozenStates]) -> tuple[FrozenStates | None, str]:
    """The kept output of ``model``'s frozen layers (``rewards.FrozenStates``) for this run's rankings, and a
    banner line that says so or why not. ``kept`` holds them for every model the stage trains, by the frozen
    layers' number and weights (``rewards.frozen_weights_key``): an ensemble's members and a sweep's trials
    initialised from one model share them (a randomly initialised model of another seed does not).
    None where nothing is frozen (no LoRA, LoRA on every layer), ``--frozen-cache-gib 0``, sharded weights, the
    frozen layers drop out in training (their output would differ every step), or the states would need more
    memory than ``frozen_cache_gib``."""
    layers = frozen_layers(model) if cfg.lora.enabled and not distributed.is_sharded(model) else 0
    if not layers or cfg.frozen_cache_gib <= 0:
        return None, ""
    stack = backbone(model).layers[:layers]
    if getattr(unwrapped(model).config, "attention_dropout", 0.0) or any(
            isinstance(m, torch.nn.Dropout) and m.p > 0 for m in stack.modules()):
        return None, f"the lowest {layers} layers run every forward (they drop out in training)"
    need = frozen_states_bytes(model, layers, [g.sequences for g in data.train + data.val], layout)
    if need > cfg.frozen_cache_gib * 2 ** 30:
        return None, (f"the lowest {layers} layers run every forward: keeping their output would take "
                      f"{need / 2 ** 30:.1f} GiB, over --frozen-cache-gib {cfg.frozen_cache_gib:g}")
    key = frozen_weights_key(model, layers)
    kept.setdefault(key, FrozenStates(layers))
    total = len(backbone(model).layers)
    return kept[key], (f"the lowest {layers} of {total} layers run once per ranking, their output kept "
                       f"({need / 2 ** 20:.0f} MiB); the layers above run every forward")


@torch.no_grad()
def demo_scores(runner: Runner, seqs: list[list[int]], starts: list[int], pad_id: int, batch_size: int) -> torch.Tensor:
    """Normalised scores (N,) of the demonstrations (each response from ``starts``), in order; each rank scores
    its share of the batches. Scored shortest first, so each batch's rows are of about one length: right-padded
    batches of demonstrations in file order (57-213 tokens in data/demos.jsonl) were a third padding."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    chunks = micro_batches([(seqs[i], starts[i]) for i in order], batch_size)
    mine = [runner.sequence_scores([q for q, _ in chunk], pad_id, batch_size, [s for _, s in chunk])
            for chunk, _ in distributed.rank_chunks(chunks)]
    parts = distributed.gather(mine)  # parts[r][k] holds batch k * world + r
    by_length = torch.cat([parts[j % len(parts)][j // len(parts)] for j in range(len(chunks))])
    return by_length.new_empty(by_length.shape).index_copy_(0, torch.tensor(order, dtype=torch.long), by_length)


def demos_path(cfg: RMConfig, run_dir: Path) -> str | None:
    """The demonstrations that define reward 0: ``--demos``, else the data the run's SFT stage used."""
    if cfg.demos:
        return cfg.demos
    sft = read_manifest(run_dir).get("stages", {}).get("sft", {})
    stored = sft.get("inputs", {}).get("data", {}).get("path")
    path = stored_path(run_dir, stored) if stored else None
    return str(path) if path and path.exists() else None


def demos_reading(cfg: RMConfig, run_dir: Path) -> tuple[str, list]:
    """The split and column mapping the demonstrations are read with: this stage's for ``--demos``, else the
    ones the run's SFT stage read its data with (recorded with its input)."""
    if cfg.demos:
        return cfg.split, cfg.columns
    entry = read_manifest(run_dir).get("stages", {}).get("sft", {}).get("inputs", {}).get("data", {})
    return entry.get("split", "train"), entry.get("columns", [])


def run(cfg: RMConfig, resume: bool = False, overwrite: bool = False, allow_changes: bool = False) -> Path:
    # 1. validate every input before anything is written
    if not cfg.rankings:
        raise BadInput(["--rankings: required (a rankings JSONL file)"])
    run_dir = Path(cfg.run_dir)
    rankings = read_rankings(cfg.rankings, cfg.split, cfg.columns)
    demos_file = demos_path(cfg, run_dir) if cfg.normalize else None
    if cfg.normalize and demos_file is None:
        raise BadInput(["--demos: needed to normalise the reward (demonstrations score mean 0) and the run has no "
                        "SFT stage to take them from; pass --demos FILE or --no-normalize"])
    demos = read_demos(demos_file, *demos_reading(cfg, run_dir)) if demos_file else []
    if 0 < cfg.norm_demos < len(demos):  # the mean of a sample: scoring every demonstration can outcost training
        demos = [demos[i] for i in sorted(random.Random(cfg.seed).sample(range(len(demos)), cfg.norm_demos))]
    grid = parse_sweep(cfg.sweep)
    if grid and not cfg.val_fraction > 0:
        raise BadInput([f"--sweep {cfg.sweep}: chooses by held-out accuracy, and --val-fraction 0 holds nothing out"])
    if grid and not cfg.lora.enabled and {"lora_r", "lora_layers"} & set(grid[0]):
        raise BadInput([f"--sweep {cfg.sweep}: lora_r and lora_layers are LoRA's settings, and this run trains "
                        "every weight: add --lora"])
    if grid and cfg.max_steps and "epochs" in grid[0]:
        raise BadInput([f"--sweep {cfg.sweep}: --max-steps {cfg.max_steps} fixes every trial's length, so its "
                        "epochs would all train alike: sweep epochs without --max-steps"])
    if cfg.model.name:
        require_role(cfg.model.name, "policy", "--model")
    init = cfg.model.name or stage_inputs(run_dir, {"--sft": (cfg.sft, "sft", "policy")})["--sft"]
    model_cfg = ModelConfig(**{**vars(cfg.model), "name": init})
    tokenizer, source = load_tokenizer(model_cfg)
    stage = Stage(run_dir, STAGE)
    device = resolve_device(cfg.device)
    inputs = {"rankings": file_input(cfg.rankings, cfg.split, cfg.columns), "init": model_input(source or init)}
    if demos_file:
        inputs["demos"] = file_input(demos_file, *demos_reading(cfg, run_dir))
    mode, changes = open_stage(stage, cfg, inputs, resume, overwrite, allow_changes)  # lock; what resume changes
    if mode == "done":
        say(f"train-rm: {stage.final} is already complete; nothing to do")
        return stage.final

    def build(c: RMConfig, on: torch.device):  # the same model on every rank; again on CPU to export a sharded one
        torch.manual_seed(c.seed)
        model = load_model(model_cfg, tokenizer, source, on, c.seed, kind="reward")
        setattr(model.config, REWARD_BIAS, 0.0)  # normalisation is recomputed after training
        if c.score != "last":  # where the score is read, saved with the model (a model without it reads the last)
            setattr(model.config, REWARD_POOL, c.score)
        elif hasattr(model.config, REWARD_POOL):  # initialised from a model that pooled
            delattr(model.config, REWARD_POOL)
        return apply_lora(model, c.lora, task_type="SEQ_CLS") if c.lora.enabled else model  # head trains in full

    model = build(cfg, device)
    max_len = context_window(model_cfg, model)
    groups, truncated = tokenize_rankings(tokenizer, rankings, max_len)
    demo_errors: list[str] = []
    scored = [tokenize_scored(tokenizer, d.messages, [d.response], max_len, d.where, demo_errors) for d in demos]
    if demo_errors:
        raise BadInput(demo_errors)
    demo_seqs, demo_starts = [seqs[0] for seqs, _, _ in scored], [start for _, _, start in scored]

    # 2. split by prompt (by "group" where rankings have one): every member of an ensemble holds out the same
    train, val = hold_out(groups, cfg.val_fraction, cfg.seed, [r.group for r in rankings])
    if grid and not val:
        raise BadInput([f"--sweep {cfg.sweep}: chooses by held-out accuracy, and {cfg.rankings} has too few "
                        f"rankings to hold any out at --val-fraction {cfg.val_fraction}"])
    data = Rankings(train, val, demo_seqs, demo_starts, truncated, sorted({len(g.sequences) for g in groups}))
    if grid or cfg.ensemble > 1:
        # member 0 is built again after the others (the same seed: the same weights and random stream as a model
        # trained alone), and not held in memory while they train
        del model
    begin_stage(stage, mode, cfg, inputs)
    kept: dict[tuple, FrozenStates] = {}  # the frozen layers' output for every model trained here

    def sub_run(where: Path, sub: RMConfig) -> tuple[Path, dict]:
        """One reward model trained (resumed, or found finished) as a run directory of its own under rm/ (a
        member of an ensemble, a trial of a sweep); its final/ and its held-out summary."""
        part = Stage(where, STAGE)
        part_mode, part_changes = open_stage(part, sub, inputs, True, False, allow_changes)
        if part_mode != "done":
            begin_stage(part, part_mode, sub, inputs)
            sub_model = build(sub, device)
            steps, summary, _ = train_member(part, sub, part_mode, part_changes, sub_model, data, tokenizer, device,
                                             init, kept)
            export(part, sub_model, summary, tokenizer, lambda: build(sub, torch.device("cpu")))
            finish_stage(part, steps, **summary)
            del sub_model
        return part.final, read_manifest(where)["stages"][STAGE].get("outputs", {})

    # 3. a sweep's trials, each a resumable run directory of its own named by its settings (rm/trials/lr-0.0003/),
    #    all measured on the same held-out rankings; the best one's settings are the stage's from here on, and its
    #    model member 0. Trials of settings no longer swept, an old sweep.json, go
    chosen = None
    keep_only(stage.dir / TRIALS, {trial_name(t) for t in grid})
    if grid:
        trials = []
        for t, settings in enumerate(grid, 1):
            final, out = sub_run(stage.dir / TRIALS / trial_name(settings),
                                 with_settings(replace(cfg, sweep="", ensemble=1), settings))
            trials.append({"trial": t, "settings": settings, "final": str(final.relative_to(stage.dir)),
                           **{k: out.get(f"eval/{k}") for k in ("accuracy", "accuracy_ci_low", "accuracy_ci_high",
                                                                  "loss")}})
        chosen = choose_trial(trials)
        cfg = with_settings(cfg, chosen["settings"])
        if distributed.is_main():
            atomic_write_text(stage.dir / SWEEP, json.dumps({"chosen": chosen["trial"], "trials": trials,
                                                             "by": "held-out pair accuracy, then held-out loss"},
                                                            indent=2) + "\n")
        say(f"train-rm --sweep: trial {chosen['trial']} of {len(trials)} chosen ({describe_settings(chosen)}); its "
            "held-out accuracy is the best of the trials on the rankings that chose it, so it is optimistic")
    elif distributed.is_main():
        (stage.dir / SWEEP).unlink(missing_ok=True)

    # 4. an ensemble's other members, each a resumable run directory of its own holding one rm stage
    #    (rm/members/member-I/: manifest, rm/{metrics, checkpoints, final}); members past N, an old listing, go
    keep_only(stage.dir / MEMBERS, {f"member-{i}" for i in range(1, cfg.ensemble)})
    members = [sub_run(stage.dir / MEMBERS / f"member-{i}", replace(cfg, seed=cfg.seed + i, ensemble=1, sweep=""))[0]
               for i in range(1, cfg.ensemble)]

    # 5. the stage's own model (member 0): trained, or the chosen trial as it was trained (the same seed and
    #    settings: copied, not trained again); the members' mean score measured on the held-out rankings; then
    #    ensemble.json, final/ and the manifest, in that order and back to back
    if chosen is None:
        model = build(cfg, device) if grid or cfg.ensemble > 1 else model
        steps, summary, runner = train_member(stage, cfg, mode, changes, model, data, tokenizer, device, init, kept)
        first: Runner | Path = runner
    else:
        trial = stage.dir / chosen["final"]
        entry = read_manifest(trial.parents[1])["stages"][STAGE]
        steps, summary = entry["steps"], {k: v for k, v in entry.get("outputs", {}).items()
                                          if k not in ("final", "sha256")}
        summary.update({"sweep/chosen": chosen["trial"], "sweep/settings": chosen["settings"]})
        first = trial
    listing = {"members": [str(m.relative_to(stage.dir)) for m in members],
               "seeds": list(range(cfg.seed, cfg.seed + cfg.ensemble))}
    if members and data.val:  # the members' mean score on the same held-out rankings (PPO's mean objective)
        listing.update({f"ensemble/{k}": v for k, v in ensemble_accuracy(
            [first, *members], data.val, cfg, model_cfg, tokenizer, device).items()})
        summary.update({k: v for k, v in listing.items() if k.startswith("ensemble/")})
    if distributed.is_main():  # before final/: a complete rm/ lists its members
        if members:
            atomic_write_text(stage.dir / ENSEMBLE, json.dumps(listing, indent=2) + "\n")
        else:
            (stage.dir / ENSEMBLE).unlink(missing_ok=True)
    if chosen is None:
        export(stage, model, summary, tokenizer, lambda: build(cfg, torch.device("cpu")))
    elif distributed.is_main():
        with building(stage.final, seal=True) as tmp:
            shutil.copytree(first, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("COMPLETED"))
    distributed.barrier()  # final/ is written (by rank 0) before any rank goes on
    finish_stage(stage, steps, **summary)
    accuracy, warning = (describe_rm_accuracy(summary) if data.val
                         else ("unknown: nothing held out (--val-fraction 0)", None))
    banner("reward model", {k: f"{summary[k]:.4f}" for k in ("eval/loss", "demos/raw_mean", "demos/raw_std")
                            if summary.get(k) is not None}
           | ({"demos/n": str(summary["demos/n"])} if summary.get("demos/n") else {})
           | {"accuracy": accuracy, "saved": str(stage.final)}
           | ({"ensemble": f"{cfg.ensemble} members: {stage.final} and " + ", ".join(map(str, members))}
              if members else {})
           | ({"ensemble accuracy": describe_rm_accuracy(summary, "ensemble/")[0] + " (the members' mean score)"}
              if "ensemble/accuracy" in summary else {}))
    if warning:  # a reward model that learned nothing sends PPO after noise: say so before hours are spent
        say(f"[bold red]warning:[/] {warning}")
    return stage.final


def keep_only(folder: Path, names: set[str]) -> None:
    """Remove (rank 0) the run directories in ``folder`` (an ensemble's members, a sweep's trials) but ``names``:
    those of an earlier run of the stage with another --ensemble or --sweep."""
    if distributed.is_main() and folder.is_dir():
        for old in folder.iterdir():
            if old.name not in names:
                shutil.rmtree(old) if old.is_dir() else old.unlink()


def export(stage: Stage, model, summary: dict, tokenizer, cpu_build) -> None:
    """``stage``'s final/ from rank 0 (a sharded model is first gathered into a plain copy there), with the
    held-out summary saved beside its normalisation: ppo reads the accuracy from it."""
    setattr(model.config, REWARD_STATS, summary)
    final = distributed.full_model(model, cpu_build)
    if distributed.is_main():
        for key in (REWARD_BIAS, REWARD_STATS, REWARD_POOL):
            if hasattr(model.config, key):
                setattr(final.config, key, getattr(model.config, key))
        save_final(final, tokenizer, stage.final)


class Rankings(NamedTuple):
    """The tokenised data every member of an ensemble trains on: the same split, the same demonstrations."""
    train: list[RankedGroup]
    val: list[RankedGroup]
    demo_seqs: list[list[int]]
    demo_starts: list[int]  # where each demonstration's response starts
    truncated: int
    ks: list[int]


def train_member(stage: Stage, cfg: RMConfig, mode: str, changes: list[dict], model, data: Rankings, tokenizer,
                 device: torch.device, init: str, kept: dict[tuple, FrozenStates]) -> tuple[int, dict, Runner]:
    """Train one reward model in ``stage`` (begun by the caller) from its newest checkpoint and normalise it on
    the demonstrations; returns the steps trained, the held-out summary and its runner (the caller exports it,
    :func:`export`, and finishes the stage). ``kept``: the frozen layers' output, shared by every model the stage
    trains (:func:`frozen_states`)."""
    # model (DDP or FSDP under a launcher), optimizer, schedule, the resume point
    model.train()
    layout = Layout(shared=cfg.share_prompts and supports_sharing(model),
                    packed=cfg.padding_free and supports_packing(model))
    runner = Runner(model, device, cfg.fsdp)
    frozen, frozen_note = frozen_states(cfg, model, data, layout, kept)  # after sharding (it says what is local)
    distributed.seed_rank(cfg.seed)
    train, val = data.train, data.val
    per_step, epoch_steps, total_steps = plan_steps(cfg, len(train))
    optimizer = build_optimizer(model, cfg.optim)
    state = TrainState(model, optimizer, build_scheduler(optimizer, cfg.optim, total_steps))
    ckpt = restore(stage, mode, state, changes)
    banner("igpt train-rm" + (f" ({stage.run_dir.name} of the ensemble)" if MEMBERS in stage.run_dir.parts
                              else ""), {
        "rankings": f"{cfg.rankings} ({len(train)} train, {len(val)} held-out prompts; K in {data.ks}; "
                    f"{sum(len(g.pairs) for g in train)} training comparisons; {data.truncated} responses cut)",
        "init": f"{init} on {device} ({next(model.parameters()).dtype}), scalar head read "
                + ("over the response (--score mean)" if cfg.score == "mean" else "at the last token")
                + f", seed {cfg.seed}",
        "steps": f"{total_steps} ({epoch_steps}/epoch), {per_step} prompts per step"
                 + (", prompts shared" if layout.shared else "") + (", padding-free" if layout.packed else ", padded")
                 + processes_note(cfg.fsdp),
        "forward": TRANSFORMERS.name(model),  # rankings are scored by transformers' forward
        **({"frozen": frozen_note} if frozen_note else {}),
        **model_rows(model, cfg.lora.enabled, ckpt),
    }, run_dir=stage.run_dir)

    # train: one optimizer step on the step's rankings, held-out loss and accuracy every eval_every steps
    held_out = HeldOut(lambda: evaluate(runner, val, cfg.optim.batch_size, tokenizer.pad_token_id, layout, device,
                                        frozen))

    with Session(stage, cfg, state, total_steps) as session:
        for i in session.steps():
            chunks = step_chunks(train, i, per_step, cfg.optim.batch_size, cfg.seed)
            record = train_step(runner, state, chunks, tokenizer.pad_token_id, layout, device, cfg.optim.grad_clip,
                                frozen)
            session.record({"epoch": round((i + 1) / epoch_steps, 4), **record}, held_out if val else None)

    # normalise: the demonstrations score mean 0 (stored in the config, applied by reward_scores)
    summary = held_out.final() if val else {}
    if data.demo_seqs:
        scores = demo_scores(runner, data.demo_seqs, data.demo_starts, tokenizer.pad_token_id,
                             cfg.optim.batch_size * 4)
        setattr(model.config, REWARD_BIAS, -float(scores.double().mean()))
        # one demonstration has no sample standard deviation (torch says NaN, which is no JSON): null
        summary.update({"demos/n": len(scores), "demos/raw_mean": float(scores.mean()),
                        "demos/raw_std": float(scores.std()) if len(scores) > 1 else None})
    return state.step, summary, runner
