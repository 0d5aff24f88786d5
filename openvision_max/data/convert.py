"""Convert image-text data into openvision-max's ArrayRecord shards (see `records.py`).

    python -m openvision_max.data.convert --format webdataset --input 'recap/*.tar' --output DIR
    python -m openvision_max.data.convert --format table --input pairs.parquet --output DIR
    python -m openvision_max.data.convert --format imagefolder --input imagenet/val --output DIR

Inputs are paths, brace patterns (`{00000..00099}`, `{a,b}`: `patterns.py`) and shell globs. Every usage
problem (a pattern matching no file, an input that cannot be opened, a missing table column, an output that
cannot be written, an output that already holds a dataset of another source) is reported as one line on stderr
with exit status 2 before anything is written. Bad samples are skipped and counted by reason
(`sources.sample`), never fatal. Shards are written atomically with sidecars (`shards.py`), in parallel over a
process pool, so a re-run after an interruption only writes what is missing (and says how many shards it
reused) and still reports the totals of the whole dataset. dataset.json records the source (format, resolved
inputs, the options that shape the records); another source is refused unless `--overwrite`, which removes the
dataset already there first. The last line on stdout is one JSON object:
`{"written": N, "skipped": {"<reason>": count, ...}}`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import pathlib
import sys
import tempfile
from typing import Optional, Sequence

from tqdm import tqdm

from openvision_max.data.patterns import PatternError, match
from openvision_max.data.records import INFO_FILE, DatasetInfo, RecordError
from openvision_max.data.shards import ShardStats, ShardWriter, completed, written_files
from openvision_max.data.sources import imagefolder, table, webdataset
from openvision_max.data.sources.sample import Job, Plan, UsageError, to_record

SOURCES = {"webdataset": webdataset, "table": table, "imagefolder": imagefolder}
TABLE_ROLES = ("image", "alt_text", "recaption", "key")  # --<role>-column
# Off a terminal every redraw of the progress bar is a new line of the log: at most this many, then the final one.
LOG_PROGRESS_LINES = 20


def expand_inputs(patterns: Sequence[str], want_dir: bool = False) -> list[pathlib.Path]:
    """Paths named by brace/glob patterns (`patterns.match`), in pattern order, without repeats."""
    paths: dict[pathlib.Path, None] = {}
    for pattern in patterns:
        try:
            matches = match(pattern, recursive=True)
        except PatternError as e:
            raise UsageError(str(e)) from None
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


def record_options(args: argparse.Namespace) -> dict:
    """The options of `args.format` that shape the records or the shards, by argparse name (`recaption_field`
    is `--recaption-field`): what, besides the format and the inputs, makes a source "another source"."""
    if args.format == "webdataset":
        return {"prefix": args.prefix, "recaption_field": args.recaption_field}
    options = {"prefix": args.prefix, "records_per_shard": args.records_per_shard}
    if args.format == "table":
        options |= {f"{role}_column": getattr(args, f"{role}_column") for role in TABLE_ROLES}
    return options


def make_plan(fmt: str, options: dict, inputs: list[pathlib.Path]) -> Plan:
    if fmt == "webdataset":
        return webdataset.plan(inputs, options["prefix"], options["recaption_field"])
    if fmt == "table":
        columns = {role: options[f"{role}_column"] for role in TABLE_ROLES}
        return table.plan(inputs, options["prefix"], options["records_per_shard"], columns)
    return imagefolder.plan(inputs, options["prefix"], options["records_per_shard"])


def _input_difference(old: list[str], new: list[str]) -> Optional[str]:
    added = [p for p in new if p not in old]
    if added:
        return f"{added[0]} is not among its {len(old)} inputs"
    removed = [p for p in old if p not in new]
    if removed:
        return f"its {len(old)} inputs include {removed[0]}, not given now"
    return "its inputs in another order" if old != new else None


def source_difference(old: DatasetInfo, new: DatasetInfo) -> Optional[str]:
    """How `new`'s source differs from the one `old` (an existing dataset.json) was made from; None if it does
    not. A dataset.json from before `inputs` was recorded can only be compared by format and shard names."""
    if old.source_format != new.source_format:
        return f"format {old.source_format}, now {new.source_format}"
    if old.inputs is None:
        def shards(names: list[str]) -> str:
            return f"{len(names)} shards from {names[0]}" if names else "no shards"
        return None if old.shards == new.shards else f"{shards(old.shards)}, now {shards(new.shards)}"
    for key in sorted(old.options.keys() | new.options.keys()):
        was, now = old.options.get(key), new.options.get(key)
        if was != now:
            return f"--{key.replace('_', '-')} {json.dumps(was)}, now {json.dumps(now)}"
    return _input_difference(old.inputs, new.inputs)


def existing_dataset(directory: pathlib.Path, overwrite: bool) -> Optional[DatasetInfo]:
    """The dataset.json already in `directory`, if any; one that cannot be read is a UsageError unless it is to
    be overwritten anyway (then None: the sidecars still tell which shards were written)."""
    try:
        return DatasetInfo.read(directory)
    except (OSError, ValueError, TypeError) as e:
        if overwrite:
            return None
        raise UsageError(f"cannot read {directory / INFO_FILE} ({e}); pass --overwrite to replace it") from None


def check_source(directory: pathlib.Path, old: Optional[DatasetInfo], wanted: DatasetInfo) -> None:
    """UsageError if `directory` holds a dataset (`old`) made from another source than `wanted`'s."""
    difference = source_difference(old, wanted) if old is not None else None
    if difference:
        raise UsageError(f"{directory} already holds a dataset converted from another source ({difference}); "
                         "pass --overwrite to replace it")


