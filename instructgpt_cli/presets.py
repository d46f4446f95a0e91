"""Reading a stage's config: its section of a YAML preset (``--config``), merged with the flags given, built
into the stage's dataclass (stages.STAGES says which) with every value type-checked and range-checked by its
field's rule (config.py); every problem names the file and key, or the flag. Torch is not imported here."""
from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable

import yaml

from .config import problems
from .errors import BadInput
from .stages import STAGES


def sections() -> tuple[str, ...]:
    """The sections a preset file may hold: one per command with a config; a stage reads only its own."""
    return tuple(name for name, stage in STAGES.items() if stage.config is not None)


def resolve(stage: str, config_file: str | Path | None, overrides: dict[str, Any],
            flag_of: Callable[[str], str] | None = None) -> Any:
    """Defaults < ``config_file``'s section for ``stage`` < ``overrides`` (dotted keys; None = not given).

    Every section of the file is checked now (unknown keys, types, ranges), not when its stage runs, and
    every error names where the bad value came from: ``FILE: stage.key`` for the file, the flag
    (``flag_of(key)``, e.g. ``--k``) for a value given on the command line."""
    file_sections = load_preset(config_file) if config_file else {}
    if config_file and stage not in file_sections:
        raise BadInput([missing_section(config_file, stage, list(file_sections))])
    errors: list[str] = []
    for name, section in file_sections.items():
        if name != stage:
            try:
                other = build(STAGES[name].config, section, f"{config_file}: {name}")
                errors += [f"{config_file}: {name}.{key}: {why}" for key, why in problems(other)]
            except BadInput as e:
                errors += e.messages
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        cfg = build(STAGES[stage].config, merge(file_sections.get(stage, {}), nest(given)),
                    f"{config_file}: {stage}" if config_file else stage)
    except BadInput as e:
        raise BadInput(e.messages + errors) from None

    def source(key: str) -> str:
        if key in given:
            return f"{flag_of(key)} ({stage}.{key})" if flag_of else f"{stage}.{key} (command line)"
        return f"{config_file}: {stage}.{key}" if config_file else f"{stage}.{key}"

    errors = [f"{source(key)}: {why}" for key, why in problems(cfg)] + errors
    if errors:
        raise BadInput(errors)
    return cfg


def missing_section(config_file: str | Path, stage: str, found: list[str]) -> str:
    """The error for a --config file without the command's section: the file would otherwise change nothing and
    the stage would run on its defaults. The usual cause is another stage's saved config.yaml."""
    has = f"it has {', '.join(found)}" if found else "it has no section"
    saved = " (a config.yaml a stage saved holds that stage's section only)" if found else ""
    return (f"{config_file}: no '{stage}' section, which igpt {STAGES[stage].command} reads; {has}{saved}; add a "
            f"'{stage}:' section or pass the file written for this stage")


def saved_config(stage_dir: Path) -> Any | None:
    """The config a stage of a run ran with, typed (its ``STAGE/config.yaml``, which lifecycle.begin_stage wrote
    from the resolved config), or None when the stage has none yet. Fields a newer igpt added take their
    defaults; a file that is not YAML or holds an unknown key is a BadInput naming it."""
    path = Path(stage_dir) / "config.yaml"
    name = Path(stage_dir).name
    if not path.is_file():
        return None
    try:
        section = (read_yaml(path.read_text(encoding="utf-8")) or {}).get(name) or {}
    except (OSError, yaml.YAMLError) as e:
        raise BadInput([f"{path}: not readable as YAML ({e})"]) from None
    return build(STAGES[name].config, section, f"{path}: {name}")


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
        if isinstance(value, str):  # written as the flag takes it (`model: sft`, `benchmarks: a,b`): comma-separated
            return [v.strip() for v in value.split(",") if v.strip()]
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
        raise BadInput([f"{p}: expected a mapping of stage sections ({', '.join(sections())})"])
    unknown = [k for k in raw if k not in sections()]
    if unknown:
        raise BadInput([f"{p}: {k}: unknown section (known: {', '.join(sections())})" for k in unknown])
    bad = [f"{p}: {k}: expected a mapping, got {type(v).__name__}" for k, v in raw.items()
           if v is not None and not isinstance(v, dict)]
    if bad:
        raise BadInput(bad)
    return {k: v or {} for k, v in raw.items()}
