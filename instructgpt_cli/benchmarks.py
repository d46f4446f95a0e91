"""Standard benchmarks (HellaSwag, TruthfulQA, ... or a task of your own) through EleutherAI's
lm-evaluation-harness, run on the model ``igpt eval`` has already loaded, offline.

Why the harness: its task definitions (prompts, choices, normalisations, metrics) are what published
numbers use, so a figure here compares with a model card's. Why offline: igpt never downloads at run time
(README); a benchmark's data set must already be in the local Hugging Face cache, or be local files.

Three functions: :func:`check` (before any model loads: the extra is installed, each task is known, its
data can be read offline), :func:`run` (evaluate, return plain JSON-able numbers) and :func:`tax`
(model minus SFT per task and metric, with the standard error of the difference: the "alignment tax").

Local data files. The harness hands a task's ``dataset_kwargs.data_files`` to ``datasets.load_dataset``
as they are, so a relative path is read relative to the current directory, whatever the YAML's place.
Here a relative ``data_files`` (or ``data_dir``) path that exists next to the task's YAML is made absolute
against the YAML's directory before the task is built, so a task directory (``--benchmark-tasks DIR``, the
shipped ``data/benchmarks``) works from any current directory. A path with no such file is left as the
harness reads it. Local files are read into memory with their Arrow cache in a temporary directory removed
at once (as :mod:`instructgpt_cli.sources` does): nothing is written next to the data, in the current
directory or in the datasets cache. A hub data set is read from the local Hugging Face cache (datasets
may update its own cache there, as it does for any offline read).
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from .errors import BadInput

EXTRA = "--benchmarks needs the lm-eval extra: pip install 'instructgpt-cli[lm-eval]'"
# datasets' packaged builders that read files named by data_files: their data is local, not on a hub
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}
Z95 = 1.96  # two-sided 95% normal quantile
OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def check(tasks: list[str], task_dir: str | None) -> None:
    """Everything about ``--benchmarks`` that can be known before a model loads: lm-eval is installed,
    ``--benchmark-tasks DIR`` is a directory, every task name is known to the harness (its own tasks plus
    DIR's), and every task's data set can be read offline. The tasks are built (their data read) with
    the Hugging Face offline switches on, and each failure becomes a line saying how to cache the data.
    Raises :class:`BadInput` with one line per problem; writes nothing."""
    _require_lm_eval()
    manager = _task_manager(tasks, task_dir)
    problems = _unknown(tasks, manager)
    if problems:
        raise BadInput(problems)
    for name in tasks:
        try:
            with _offline(), _quiet(), _task_specs([name], manager) as specs:
                manager.load(specs)
        except BadInput:
            raise
        except Exception as e:  # noqa: BLE001 - datasets and the harness raise many kinds for missing data
            problems.append(_data_problem(name, manager, e))
    if problems:
        raise BadInput(problems)


def run(model: Any, tokenizer: Any, tasks: list[str], task_dir: str | None, limit: int | None,
        batch_size: int, device: Any) -> dict:
    """Evaluate ``model`` on the harness tasks ``tasks`` (names, DIR's included) and return
    ``{task: {"metrics": {name: {"value": float, "stderr": float | None}}, "n": documents evaluated,
    "seconds": wall seconds, "version": the task's version}}``, strict JSON (no NaN: None).

    ``model`` is a transformers causal LM, or a peft (LoRA) model of one, on ``device`` (moved there when
    not None). The harness wants a ``PreTrainedModel``: a peft model is handed over as its base model with
    the adapters in place (its own forward, nothing merged), so the caller's model is not changed, beyond
    being moved to ``device``; its train/eval mode is restored after (the harness sets eval). ``limit`` caps the
    documents per task (None: all). Each requested task runs in its own harness call, so ``seconds`` is
    that task's own wall time (data, requests and scoring); the subtasks of a group share their group's.
    Metric names lose the harness's filter suffix (``acc,none`` -> ``acc``; another filter keeps it as
    ``acc,FILTER``) and carry their standard error. Nothing is written (no samples, no result files,
    no request cache)."""
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = _task_manager(tasks, task_dir)
    unknown = _unknown(tasks, manager)
    if unknown:
        raise BadInput(unknown)
    plain = _plain_model(model)
    if device is not None:
        plain = plain.to(device)
    was_training = plain.training
    out: dict[str, dict] = {}
    with _offline(), _quiet(), _no_provenance(), _restored_mode(plain, was_training):
        lm = HFLM(pretrained=plain, tokenizer=tokenizer, batch_size=batch_size)
        for name in tasks:
            start = time.perf_counter()
            with _task_specs([name], manager) as specs:
                loaded = manager.load(specs)
                results = simple_evaluate(model=lm, tasks=list(loaded["tasks"].values()), task_manager=manager,
                                          limit=limit, log_samples=False, write_out=False, cache_requests=False)
            seconds = time.perf_counter() - start
            out.update(_summarise(results, seconds))
    return out


def tax(report_tasks: dict, sft_tasks: dict) -> dict:
    """The alignment tax: per task and metric both reports have, ``{"model": value, "sft": value,
    "diff": model - SFT, "stderr": sqrt(se_model^2 + se_sft^2), "ci95": [diff - 1.96 se, diff + 1.96 se]}``
    (stderr and ci95 None when either side's stderr is None, as for a one-document run). Both arguments
    are :func:`run`'s return values; tasks or metrics only one side has are left out. A negative diff on
    a higher-is-better metric is capability the alignment cost; the interval says whether it is noise."""
    out: dict[str, dict] = {}
    for task in sorted(set(report_tasks) & set(sft_tasks)):
        mine, base = report_tasks[task].get("metrics", {}), sft_tasks[task].get("metrics", {})
        rows = {}
        for metric in sorted(set(mine) & set(base)):
            a, b = mine[metric], base[metric]
            if a.get("value") is None or b.get("value") is None:
                continue
            diff = float(a["value"]) - float(b["value"])
            se = None
            if a.get("stderr") is not None and b.get("stderr") is not None:
                se = math.sqrt(float(a["stderr"]) ** 2 + float(b["stderr"]) ** 2)
            rows[metric] = {"model": float(a["value"]), "sft": float(b["value"]), "diff": diff, "stderr": se,
                            "ci95": None if se is None else [diff - Z95 * se, diff + Z95 * se]}
        if rows:
            out[task] = rows
    return out


# ---------------------------------------------------------------------------------------------- helpers

def _require_lm_eval() -> None:
    """BadInput naming the extra unless lm-eval (and the harness's HF model class) imports."""
    import importlib

    try:
        for module in ("lm_eval", "lm_eval.models.huggingface", "lm_eval.tasks"):
            importlib.import_module(module)
    except ImportError:
        raise BadInput([EXTRA]) from None


def _task_manager(tasks: list[str], task_dir: str | None) -> Any:
    """The harness's TaskManager with ``task_dir`` included. Indexing the harness's own ~15,000 task
    YAMLs takes seconds, so when every requested name is a plain task of ``task_dir`` only that
    directory is indexed (the full index would resolve them to the same files: an included directory
    overrides the harness's names)."""
    from lm_eval.tasks import TaskManager

    if task_dir is not None:
        d = Path(task_dir).expanduser()
        if not d.is_dir():
            raise BadInput([f"--benchmark-tasks {task_dir}: not a directory"])
        from lm_eval.tasks._index import Kind

        with _quiet():
            own = TaskManager(include_path=str(d.resolve()), include_defaults=False)
        if all(own.task_index.get(t) is not None and own.task_index[t].kind == Kind.TASK for t in tasks):
            return own
        return _full_manager(str(d.resolve()))
    return _full_manager(None)


_FULL: dict[str | None, Any] = {}


def _full_manager(task_dir: str | None) -> Any:
    """The full index (harness tasks + ``task_dir``), built once per process and directory: ``check``
    and ``run`` of one command share it."""
    from lm_eval.tasks import TaskManager

    if task_dir not in _FULL:
        with _quiet():
            _FULL[task_dir] = TaskManager(include_path=task_dir)
    return _FULL[task_dir]


def _unknown(tasks: list[str], manager: Any) -> list[str]:
    """A line for each name the index lacks, with up to three close matches."""
    known = manager.all_tasks
    own_dir = bool(manager.include_path)
    lines = []
    for t in tasks:
        if t not in manager.task_index:
            close = difflib.get_close_matches(t, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            where = "lm-eval task (nor in --benchmark-tasks)" if own_dir else "lm-eval task"
            lines.append(f"--benchmarks {t}: no such {where}{hint}")
    return lines


@contextlib.contextmanager
def _task_specs(tasks: list[str], manager: Any) -> Iterator[list]:
    """What to hand ``manager.load`` for ``tasks``: a plain YAML task whose data are local files
    becomes its config with those paths made absolute against the YAML's directory and the files
    read into memory (Arrow cache in a temporary directory, removed on exit); anything else is its
    name, built as the harness builds it."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    with tempfile.TemporaryDirectory(prefix="igpt-lm-eval-") as tmp:
        specs: list = []
        for name in tasks:
            entry = manager.task_index.get(name)
            if entry is None or entry.kind != Kind.TASK or entry.yaml_path is None:
                specs.append(name)
                continue
            if (entry.cfg or {}).get("dataset_path") not in LOCAL_BUILDERS:  # the index's config, includes merged
                specs.append(name)
                continue
            cfg = load_yaml(entry.yaml_path, resolve_func=True)
            kwargs = dict(cfg.get("dataset_kwargs") or {})
            here = Path(entry.yaml_path).resolve().parent
            if "data_files" in kwargs:
                kwargs["data_files"] = _anchored(kwargs["data_files"], here)
            if isinstance(kwargs.get("data_dir"), str):
                kwargs["data_dir"] = _anchored(kwargs["data_dir"], here)
            kwargs.update(cache_dir=tmp, keep_in_memory=True)
            for key in ("tag", "group", "task_list"):
                cfg.pop(key, None)
            specs.append({**cfg, "task": name, "dataset_kwargs": kwargs})
        yield specs


def _anchored(files: Any, here: Path) -> Any:
    """``data_files`` (a path, a list, or a dict of either) with each relative path that exists under
    ``here`` made absolute; other entries (absolute, URLs, globs, missing) unchanged."""
    if isinstance(files, dict):
        return {k: _anchored(v, here) for k, v in files.items()}
    if isinstance(files, (list, tuple)):
        return [_anchored(v, here) for v in files]
    if isinstance(files, str) and "://" not in files and not Path(files).expanduser().is_absolute():
        if (here / files).exists():
            return str(here / files)
    return files


def _data_problem(name: str, manager: Any, e: Exception) -> str:
    """The line for a task whose data could not be read: which data set, and how to cache it."""
    entry = manager.task_index.get(name)
    cfg: dict = {}
    if entry is not None and entry.yaml_path is not None:
        with contextlib.suppress(Exception):
            from lm_eval.tasks._yaml_loader import load_yaml

            cfg = load_yaml(entry.yaml_path, resolve_func=False)
    why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}".rstrip(": ")
    path, sub = cfg.get("dataset_path"), cfg.get("dataset_name")
    if path in LOCAL_BUILDERS:
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        return (f"--benchmarks {name}: its data files ({path}: {files}) cannot be read: {why} (a relative path "
                f"is read next to {entry.yaml_path} when it is there, else from the current directory)")
    if path:
        args = ", ".join(repr(a) for a in (path, sub) if a)
        where = f"{path}" + (f" ({sub})" if sub else "")
        return (f"--benchmarks {name}: its dataset {where} is not in the local Hugging Face cache and igpt "
                f"never downloads ({why}); on a machine with network, cache it with: "
                f"python -c \"import datasets; datasets.load_dataset({args})\" "
                f"(or HF_DATASETS_OFFLINE=0 lm_eval --tasks {name} --limit 1 --model hf --model_args "
                f"pretrained=MODEL), then copy the cache (~/.cache/huggingface) here")
    return (f"--benchmarks {name}: cannot be built offline ({why}); on a machine with network, cache its "
            f"data with: HF_DATASETS_OFFLINE=0 lm_eval --tasks {name} --limit 1 --model hf --model_args "
            f"pretrained=MODEL, then copy the cache (~/.cache/huggingface) here")


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """The Hugging Face offline switches on for the block, restored after. datasets and huggingface_hub
    read the variables when imported, so their module flags are set too."""
    saved_env = {k: os.environ.get(k) for k in OFFLINE_VARS}
    flags: list[tuple[Any, str, Any]] = []
    for module, names in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                          ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        with contextlib.suppress(ImportError):
            mod = __import__(module, fromlist=["_"])
            flags += [(mod, n, getattr(mod, n)) for n in names if hasattr(mod, n)]
    try:
        for k in OFFLINE_VARS:
            os.environ[k] = "1"
        for mod, n, _ in flags:
            setattr(mod, n, True)
        yield
    finally:
        for mod, n, old in flags:
            setattr(mod, n, old)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The harness's INFO/WARNING logging and datasets' progress bars off for the block (igpt reports
    what matters itself), restored after."""
    import datasets

    log = logging.getLogger("lm_eval")
    old = log.level
    bars = datasets.utils.logging.is_progress_bar_enabled()
    log.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        log.setLevel(old)
        if bars:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _no_provenance() -> Iterator[None]:
    """simple_evaluate's provenance for its result files off for the block: it runs ``git describe`` in
    the current directory (printing git's "not a git repository" there) and torch's collect_env (pip,
    nvidia-smi ...); igpt's report records its own provenance and writes no harness result file."""
    import lm_eval.evaluator as ev

    saved = {n: getattr(ev, n) for n in ("get_git_commit_hash", "add_env_info") if hasattr(ev, n)}
    replacements = {"get_git_commit_hash": lambda: None, "add_env_info": lambda storage: None}
    try:
        for n in saved:
            setattr(ev, n, replacements[n])
        yield
    finally:
        for n, f in saved.items():
            setattr(ev, n, f)


def _plain_model(model: Any) -> Any:
    """A ``PreTrainedModel`` for the harness. For a peft model that is its base model, into whose layers
    peft has put the adapters: the forward is the LoRA model's own, and nothing is merged or changed."""
    with contextlib.suppress(ImportError):
        from peft import PeftModel

        if isinstance(model, PeftModel):
            return model.get_base_model()
    return model


@contextlib.contextmanager
def _restored_mode(model: Any, training: bool) -> Iterator[None]:
    """``model``'s train/eval mode set back to ``training`` after the block."""
    try:
        yield
    finally:
        model.train(training)


def _number(x: Any) -> float | None:
    """A finite float, or None (the harness's "N/A", NaN, inf, missing)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _summarise(results: dict, seconds: float) -> dict:
    """The harness's results dict as ``{task: {"metrics", "n", "seconds", "version"}}``."""
    n_samples = results.get("n-samples", {})
    subtasks = results.get("group_subtasks", {})
    out = {}
    for task, raw in results.get("results", {}).items():
        metrics: dict[str, dict] = {}
        for key, value in raw.items():
            if key == "alias" or "," not in key:
                continue
            metric, filt = key.split(",", 1)
            if metric.endswith("_stderr"):
                continue
            name = metric if filt == "none" else key
            metrics[name] = {"value": _number(value), "stderr": _number(raw.get(f"{metric}_stderr,{filt}"))}
        if task in n_samples:
            n = int(n_samples[task].get("effective", n_samples[task].get("original", 0)))
        else:  # a group: its subtasks' documents
            n = sum(int(n_samples.get(s, {}).get("effective", 0)) for s in subtasks.get(task, []))
        version = results.get("versions", {}).get(task)
        out[task] = {"metrics": metrics, "n": n, "seconds": seconds,
                     "version": version if isinstance(version, (int, str)) or version is None else _number(version)}
    return out
