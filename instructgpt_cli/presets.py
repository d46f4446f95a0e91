"""Reading a stage's config: its section of a YAML preset (``--config``), merged with the flags given, built
into the stage's dataclass with every value type-checked and range-checked; every problem names the file and
key. Torch is not imported here."""
from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import BadInput

# Sections a preset file may hold; a stage reads only its own.
SECTIONS = ("sft", "rm", "ppo", "sample", "eval", "compare", "dpo")


DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")


# compare's and label's --judge (judges.py): rm, human, model:PATH or python:MODULE:FUNCTION
JUDGE_SPEC = re.compile(r"rm|human|model:.+|python:[A-Za-z_][\w.]*:[A-Za-z_]\w*")
JUDGE_FORMS = "must be rm, human, model:PATH or python:MODULE:FUNCTION"
# eval's --checkpoints (the frontier of a PPO run) and its --gold judge (frontier.py)
CHECKPOINTS_SPEC = re.compile(r"all|\d+(,\d+)*")
CHECKPOINTS_FORMS = "must be '' (the model only), all, or a comma-separated list of PPO steps (10,20,40)"
GOLD_SPEC = re.compile(r"model:.+|python:[A-Za-z_][\w.]*:[A-Za-z_]\w*")
GOLD_FORMS = "must be model:PATH or python:MODULE:FUNCTION (a second reward model is --gold-rm PATH)"


# igpt's record fields a dataset column may be renamed to (``--columns FIELD=COLUMN``).
COLUMN_FIELDS = ("prompt", "response", "completion", "messages", "chosen", "rejected", "responses", "ranks",
                 "category", "text")


def column_entry(entry: str) -> bool:
    fld, eq, col = entry.partition("=")
    return bool(eq) and fld.strip() in COLUMN_FIELDS and bool(col.strip())


REPORT_TO = ("tensorboard", "wandb", "trackio", "mlflow")  # --report-to: trackers.py, one adapter each


# Range checks by field name, wherever the field appears: (predicate, what it must be).
CHECKS: dict[str, tuple[Any, str]] = {
    "lr": (lambda v: v > 0, "must be > 0"),
    "batch_size": (lambda v: v >= 1, "must be >= 1"),
    "grad_accum": (lambda v: v >= 1, "must be >= 1"),
    "epochs": (lambda v: v >= 1, "must be >= 1"),
    "max_steps": (lambda v: v >= 0, "must be >= 0 (0 = no limit)"),
    "warmup_steps": (lambda v: v >= 0, "must be >= 0"),
    "grad_clip": (lambda v: v >= 0, "must be >= 0 (0 disables)"),
    "dropout": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "val_fraction": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "min_lr_ratio": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "max_seq_len": (lambda v: v >= 2, "must be >= 2"),
    "eval_every": (lambda v: v >= 1, "must be >= 1"),
    "save_every": (lambda v: v >= 1, "must be >= 1"),
    "keep_checkpoints": (lambda v: v >= 1, "must be >= 1"),
    "log_every": (lambda v: v >= 0, "must be >= 0 (0 = about every 30 s)"),
    "r": (lambda v: v >= 1, "must be >= 1"),
    "layers": (lambda v: v >= 0, "must be >= 0 (0 = all layers)"),
    "k": (lambda v: v >= 2, "must be >= 2 (rankings need two responses at least)"),
    "temperature": (lambda v: v >= 0, "must be >= 0 (0 = greedy)"),
    "kl_temperature": (lambda v: v >= 0, "must be >= 0 (0 = the run's PPO temperature)"),
    "max_new_tokens": (lambda v: v >= 1, "must be >= 1"),
    "ptx_coef": (lambda v: v >= 0, "must be >= 0"),
    "require_rm_accuracy": (lambda v: 0 <= v <= 1, "must be in [0, 1] (a fraction; 0 = no check)"),
    "ptx_batch_size": (lambda v: v >= 1, "must be >= 1"),
    "ptx_seq_len": (lambda v: v >= 2, "must be >= 2"),
    "ptx_micro_batch_size": (lambda v: v >= 0, "must be >= 0 (0 = optim.batch_size)"),
    "total_episodes": (lambda v: v >= 0, "must be >= 0"),
    "rollout_batch_size": (lambda v: v >= 1, "must be >= 1"),
    "mini_batch_size": (lambda v: v >= 1, "must be >= 1"),
    "ppo_epochs": (lambda v: v >= 1, "must be >= 1"),
    "beta": (lambda v: v >= 0, "must be >= 0"),
    "target_kl": (lambda v: v >= 0, "must be >= 0 (0 = fixed beta)"),
    "kl_horizon": (lambda v: v >= 1, "must be >= 1"),
    "gamma": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "lam": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "cliprange": (lambda v: v > 0, "must be > 0"),
    "cliprange_value": (lambda v: v > 0, "must be > 0"),
    "vf_coef": (lambda v: v >= 0, "must be >= 0"),
    "vf_lr": (lambda v: v >= 0, "must be >= 0 (0 = optim.lr)"),
    "reward_clip": (lambda v: v >= 0, "must be >= 0 (0 disables)"),
    "ema_decay": (lambda v: 0 <= v < 1, "must be in [0, 1) (0 = no EMA)"),
    "sample_every": (lambda v: v >= 1, "must be >= 1"),
    "split": (lambda v: bool(v.strip()), "must be a split name (train, test ...)"),
    "columns": (lambda v: all(column_entry(e) for e in v),
                f"must be FIELD=COLUMN entries, FIELD one of {', '.join(COLUMN_FIELDS)}"),
    "judge": (lambda v: bool(JUDGE_SPEC.fullmatch(v)), JUDGE_FORMS),
    "checkpoints": (lambda v: v == "" or bool(CHECKPOINTS_SPEC.fullmatch(v)), CHECKPOINTS_FORMS),
    "gold": (lambda v: v == "" or bool(GOLD_SPEC.fullmatch(v)), GOLD_FORMS),
    "tie_margin": (lambda v: v >= 0, "must be >= 0"),
    "dtype": (lambda v: v in DTYPES, f"must be one of {', '.join(DTYPES)}"),
    "scheduler": (lambda v: v in SCHEDULERS, f"must be one of {', '.join(SCHEDULERS)}"),
    "report_to": (lambda v: all(x in (*REPORT_TO, "none") for x in v),
                  f"must name trackers among {', '.join(REPORT_TO)} (comma-separated), or none"),
    "device": (lambda v: v in ("auto", "cpu", "mps") or v == "cuda" or v.startswith("cuda:"),
               "must be auto, cpu, cuda, cuda:N or mps"),
}


