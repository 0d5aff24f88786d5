"""Locating a dataset's ArrayRecord shards from what a config names, with one clear error per bad path.

An entry of `train_data` (or an eval's `path`) may be:
- a dataset directory (the converter's output: `*.array_record` + dataset.json),
- a shard file, or a pattern over shard files: brace groups (`/data/recap/train-{00000..00099}.array_record`,
  `{a,b}`: see `patterns.py`) and shell globs (`/data/recap/train-*.array_record`); a pattern that names a
  dataset directory (`/data/recap-{0..3}`) stands for its shards,
- `demo:<name>`: a split of the embedded demo data (`demo:shapes_train`, `demo:digits_test`, ...), generated
  into `data_cache_dir` on first use.
"""

from __future__ import annotations

import os
import pathlib
import sys
from typing import Sequence

from openvision_max.config.paths import is_remote
from openvision_max.data.patterns import PatternError, match
from openvision_max.data.records import SHARD_SUFFIX, DatasetInfo

DEMO_SCHEME = "demo:"


class DataError(ValueError):
    """Input data that cannot be used (a path matching nothing, a shard that cannot be opened)."""


def _demo_directory(name: str, cache_dir: str) -> pathlib.Path:
    from openvision_max.data import demo_data  # only demo runs pay for generating it
    dirs = demo_data.ensure_demo_data(pathlib.Path(os.path.expanduser(cache_dir)) / "demo",
                                      log=lambda line: print(f"demo data: {line}", file=sys.stderr, flush=True))
    if name not in dirs:
        raise DataError(f"unknown demo dataset {DEMO_SCHEME}{name}; available: "
                        + ", ".join(DEMO_SCHEME + k for k in sorted(dirs)))
    return dirs[name]


def dataset_directory(entry: str, cache_dir: str) -> pathlib.Path | None:
    """The directory an entry names (None for a file or a pattern)."""
    if entry.startswith(DEMO_SCHEME):
        return _demo_directory(entry[len(DEMO_SCHEME):], cache_dir)
    path = pathlib.Path(os.path.expanduser(entry))
    return path if path.is_dir() else None


def resolve(entries: Sequence[str], cache_dir: str) -> list[str]:
    """All shard paths the entries name, in a stable order; DataError naming the first entry that fails."""
    if not entries:
        raise DataError("no training data: set train_data (dataset directories, shard files or patterns)")
    shards: list[str] = []
    for entry in entries:
        if is_remote(entry):
            raise DataError(f"{entry}: shards are read from local paths; for a bucket, mount it with GCS FUSE "
                            "(GKE: the gcsfuse CSI driver, e.g. at /gcs/BUCKET) and give the mounted path")
        if entry.startswith(DEMO_SCHEME):
            shards.extend(_directory_shards(dataset_directory(entry, cache_dir)))
            continue
        try:
            paths = match(os.path.expanduser(entry))
        except PatternError as e:
            raise DataError(str(e)) from None
        for path in paths:
            shards.extend(_directory_shards(pathlib.Path(path)) if os.path.isdir(path) else [path])
    for path in shards:
        check_readable(path)
    return shards


def _directory_shards(directory: pathlib.Path) -> list[str]:
    found = sorted(str(p) for p in directory.glob(f"*{SHARD_SUFFIX}"))
    if not found:
        raise DataError(f"dataset directory {directory} holds no *{SHARD_SUFFIX} shards")
    return found


def check_readable(path: str) -> int:
    """Open a shard once before training starts; its record count, or DataError naming it."""
    from array_record.python.array_record_module import ArrayRecordReader
    try:
        reader = ArrayRecordReader(path)
        n = reader.num_records()
        reader.close()
    except Exception as e:  # array_record raises RuntimeError/OSError with a long message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot open shard {path}: {first}") from None
    return n


def class_names(entry: str, cache_dir: str) -> list[str]:
    """The class names a classification dataset's dataset.json lists (ImageFolder / demo test sets)."""
    directory = dataset_directory(entry, cache_dir)
    info = DatasetInfo.read(directory) if directory is not None else None
    return list(info.classes) if info else []


def templates(entry: str, cache_dir: str) -> list[str]:
    """Prompt templates a dataset ships in its dataset.json (empty when it has none)."""
    directory = dataset_directory(entry, cache_dir)
    info = DatasetInfo.read(directory) if directory is not None else None
    return list(getattr(info, "templates", []) or []) if info else []
