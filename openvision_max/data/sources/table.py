"""CSV or Parquet tables of image-text pairs.

Columns (names configurable): the image, as a path relative to the table file's directory or absolute, or
(Parquet) the encoded bytes themselves, or a Hugging Face `Image` struct `{bytes, path}`; the alt-text; the
recaption (optional: `recaption_column=''` means the table has none, so every recaption falls back to the
alt-text); and optionally a key column. Without one the key is the row index, prefixed with the file name
(`part-1.parquet:17`) when several tables are converted together, so keys stay unique.

The rows of all tables, in the order given, are cut into output shards of `records_per_shard`; a job reads
only its rows (Parquet: only the row groups that hold them). CSV text is read as bytes so that one row of
invalid UTF-8 is skipped and counted instead of failing the whole file.
"""

from __future__ import annotations

import functools
import os
import pathlib
from typing import Any, Iterator, Optional, Sequence

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from openvision_max.data.records import RecordError, shard_name
from openvision_max.data.sources.sample import Job, Plan, Sample, UsageError

SUFFIXES = (".csv", ".parquet")


def _columns(path: pathlib.Path) -> tuple[list[str], int]:
    """The column names and row count of a table; UsageError if it cannot be read."""
    try:
        if path.suffix == ".parquet":
            meta = pq.ParquetFile(path).metadata
            return list(meta.schema.to_arrow_schema().names), meta.num_rows
        names = pa_csv.open_csv(path).schema.names
        # Count rows over one column read as bytes: no type inference, nothing decoded.
        convert = pa_csv.ConvertOptions(column_types={names[0]: pa.binary()}, include_columns=names[:1])
        return names, pa_csv.read_csv(path, convert_options=convert).num_rows
    except (OSError, pa.ArrowException) as e:
        raise UsageError(f"cannot read table {path}: {e}") from None


def plan(inputs: Sequence[pathlib.Path], prefix: str, records_per_shard: int, columns: dict[str, str]) -> Plan:
    """`columns` maps image/alt_text/recaption/key to column names; '' for recaption and key means none."""
    files = []
    for path in inputs:
        if path.suffix not in SUFFIXES:
            raise UsageError(f"unsupported table file {path}: expected a .csv or .parquet file")
        names, rows = _columns(path)
        for role, name in columns.items():
            if name and name not in names:
                raise UsageError(f"table {path} has no {role} column {name!r} (columns: {', '.join(names)})")
        st = path.stat()
        files.append(({"table": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}, rows))
    total = sum(rows for _, rows in files)
    n = max(1, -(-total // records_per_shard))
    jobs = []
    for i in range(n):
        lo, hi = i * records_per_shard, min(total, (i + 1) * records_per_shard)
        segments, base = [], 0
        for meta, rows in files:
            a, b = max(lo, base), min(hi, base + rows)
            if a < b:
                segments.append({**meta, "start": a - base, "stop": b - base})
            base += rows
        source = {"segments": segments, "columns": columns, "prefix_keys": len(files) > 1}
        jobs.append(Job(shard_name(prefix, i, n), source))
    return Plan(jobs)


@functools.lru_cache(maxsize=2)
def _read_csv(path: str, names: tuple[str, ...]) -> pa.Table:
    # A worker usually converts consecutive chunks of one CSV: reading it once per process is enough.
    convert = pa_csv.ConvertOptions(column_types={n: pa.binary() for n in names}, include_columns=list(names))
    return pa_csv.read_csv(path, convert_options=convert)


def _read_rows(path: str, names: list[str], start: int, stop: int) -> pa.Table:
    if path.endswith(".csv"):
        return _read_csv(path, tuple(names)).slice(start, stop - start)
    pf = pq.ParquetFile(path)
    groups, first, base = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        rows = pf.metadata.row_group(g).num_rows
        if base < stop and base + rows > start:
            groups.append(g)
            first = base if first is None else first
        base += rows
    return pf.read_row_groups(groups, columns=names).slice(start - first, stop - start)


def _image(cell: Any, directory: pathlib.Path, from_csv: bool) -> Optional[bytes]:
    """The image bytes a cell stands for; None if there are none to be had."""
    if isinstance(cell, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
        cell = cell.get("bytes") or cell.get("path")
    if isinstance(cell, bytes) and from_csv:  # CSV cells are read as bytes; in a CSV they hold a path
        cell = os.fsdecode(cell)
    if isinstance(cell, bytes) or not cell:
        return cell or None
    path = directory / cell  # an absolute cell replaces the directory
    try:
        return path.read_bytes()
    except OSError:
        return None


def read(source: dict) -> Iterator[Sample | RecordError]:
    cols = source["columns"]
    roles = [r for r in ("image", "alt_text", "recaption", "key") if cols.get(r)]
    names = [cols[r] for r in roles]
    for seg in source["segments"]:
        path = seg["table"]
        from_csv = path.endswith(".csv")
        directory = pathlib.Path(path).parent
        table = _read_rows(path, list(dict.fromkeys(names)), seg["start"], seg["stop"])
        values = {r: table.column(cols[r]).to_pylist() for r in roles}
        for j in range(table.num_rows):
            row = seg["start"] + j
            if "key" in values:
                key = values["key"][j]
                key = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
            else:
                key = f"{pathlib.Path(path).name}:{row}" if source["prefix_keys"] else str(row)
            yield Sample(key=key, image=_image(values["image"][j], directory, from_csv),
                         alt_text=values["alt_text"][j],
                         recaption=values["recaption"][j] if "recaption" in values else None)
