"""Model references: the one reading of a model that eval, compare, sample and a ``model:`` judge (label,
compare, eval's ``--gold``) name (:func:`model_or_checkpoint`): a stage of the run (``sft``, ``ppo``, ``dpo``,
``ppo_ema``), a model directory, a model name (``tiny``, ``smollm2-135m``), or a stage's checkpoint
(``sft@step-N``, ``ppo@step-N``, ``dpo@step-N``, or the checkpoint folder itself) loaded on the model that stage
trained from; and what a PPO run's checkpoints are (:func:`ppo_run`: the points of ``eval --checkpoints``).
Torch is not imported at module level by what is here.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple

from . import checkpoint
from .errors import BadInput
from .presets import saved_config
from .rundir import (BEST, CHECKPOINT_PREFIX, STAGE_MODELS, complete_checkpoints, read_manifest, read_metrics,
                     stage_model, stored_path)
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

    if spec.startswith("~"):  # model:~/dir or a quoted path: the shell left it as written
        spec = str(Path(spec).expanduser())
    match = CHECKPOINT_REF.fullmatch(spec)
    folder = Path(spec)
    if match is None and folder.parent.name == "checkpoints" and folder.parent.parent.name in ("sft", "ppo", "dpo") \
            and folder.name.startswith(CHECKPOINT_PREFIX) and (folder / COMPLETED).is_file():
        run_dir = folder.parent.parent.parent
        match = CHECKPOINT_REF.fullmatch(f"{folder.parent.parent.name}@{int(folder.name[len(CHECKPOINT_PREFIX):])}")
    if match is None:
        if "@" in spec and not folder.exists() and spec != BEST:
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
