"""The demo's embedded data: made on first use, no download, converted like any other dataset.

    ensure_demo_data(root) -> {"shapes_train": path, "shapes_test": path, "digits_train": path, "digits_test": path}
    python -m openvision_max.data.demo_data --output DIR

Four dataset directories (ArrayRecord shards + dataset.json, written with the converter's `ShardWriter`):

    shapes_train   procedural coloured-shape scenes with alt-texts and recaptions (`demo_shapes`)
    shapes_test    held-out single shapes, one class per "<colour> <kind>", labelled; another seed
    digits_train   scikit-learn's handwritten digits (`demo_digits`), labelled, captioned
    digits_test    the stratified held-out 500 digits
The test sets' dataset.json carry `classes` and zero-shot `templates` for the evaluator.

Generation is deterministic (same sizes -> same bytes). Each set is built in a temporary directory beside its
final place and renamed into it, so a directory that exists is complete, and two processes racing to make it
both end up using one complete copy. A set is rebuilt only when its `source_format` (which names the generator
version and sizes) differs from what is asked for.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import time
import uuid
from typing import Callable, Iterator, Optional, Sequence

from openvision_max.data import demo_digits, demo_shapes
from openvision_max.data.records import DatasetInfo, Record, shard_name
from openvision_max.data.shards import ShardStats, ShardWriter

GENERATOR_VERSION = 5
SHAPES_TRAIN = 20_000
SHAPES_TEST_PER_CLASS = 50
RECORDS_PER_SHARD = 10_000
SHAPES_TRAIN_SEED, SHAPES_TEST_SEED, DIGITS_SPLIT_SEED = 0, 1, 0


def _write_set(directory: pathlib.Path, name: str, records: Iterator[Record], count: int,
               source_format: str, classes: list[str], templates: list[str]) -> None:
    """Write `count` records as shards of RECORDS_PER_SHARD plus dataset.json into `directory`."""
    n = max(1, -(-count // RECORDS_PER_SHARD))
    shards = [shard_name(name, i, n) for i in range(n)]
    written = 0
    for i, shard in enumerate(shards):
        stats = ShardStats()
        with ShardWriter(directory / shard, {"demo": source_format, "shard": i}) as writer:
            for _ in range(min(RECORDS_PER_SHARD, count - written)):
                writer.write(next(records))
                stats.written += 1
            writer.commit(stats)
        written += stats.written
    DatasetInfo(source_format=source_format, num_records=written, shards=shards, classes=classes,
                templates=templates).write(directory)


def _set_specs(shapes_train: int, shapes_test_per_class: int) -> dict[str, tuple[str, int, Callable, list, list]]:
    """name -> (source_format, count, records factory, classes, templates)."""
    v = f"demo-v{GENERATOR_VERSION}"
    n_test = shapes_test_per_class * len(demo_shapes.CLASSES)
    digits: Optional[tuple] = None

    def digit_split():
        nonlocal digits
        digits = digits or demo_digits.split(DIGITS_SPLIT_SEED)
        return digits

    return {
        "shapes_train": (f"{v}/shapes_train/n={shapes_train}", shapes_train,
                         lambda: demo_shapes.train_records(shapes_train, SHAPES_TRAIN_SEED), [], []),
        "shapes_test": (f"{v}/shapes_test/per_class={shapes_test_per_class}", n_test,
                        lambda: demo_shapes.heldout_records(shapes_test_per_class, SHAPES_TEST_SEED),
                        demo_shapes.CLASSES, demo_shapes.TEMPLATES),
        "digits_train": (f"{v}/digits_train", 1797 - demo_digits.TEST_SIZE,
                         lambda: demo_digits.records(*digit_split()[:2], "digits-train", 0), demo_digits.CLASSES, []),
        "digits_test": (f"{v}/digits_test", demo_digits.TEST_SIZE,
                        lambda: demo_digits.records(*digit_split()[2:], "digits-test", 1),
                        demo_digits.CLASSES, demo_digits.TEMPLATES),
    }


def _is_current(directory: pathlib.Path, source_format: str) -> bool:
    info = DatasetInfo.read(directory) if directory.is_dir() else None
    return info is not None and info.source_format == source_format


def _publish(tmp: pathlib.Path, final: pathlib.Path) -> None:
    """Move a finished set into place. A current set already there (a racer's) wins and `tmp` is left for the
    caller to delete; a stale one is moved aside and deleted. Renames are atomic, so readers never see half a set."""
    source_format = DatasetInfo.read(tmp).source_format
    for _ in range(3):  # a racer may move things between our steps; each round re-checks
        try:
            os.rename(tmp, final)  # fails if `final` exists and is not empty
            return
        except OSError:
            pass
        if _is_current(final, source_format):
            return
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        try:
            os.rename(final, old)
        except FileNotFoundError:
            continue
        shutil.rmtree(old, ignore_errors=True)
    raise OSError(f"could not move {tmp} into place at {final}")


def ensure_demo_data(root: str | pathlib.Path, shapes_train: int = SHAPES_TRAIN,
                     shapes_test_per_class: int = SHAPES_TEST_PER_CLASS,
                     log: Callable[[str], None] = lambda line: None) -> dict[str, pathlib.Path]:
    """The four demo dataset directories under `root`, generated where missing or stale."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (source_format, count, make, classes, templates) in _set_specs(shapes_train,
                                                                            shapes_test_per_class).items():
        final = root / name
        if not _is_current(final, source_format):
            start = time.perf_counter()
            tmp = root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()  # not mkdtemp: its mode 0700 would outlive the rename
            try:
                _write_set(tmp, name, make(), count, source_format, classes, templates)
                _publish(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed
            log(f"{name}: {count} records in {time.perf_counter() - start:.1f} s")
        paths[name] = final
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m openvision_max.data.demo_data",
        description="Generate the demo datasets (coloured shapes, handwritten digits) as ArrayRecord shards "
                    "under DIR, unless they are already there. Prints one JSON line: "
                    '{"written": N, "skipped": {}} with N the records of all four sets.')
    p.add_argument("--output", required=True, type=pathlib.Path, help="root directory of the demo datasets")
    p.add_argument("--shapes-train", type=int, default=SHAPES_TRAIN,
                   help="training scenes of shapes (default: %(default)s)")
    p.add_argument("--shapes-test-per-class", type=int, default=SHAPES_TEST_PER_CLASS,
                   help=f"held-out shapes per class, {len(demo_shapes.CLASSES)} classes (default: %(default)s)")
    args = p.parse_args(argv)
    if args.shapes_train < 1 or args.shapes_test_per_class < 1:
        p.exit(2, f"{p.prog}: error: --shapes-train and --shapes-test-per-class must be at least 1\n")
    try:
        paths = ensure_demo_data(args.output, args.shapes_train, args.shapes_test_per_class,
                                 log=lambda line: print(line, file=sys.stderr))
    except OSError as e:
        p.exit(2, f"{p.prog}: error: cannot write demo data under {args.output}: {e.strerror or e}\n")
    written = sum(DatasetInfo.read(path).num_records for path in paths.values())
    print(json.dumps({"written": written, "skipped": {}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
