"""Data inputs that are not igpt's own JSONL, read through Hugging Face ``datasets``: a directory written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, a directory of data files, a parquet, CSV, JSON or
Arrow file, or a dataset id already in the local Hugging Face cache (never downloaded: igpt runs offline).

``datasets`` is imported only when such an input is given, so ``igpt --help`` and JSONL runs do not pay for it.
Rows come back as plain dicts numbered from 1, which ``data.py`` validates as it does JSONL lines
(``SOURCE:ROW: field: reason``); renaming columns to igpt's fields (``--columns``) happens there too, for
every kind of input alike.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import BadInput
from .storage import sha256_file

# File suffix -> the ``datasets`` builder that reads it. .jsonl and .txt stay igpt's own readers.
BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".arrow": "arrow"}
OWN = (".jsonl", ".txt")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # "name" or "owner/name"


def is_dataset(path: str | Path) -> bool:
    """Whether ``path`` is read through ``datasets`` (else it is igpt's JSONL, or a .txt)."""
    p = Path(path)
    if p.is_dir() or p.suffix.lower() in BUILDERS:
        return True
    return not p.exists() and p.suffix.lower() not in OWN and bool(HUB_ID.match(str(path)))


def hub_cache() -> Path:
    """The Hugging Face hub cache as ``huggingface_hub`` finds it, read from the environment now (not at import)."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def local_source(path: str | Path) -> Path:
    """The local file or directory an input names: itself, or for a hub dataset id its snapshot in the
    local cache (``datasets--OWNER--NAME/snapshots/REV``, REV from ``refs/main``). Raises BadInput when
    there is neither."""
    p = Path(path)
    if p.exists() or not is_dataset(path) or p.suffix.lower() in BUILDERS:
        if not p.exists():
            raise BadInput([f"{p}: file not found"])
        return p
    from huggingface_hub import snapshot_download

    cache = hub_cache()
    try:  # local_files_only: the cache or nothing, whatever HF_HUB_OFFLINE says
        return Path(snapshot_download(str(path), repo_type="dataset", cache_dir=cache, local_files_only=True))
    except Exception:  # noqa: BLE001 - huggingface_hub's "not in cache" errors vary by version
        raise BadInput([f"{path}: file not found, and no dataset {path!r} in the local Hugging Face cache ({cache}); "
                        f"igpt never downloads: fetch it first (hf download {path} --repo-type dataset) or give a "
                        "path"]) from None


def tree_sha256(root: Path) -> str:
    """One sha256 for a directory of data: every file by relative path in sorted order, each hashed whole."""
    h = hashlib.sha256()
    for p in sorted((q for q in root.rglob("*") if q.is_file()), key=lambda q: q.relative_to(root).as_posix()):
        h.update(f"{p.relative_to(root).as_posix()}\0{sha256_file(p)}\n".encode("utf-8"))
    return h.hexdigest()


def input_sha256(path: str | Path) -> tuple[Path, str]:
    """Where an input lives and its content digest (a file's sha256, or :func:`tree_sha256` of a directory)."""
    p = local_source(path)
    return p, sha256_file(p) if p.is_file() else tree_sha256(p)


def load_rows(path: str, split: str) -> tuple[str, list[str], Iterator[tuple[int, dict]]]:
    """``(label, column names, rows)`` of a dataset input; ``label`` names it in errors (``PATH``, or
    ``PATH[SPLIT]`` for one split of several). A single file is one split and is read whole; a DatasetDict
    or hub dataset without ``split`` is an error listing the splits it has."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read before datasets is imported
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    p = local_source(path)
    try:
        if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
            ds = datasets.load_from_disk(str(p))  # memory-mapped Arrow files: nothing is copied or cached
        elif p.is_dir():
            ds = _load_files(datasets, str(p))
        else:
            ds = _load_files(datasets, BUILDERS[p.suffix.lower()], data_files=str(p))["train"]
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - datasets/pyarrow raise many kinds for an unreadable input
        raise BadInput([f"{path}: cannot be read as a dataset: {type(e).__name__}: {e}"]) from None
    label = str(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise BadInput([f"{path}: no split {split!r}; it has {', '.join(ds) or 'none'} (choose one with --split)"])
        ds = ds[split]
        label = f"{path}[{split}]"
    return label, list(ds.column_names), _rows(ds)


def _load_files(datasets: Any, *args: Any, **kwargs: Any) -> Any:
    """``load_dataset`` into memory, its Arrow cache in a temporary directory removed at once: a run
    writes nothing outside its run directory, and an edited file is never served from a stale cache."""
    with tempfile.TemporaryDirectory(prefix="igpt-datasets-") as tmp:
        return datasets.load_dataset(*args, cache_dir=tmp, keep_in_memory=True, **kwargs)


def _rows(ds: Any, batch: int = 1024) -> Iterator[tuple[int, dict]]:
    """``(row number from 1, row)``, a batch of columns at a time (much faster than row-wise indexing)."""
    names = list(ds.column_names)
    n = 0
    for cols in ds.iter(batch_size=batch):
        for values in zip(*(cols[c] for c in names)):
            n += 1
            yield n, {c: _as_messages(v) for c, v in zip(names, values)}


def _as_messages(value: Any) -> Any:
    """A column declared ``Sequence({"role", "content"})`` (older datasets) decodes as a dict of lists;
    turn it into the list of ``{role, content}`` messages it stands for."""
    if isinstance(value, dict) and "role" in value and "content" in value and isinstance(value["role"], list):
        keys = list(value)
        return [dict(zip(keys, turn)) for turn in zip(*(value[k] for k in keys))]
    return value
