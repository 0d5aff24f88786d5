"""Writing one ArrayRecord shard so that an interrupted run can resume.

A shard is written under a temporary name (`.<shard>.partial-<pid>`) and renamed when complete; beside it a
sidecar `<shard>.json` holds what went into it (`written`, `skipped` by reason, `recaption_fallbacks`) and the
SHA-256 of a JSON description of the input it came from (`source_sha256`; the description can be long, e.g. an
image list). A shard counts as done only when both files exist and the sidecar's digest matches the source
asked for now, so a re-run skips finished shards, rewrites missing or stale
ones, and can still report exact totals from the sidecars without opening any shard.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import json
import os
import pathlib
from typing import Any, Optional, Sequence

from array_record.python.array_record_module import ArrayRecordWriter

from openvision_max.data.records import INFO_FILE, SHARD_SUFFIX, WRITER_OPTIONS, Record


@dataclasses.dataclass
class ShardStats:
    written: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    recaption_fallbacks: int = 0

    def add(self, other: "ShardStats") -> None:
        self.written += other.written
        self.skipped.update(other.skipped)
        self.recaption_fallbacks += other.recaption_fallbacks


def sidecar_path(shard: pathlib.Path) -> pathlib.Path:
    return shard.with_name(shard.name + ".json")


def written_files(directory: pathlib.Path, listed: Sequence[str]) -> list[pathlib.Path]:
    """The files a conversion wrote into `directory`, dataset.json first: the shards `listed` in it and any
    shard with a sidecar (an unfinished run's), their sidecars, and the partial files of killed runs. A shard
    without a sidecar that dataset.json does not list was put there by someone else and is not included."""
    sidecars = directory.glob(f"*{SHARD_SUFFIX}.json")  # see sidecar_path
    # Plain file names only: a dataset.json listing `../x` must not make the converter delete outside `directory`.
    listed = [name for name in listed if pathlib.Path(name).name == name]
    shards = dict.fromkeys([*listed, *(p.name[:-len(".json")] for p in sidecars)])
    files = [directory / INFO_FILE, directory / f"{INFO_FILE}.tmp"]
    files += [f for name in shards for f in (directory / name, sidecar_path(directory / name))]
    files += sorted(directory.glob(f".*{SHARD_SUFFIX}*.partial-*"))
    return [f for f in files if f.exists()]


def source_digest(source: Any) -> str:
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()


def completed(shard: pathlib.Path, source: Any) -> Optional[ShardStats]:
    """The stats of `shard` if it was completed from `source`; None if it must be (re)written."""
    side = sidecar_path(shard)
    if not (shard.exists() and side.exists()):
        return None
    try:
        meta = json.loads(side.read_text())
        if meta["source_sha256"] != source_digest(source):
            return None
        return ShardStats(int(meta["written"]), collections.Counter(meta["skipped"]),
                          int(meta.get("recaption_fallbacks", 0)))
    except (OSError, ValueError, KeyError, TypeError):  # unreadable or foreign sidecar: rewrite the shard
        return None


class ShardWriter:
    """`with ShardWriter(path, source) as w: w.write(record) ...; w.commit(stats)`.

    Leaving the block without `commit` (an exception) removes the partial file and keeps any earlier
    complete shard of the same name untouched until the new one replaces it.
    """

    def __init__(self, path: str | pathlib.Path, source: Any):
        self.path = pathlib.Path(path)
        self.source = source
        # Named per process: a worker orphaned by a killed run may still be finishing this shard while a re-run
        # writes it again; each writes its own file and the renames are atomic (the contents are identical).
        self._tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        self._writer: Optional[ArrayRecordWriter] = None

    def __enter__(self) -> "ShardWriter":
        for name in (self.path.name, sidecar_path(self.path).name):  # left by a killed run
            for stale in self.path.parent.glob(f".{glob.escape(name)}.partial-*"):
                stale.unlink(missing_ok=True)
        self._writer = ArrayRecordWriter(str(self._tmp), WRITER_OPTIONS)
        return self

    def write(self, record: Record) -> None:
        self._writer.write(record.encode())

    def commit(self, stats: ShardStats) -> None:
        self._writer.close()
        self._writer = None
        side = sidecar_path(self.path)
        side_tmp = side.with_name(f".{side.name}.partial-{os.getpid()}")
        side_tmp.write_text(json.dumps({"written": stats.written, "skipped": dict(sorted(stats.skipped.items())),
                                        "recaption_fallbacks": stats.recaption_fallbacks,
                                        "source_sha256": source_digest(self.source)}, indent=1) + "\n")
        # Shard first, sidecar last: a crash in between leaves a shard without a sidecar, which `completed`
        # treats as unfinished, so the shard is rewritten rather than trusted.
        os.replace(self._tmp, self.path)
        os.replace(side_tmp, side)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._writer is not None:  # not committed
            self._writer.close()
            self._writer = None
            self._tmp.unlink(missing_ok=True)