def remove_dataset(directory: pathlib.Path, old: Optional[DatasetInfo]) -> None:
    """Remove what earlier conversions wrote into `directory` (`shards.written_files`), dataset.json first, so
    that the directory never claims shards that are gone. Other files stay."""
    for path in written_files(directory, old.shards if old else []):
        path.unlink(missing_ok=True)


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


class Progress:
    """A tqdm bar over shards that shows the records written so far.

    On a terminal tqdm redraws one line in place. Anywhere else (a log, CI) each redraw is a new line, and tqdm
    drew after an update, again on every `set_postfix` and once more on `close`, so the final state came out
    two or three times and each shard took two lines. There the bar draws only on its own schedule: once at the
    start, every 1/LOG_PROGRESS_LINES of the shards, and the final state once, from `close`.
    """

    def __init__(self, total: int, done: int, written: int, enabled: bool):
        self.tty = sys.stderr.isatty()
        self.step = max(1, math.ceil(total / LOG_PROGRESS_LINES))
        # mininterval/maxinterval = inf: tqdm's own time-based redraws (update's and its monitor thread's) never fire.
        quiet = {} if self.tty else {"mininterval": math.inf, "maxinterval": math.inf}
        self.bar = tqdm(total=total, initial=done, unit="shard", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=self.tty, postfix={"written": written}, **quiet)

    def advance(self, written: int) -> None:
        self.bar.set_postfix(written=written, refresh=False)  # shown by the draw that follows, not a draw itself
        self.bar.update(1)
        n = self.bar.n
        if not self.tty and n % self.step == 0 and n < self.bar.total:  # the final draw is close()'s
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def split_done(output_dir: pathlib.Path, jobs: list[Job]) -> tuple[ShardStats, list[Job]]:
    """The totals of the jobs whose shards are already complete, and the jobs still to convert."""
    total, pending = ShardStats(), []
    for job in jobs:
        done = completed(output_dir / job.shard, job.source)
        if done is None:
            pending.append(job)
        else:
            total.add(done)
    return total, pending


def run_jobs(fmt: str, output_dir: pathlib.Path, jobs: list[Job], workers: int,
             progress: bool) -> tuple[ShardStats, int]:
    """Convert every job whose shard is not already complete; the totals cover all jobs. Also returns how many
    shards were reused."""
    total, pending = split_done(output_dir, jobs)
    # Nothing to convert: no bar, whose start and close would both draw the final state; the caller says so.
    bar = Progress(len(jobs), len(jobs) - len(pending), total.written, enabled=progress and bool(pending))

    def finished(stats: ShardStats) -> None:
        total.add(stats)
        bar.advance(total.written)

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
    return total, len(jobs) - len(pending)


def reuse_line(reused: int, converted: int) -> Optional[str]:
    """What a re-run says about the shards it did not redo; None when it reused none."""
    if not reused:
        return None
    shards = f"{reused} shard{'' if reused == 1 else 's'} reused"
    return f"resumed: {shards}, {converted} converted" if converted else f"up to date: {shards}"


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
    p.add_argument("--overwrite", action="store_true",
                   help="replace the dataset already in --output (its shards, sidecars and dataset.json) and "
                        "convert from scratch, instead of refusing another source or resuming")
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.records_per_shard < 1:
        p.error("--records-per-shard must be at least 1")
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be at least 1")
    for template in args.templates:
        if template.count("{}") != 1:
            p.error(f"--template {template!r} must hold exactly one {{}}")


def prepare(args: argparse.Namespace) -> tuple[Plan, DatasetInfo]:
    """The plan and the dataset.json to write (counts still zero), after every check that can fail on usage;
    with --overwrite, the old dataset is removed last, once nothing can stop the conversion any more."""
    inputs = expand_inputs(args.input, want_dir=args.format == "imagefolder")
    options = record_options(args)
    plan = make_plan(args.format, options, inputs)
    check_output(args.output)
    info = DatasetInfo(source_format=args.format, shards=[j.shard for j in plan.jobs], classes=plan.classes,
                       templates=args.templates, inputs=[str(p.resolve()) for p in inputs], options=options)
    old = existing_dataset(args.output, args.overwrite)
    if args.overwrite:
        remove_dataset(args.output, old)
    else:
        check_source(args.output, old, info)
    return plan, info


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    check_args(p, args)
    try:
        plan, info = prepare(args)
    except UsageError as e:
        p.exit(2, f"{p.prog}: error: {' '.join(str(e).split())}\n")  # one line even if a library's message is not
    workers = args.workers or len(os.sched_getaffinity(0))
    try:
        total, reused = run_jobs(args.format, args.output, plan.jobs, workers, progress=not args.quiet)
    except OSError as e:  # e.g. a full disk: finished shards stay, a re-run resumes
        p.exit(1, f"{p.prog}: error: {e}\n")
    info.num_records, info.recaption_fallbacks = total.written, total.recaption_fallbacks
    info.skipped = dict(sorted(total.skipped.items()))
    info.write(args.output)
    foreign = sorted({f.name for f in args.output.glob("*.array_record")} - set(info.shards))
    if foreign:  # e.g. from an earlier conversion with another shard count; readers go by dataset.json
        print(f"{p.prog}: warning: {len(foreign)} shard files in {args.output} are not part of this dataset "
              f"(not listed in {INFO_FILE}), e.g. {foreign[0]}", file=sys.stderr)
    line = reuse_line(reused, len(plan.jobs) - reused)
    if line:
        print(line, file=sys.stderr, flush=True)
    print(json.dumps({"written": total.written, "skipped": info.skipped}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