def check_ranges(cfg: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Every range error of a built config, as ``(dotted key, "value reason")``."""
    errors = []
    for fl in dataclasses.fields(cfg):
        value = getattr(cfg, fl.name)
        if dataclasses.is_dataclass(value):
            errors += check_ranges(value, f"{prefix}{fl.name}.")
        elif fl.name in CHECKS and not CHECKS[fl.name][0](value):
            errors.append((prefix + fl.name, f"{value!r} {CHECKS[fl.name][1]}"))
    return errors


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` converted to ``tp`` where lossless (int -> float), else raise with ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except BadInput:
                pass
        raise BadInput([f"{where}: expected {tp}, got {type(value).__name__} {value!r}"])
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (list, typing.List) or origin is list:
        if not isinstance(value, list):
            raise BadInput([f"{where}: expected a list, got {type(value).__name__} {value!r}"])
        return list(value)
    if tp is int and isinstance(value, bool):
        raise BadInput([f"{where}: expected int, got bool {value!r}"])
    if not isinstance(value, tp):
        raise BadInput([f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}"])
    return value


def build(cls: type, data: dict, where: str, base: Any = None) -> Any:
    """Build dataclass ``cls`` from a nested dict on top of ``base`` (default: ``cls()``), so a block a
    stage declares with its own defaults (e.g. rm's ``model.name: ""``) keeps them for keys not given.
    Unknown keys and wrong types raise BadInput, all of them at once."""
    if not isinstance(data, dict):
        raise BadInput([f"{where}: expected a mapping, got {type(data).__name__}"])
    obj = copy.deepcopy(base) if base is not None else cls()
    hints = typing.get_type_hints(cls)
    names = {fl.name for fl in dataclasses.fields(cls)}
    errors = [f"{where}.{k}: unknown key (known: {', '.join(sorted(names))})" for k in data if k not in names]
    for key, value in data.items():
        if key not in names:
            continue
        tp = hints[key]
        try:
            if dataclasses.is_dataclass(tp):
                setattr(obj, key, build(tp, value, f"{where}.{key}", getattr(obj, key)))
            else:
                setattr(obj, key, _check_type(value, tp, f"{where}.{key}"))
        except BadInput as e:
            errors.extend(e.messages)
    if errors:
        raise BadInput(errors)
    return obj


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def nest(dotted: dict[str, Any]) -> dict:
    nested: dict = {}
    for key, value in dotted.items():
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 (core schema) numbers: ``1e-4`` and ``3E5`` are floats, as HF and
    TRL configs write them (YAML 1.1 needs ``1.0e-4`` and reads ``1e-4`` as a string); ``010`` is ten,
    not octal eight; ``1_000`` and ``1:30`` are strings, not 1000 and 90."""


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Yaml12Loader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
Yaml12Loader.add_implicit_resolver(
    _FLOAT, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
                       r"|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def _yaml12_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node)
    sign, digits = (-1, text[1:]) if text.startswith("-") else (1, text.lstrip("+"))
    base = {"0o": 8, "0x": 16}.get(digits[:2], 10)
    return sign * int(digits[2:] if base != 10 else digits, base)


Yaml12Loader.add_constructor(_INT, _yaml12_int)


def read_yaml(text: str) -> Any:
    """YAML with 1.2 numbers (Yaml12Loader): presets and the config.yaml a stage saved."""
    return yaml.load(text, Loader=Yaml12Loader)


def load_preset(path: str | Path) -> dict[str, dict]:
    """Every section of a YAML preset; a file that is not a mapping of known sections is an error."""
    p = Path(path)
    try:
        raw = read_yaml(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput([f"{p}: config file not found"]) from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise BadInput([f"{p}: not valid YAML: {e}"]) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadInput([f"{p}: expected a mapping of stage sections ({', '.join(SECTIONS)})"])
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        raise BadInput([f"{p}: {k}: unknown section (known: {', '.join(SECTIONS)})" for k in unknown])
    bad = [f"{p}: {k}: expected a mapping, got {type(v).__name__}" for k, v in raw.items()
           if v is not None and not isinstance(v, dict)]
    if bad:
        raise BadInput(bad)
    return {k: v or {} for k, v in raw.items()}
