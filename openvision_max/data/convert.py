"""Convert image-text data into openvision-max's ArrayRecord shards (see `records.py`).

    python -m openvision_max.data.convert --format webdataset --input 'recap/*.tar' --output DIR
    python -m openvision_max.data.convert --format table --input pairs.parquet --output DIR
    python -m openvision_max.data.convert --format imagefolder --input imagenet/val --output DIR

Every usage problem (a pattern matching no file, an input that cannot be opened, a missing table column, an
output that cannot be written) is reported as one line on stderr with exit status 2 before anything is
written. Bad samples are skipped and counted by reason (`sources.sample`), never fatal. Shards are written
atomically with sidecars (`shards.py`), in parallel over a process pool, so a re-run after an interruption
only writes what is missing and still reports the totals of the whole dataset. The last line on stdout is one
JSON object: `{"written": N, "skipped": {"<reason>": count, ...}}`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import multiprocessing
import os
import pathlib
import sys
import tempfile
from typing import Optional, Sequence

from tqdm import tqdm

from openvision_max.data.records import INFO_FILE, DatasetInfo, RecordError
from openvision_max.data.shards import ShardStats, ShardWriter, completed
from openvision_max.data.sources import imagefolder, table, webdataset
from openvision_max.data.sources.sample import Job, Plan, UsageError, to_record

SOURCES = {"webdataset": webdataset, "table": table, "imagefolder": imagefolder}


def expand_inputs(patterns: Sequence[str], want_dir: bool = False) -> list[pathlib.Path]:
    """Paths matched by shell-style patterns, sorted within a pattern, in pattern order, without repeats."""
    paths: dict[pathlib.Path, None] = {}
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.exists(m)]
        if not matches:
            raise UsageError(f"no file matches {pattern}")
        for m in matches:
            path = pathlib.Path(m)
            if path.is_dir() != want_dir:
                raise UsageError(f"{path} is {'not ' if want_dir else ''}a directory")
            if not os.access(path, os.R_OK):
                raise UsageError(f"cannot read {path}")
            paths.setdefault(path)
    return list(paths)


def check_output(directory: pathlib.Path) -> None:
    """Create the output directory if needed and prove it writable, without touching what is in it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as e:
        raise UsageError(f"cannot write to output directory {directory}: {e.strerror or e}") from None


def make_plan(args: argparse.Namespace, inputs: list[pathlib.Path]) -> Plan:
    if args.format == "webdataset":
        return webdataset.plan(inputs, args.prefix, args.recaption_field)
    if args.format == "table":
        columns = {"image": args.image_column, "alt_text": args.alt_text_column,
                   "recaption": args.recaption_column, "key": args.key_column}
        return table.plan(inputs, args.prefix, args.records_per_shard, columns)
    return imagefolder.plan(inputs, args.prefix, args.records_per_shard)


def convert_shard(fmt: str, output_dir: str, job: Job) -> ShardStats:
    """Write one output shard from its source; runs in a worker process."""
    stats = ShardStats()
    with ShardWriter(pathlib.Path(output_dir) / job.shard, job.source) as writer:
        for item in SOURCES[fmt].read(job.source):
            try:
                if isinstance(item, RecordError):
                    raise item
                record, fell_back = to_record(item)
            except RecordError as e:
                stats.skipped[e.reason] += 1
                continue
            writer.write(record)
            stats.written += 1
            stats.recaption_fallbacks += fell_back
        writer.commit(stats)
    return stats


def run_jobs(fmt: str, output_dir: pathlib.Path, jobs: list[Job], workers: int, progress: bool) -> ShardStats:
    """Convert every job whose shard is not already complete; the totals cover all jobs."""
    total, pending = ShardStats(), []
    for job in jobs:
        done = completed(output_dir / job.shard, job.source)
        if done is None:
            pending.append(job)
        else:
            total.add(done)
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(pending), unit="shard", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    bar.set_postfix(written=total.written)

    def finished(stats: ShardStats) -> None:
        total.add(stats)
        bar.update(1)
        bar.set_postfix(written=total.written)

    workers = max(1, min(workers, len(pending)))
    if workers == 1:  # in-process: no start-up cost, and tracebacks stay readable
        for job in pending:
            finished(convert_shard(fmt, str(output_dir), job))
    else:
        # spawn, not fork: the caller may be a process with threads (JAX, grain) that fork would copy mid-state.
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = [pool.submit(convert_shard, fmt, str(output_dir), job) for job in pending]
            try:
                for future in concurrent.futures.as_completed(futures):
                    finished(future.result())
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
    bar.close()
    return total


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block: the contract is one line + exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m openvision_max.data.convert",
                description="Convert webdataset tars, CSV/Parquet tables or an image folder into ArrayRecord "
                            "shards plus dataset.json. Prints one JSON line: "
                            '{"written": N, "skipped": {"<reason>": count}}.')
    p.add_argument("--format", required=True, choices=sorted(SOURCES), help="the source format")
    p.add_argument("--input", required=True, nargs="+", metavar="PATH_OR_GLOB",
                   help="input paths or shell globs (quote them): .tar files for webdataset, .csv/.parquet "
                        "files for table, one root directory for imagefolder")
    p.add_argument("--output", required=True, type=pathlib.Path, help="output directory (created if missing)")
    p.add_argument("--prefix", default="data", help="shard file name prefix (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: min(CPUs, shards to write))")
    p.add_argument("--records-per-shard", type=int, default=10_000,
                   help="table/imagefolder: records per output shard (default: %(default)s); webdataset "
                        "writes one output shard per input tar")
    p.add_argument("--recaption-field", default="re_caption",
                   help="webdataset: the .json field holding the recaption (default: %(default)s)")
    p.add_argument("--image-column", default="image",
                   help="table: image path (relative to the table's directory, or absolute) or image bytes "
                        "(default: %(default)s)")
    p.add_argument("--alt-text-column", default="alt_text", help="table: alt-text column (default: %(default)s)")
    p.add_argument("--recaption-column", default="recaption",
                   help="table: recaption column, '' if there is none (default: %(default)s)")
    p.add_argument("--key-column", default="", help="table: key column (default: the row index)")
    p.add_argument("--template", action="append", default=[], dest="templates",
                   help="a zero-shot prompt template with one {} to store in dataset.json (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.records_per_shard < 1:
        p.error("--records-per-shard must be at least 1")
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be at least 1")
    for template in args.templates:
        if template.count("{}") != 1:
            p.error(f"--template {template!r} must hold exactly one {{}}")
    try:
        inputs = expand_inputs(args.input, want_dir=args.format == "imagefolder")
        plan = make_plan(args, inputs)
        check_output(args.output)
    except UsageError as e:
        p.exit(2, f"{p.prog}: error: {' '.join(str(e).split())}\n")  # one line even if a library's message is not
    workers = args.workers or len(os.sched_getaffinity(0))
    try:
        total = run_jobs(args.format, args.output, plan.jobs, workers, progress=not args.quiet)
    except OSError as e:  # e.g. a full disk: finished shards stay, a re-run resumes
        p.exit(1, f"{p.prog}: error: {e}\n")
    skipped = dict(sorted(total.skipped.items()))
    DatasetInfo(source_format=args.format, num_records=total.written, shards=[j.shard for j in plan.jobs],
                classes=plan.classes, skipped=skipped, templates=args.templates,
                recaption_fallbacks=total.recaption_fallbacks).write(args.output)
    foreign = sorted({f.name for f in args.output.glob("*.array_record")} - {j.shard for j in plan.jobs})
    if foreign:  # e.g. from an earlier conversion with another shard count; readers go by dataset.json
        print(f"{p.prog}: warning: {len(foreign)} shard files in {args.output} are not part of this dataset "
              f"(not listed in {INFO_FILE}), e.g. {foreign[0]}", file=sys.stderr)
    print(json.dumps({"written": total.written, "skipped": skipped}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
