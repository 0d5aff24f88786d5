"""The fault table: a tiny grain-fed run of `train.py` under each fault, against a clean run of the same config.

    python benchmarks/faults.py [--seed 0] [--kills 10] [--terms 3] [--fuzz 1000] [--work-dir DIR]

Rows: SIGKILL at random wall-clock points (every other attempt with saves slowed to 1 s each, so that kills land
inside them too) and SIGTERM
at random points, each followed by a restart with the same command; a checkpoint corrupted after completion
(a truncated array file; a deleted meta/; every checkpoint); a disk that fills during a save (a tmpfs in a
mount namespace); NaN gradients (skipped, then the stop); a shard with 10% corrupt records; generated bad
configs. Columns: trials, survived, steps lost (run again after a restart), records read twice or never (by
key, against the clean run), final loss equal to the clean run's. A few minutes on two cores; not in
`make test` (tests/faults/test_faults.py is the short version).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openvision_max.faults import harness  # noqa: E402

STEPS, PERIOD = 48, 4  # long enough that a signal 0-2 s after an attempt's first step lands before its end


class Table:
    def __init__(self):
        self.rows: list[tuple] = []

    def add(self, *row) -> None:
        self.rows.append(row)
        print("| " + " | ".join(str(c) for c in row) + " |", flush=True)

    def markdown(self) -> str:
        head = ("fault", "trials", "survived", "steps lost", "records twice / never", "final loss = clean", "note")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in self.rows])


class Bench:
    def __init__(self, work: pathlib.Path, seed: int):
        self.work, self.rng = work, random.Random(seed)
        self.data = harness.demo_digits(work / "demo")
        self.started: list[harness.Trainer] = []
        self.clean = self.trainer("clean")
        assert self.clean.start().wait() == 0, self.clean.output()[-2000:]
        self.clean_loss = harness.final_loss(work / "runs" / "clean", STEPS)

    def trainer(self, name: str, extra: tuple[str, ...] = (), **faults) -> harness.Trainer:
        t = harness.Trainer(harness.run_args(self.data, self.work / "runs", name, steps=STEPS, period=PERIOD,
                                             extra=extra), self.work / f"{name}.keys", self.work / f"{name}.log",
                            faults)
        self.started.append(t)
        return t

    def outcome(self, name: str) -> tuple[int, str, bool]:
        acc = harness.account(self.work / f"{name}.keys", self.work / "clean.keys", STEPS)
        same = harness.final_loss(self.work / "runs" / name, STEPS) == self.clean_loss
        return acc.lost_steps, f"{acc.repeated} / {acc.missing}", same and acc.same_batches

    def signals(self, name: str, sig: int, trials: int, **faults) -> tuple:
        """`trials` signals at random points of successive attempts, then a last attempt to the end."""
        phases, survived = [], 0
        for trial in range(trials):
            t = self.trainer(name, **(faults if trial % 2 == 0 else {})).start()
            if not t.wait_until(lambda: "\nstep " in t.output(), timeout=300):
                break  # finished (or failed) before training started
            time.sleep(self.rng.uniform(0, 2.0))
            if t.proc.poll() is not None:
                t.wait()
                break  # the run ended first: no more trials
            phases.append("in a save" if harness.checkpoint_dirs(self.work / "runs" / name)[1] else "between saves")
            t.kill(sig)
            code = t.wait()
            survived += code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
        last = self.trainer(name).start()
        ok = last.wait() == 0
        lost, records, same = self.outcome(name)
        note = ", ".join(f"{phases.count(p)} {p}" for p in sorted(set(phases)))
        return len(phases), survived if ok else 0, lost, records, "yes" if same else "no", note

    def corrupted(self, name: str, damage) -> tuple:
        t = self.trainer(name).start()
        run = self.work / "runs" / name
        t.wait_until(lambda: 8 in harness.checkpoint_dirs(run)[0] and harness.logged_step(t, 9)())
        t.kill()
        t.wait()
        damage(run / "checkpoints" / "8")
        again = self.trainer(name).start()
        code = again.wait()
        said = "checkpoint 8 is unusable" in again.output() and "resuming from checkpoint step 4" in again.output()
        lost, records, same = self.outcome(name)
        return 1, int(code == 0 and said), lost, records, "yes" if same else "no", "fell back to step 4" if said \
            else again.output()[-300:]

    def all_corrupted(self) -> tuple:
        name = "corrupt-all"
        t = self.trainer(name).start()
        run = self.work / "runs" / name
        t.wait_until(lambda: 4 in harness.checkpoint_dirs(run)[0] and harness.logged_step(t, 5)())
        t.kill()
        t.wait()
        for step in harness.checkpoint_dirs(run)[0]:
            shutil.rmtree(run / "checkpoints" / str(step) / "meta")
        again = self.trainer(name).start()
        code = again.wait()
        last = again.output().strip().splitlines()[-1]
        ok = code == 2 and last.startswith("train.py: checkpoint error: no usable checkpoint")
        return 1, int(ok), "-", "-", "-", "exit 2: no usable checkpoint, not started over" if ok else last[:200]

    def disk_full(self) -> tuple:
        if why := harness.can_mount_tmpfs():
            return 0, 0, "-", "-", "-", f"not run: cannot mount a tmpfs ({why})"
        args = harness.run_args(self.data, self.work / "full", "disk", steps=STEPS, period=PERIOD)
        size = int(1.5 * harness.tree_bytes(self.work / "runs" / "clean" / "checkpoints" / str(STEPS))) + (1 << 20)
        codes = harness.disk_full_session(args, self.work / "full", size, self.work / "kept", self.work / "disk.log",
                                          self.work / "disk.keys")
        log = (self.work / "disk.log").read_text()
        said = any(ln.startswith("train.py: checkpoint ") and "no space left on device" in ln
                   for ln in log.splitlines())
        acc = harness.account(self.work / "disk.keys", self.work / "clean.keys", STEPS)
        same = harness.final_loss(self.work / "kept" / "disk", STEPS) == self.clean_loss and acc.same_batches
        return 1, int(codes == [1, 0] and said), acc.lost_steps, f"{acc.repeated} / {acc.missing}", \
            "yes" if same else "no", f"exit statuses {codes}, one line, resumed"

    def nan(self, count: int) -> tuple:
        name = f"nan-{count}"
        t = self.trainer(name, extra=("max_nonfinite_steps=3",), nan_gradients=[5, count]).start()
        code = t.wait()
        saved = harness.saved_states(self.work / "runs" / name)
        finite = bool(saved) and all(harness.all_finite(state) for state in saved.values())
        stopped = "stopping: 3 steps in a row had a non-finite" in t.output()
        ok = (code == 1 and stopped) if count >= 3 else (code == 0 and not stopped)
        what = "stopped after 3 in a row, exit 1" if count >= 3 else f"{count} updates skipped, run finished"
        what += f"; checkpoints {sorted(saved)} all finite" if finite else "; a checkpoint holds NaN"
        return 1, int(ok and finite), "-", "-", "-", what


def corrupt_shard(work: pathlib.Path, data: pathlib.Path) -> tuple:
    """The digits shard rewritten with every tenth record damaged (truncated image, bad UTF-8, cut msgpack):
    one pass of the pipeline's stream counts each kind exactly; two epochs through the binary do not crash."""
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    from openvision_max.config import load_config
    from openvision_max.data import grain_pipeline, records
    from openvision_max.data.shards import WRITER_OPTIONS

    src = sorted(data.glob("*.array_record"))
    out = work / "corrupt-shard"
    out.mkdir(parents=True, exist_ok=True)
    want = {"truncated_record": 0, "non_utf8_text": 0, "undecodable_image": 0}
    writer = ArrayRecordWriter(str(out / "corrupt-00000-of-00001.array_record"), WRITER_OPTIONS)
    index = 0
    for path in src:
        reader = ArrayRecordReader(str(path))
        for raw in reader.read_all():
            kind = index % 30
            if kind == 0:
                raw, key = raw[: len(raw) // 2], "truncated_record"
            elif kind == 10:
                rec = records.Record.decode(raw)
                rec.alt_text, key = b"\xff\xfe bad", "non_utf8_text"
                raw = rec.encode()
            elif kind == 20:
                rec = records.Record.decode(raw)
                rec.image, key = rec.image[:40], "undecodable_image"
                raw = rec.encode()
            else:
                key = None
            if key:
                want[key] += 1
            writer.write(raw)
            index += 1
        reader.close()
    writer.close()
    cfg = load_config([str(ROOT / "configs" / "base.yml"), *harness.MODEL, "vocab_size=32000", "dataset_type=grain",
                       f"train_data=[{out}]", "grain_worker_count=0"], platform="cpu", num_devices=1)
    stream = iter(grain_pipeline.example_stream(cfg, [str(p) for p in out.glob("*.array_record")],
                                                process_index=0, process_count=1, augment=False))
    seen: dict[str, int] = {}
    for _ in range(index):  # one epoch: every record once
        example = next(stream)
        if "skipped" in example:
            seen[example["skipped"]] = seen.get(example["skipped"], 0) + 1
    exact = seen == want
    t = harness.Trainer(harness.run_args(out, work / "runs", "corrupt-shard", steps=2 * index // 8, period=1000),
                        work / "corrupt-shard.keys", work / "corrupt-shard.log")
    code = t.start().wait()
    note = f"injected {want}, one epoch counted {seen}; 2 epochs through train.py: exit {code}"
    return 1, int(exact and code == 0), "-", "-", "-", note


def fuzz(examples: int) -> tuple:
    env = {**os.environ, "OPENVISION_FUZZ_EXAMPLES": str(examples)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
                           str(ROOT / "tests" / "config" / "test_fuzz.py")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=3600)
    summary = [ln.strip("= ") for ln in proc.stdout.splitlines() if "passed" in ln or "failed" in ln]
    note = f"tests/config/test_fuzz.py: exit status {proc.returncode}" + (f", {summary[-1]}" if summary else "")
    return examples, examples if proc.returncode == 0 else 0, "-", "-", "-", note


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/faults.py", description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0, help="seed of the random kill points")
    p.add_argument("--kills", type=int, default=10, help="SIGKILL points")
    p.add_argument("--terms", type=int, default=3, help="SIGTERM points")
    p.add_argument("--fuzz", type=int, default=1000, help="generated bad configs and command lines")
    p.add_argument("--work-dir", default="", help="where the runs go (default: a temporary directory, removed)")
    args = p.parse_args(argv)
    work = pathlib.Path(args.work_dir or tempfile.mkdtemp(prefix="faults-"))
    # A SIGTERM to this driver still stops the runs it started (they have sessions of their own).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    table = Table()
    bench = Bench(work, args.seed)
    try:
        table.add("SIGKILL at random points, restart", *bench.signals("kill", signal.SIGKILL, args.kills,
                                                                      slow_save_s=1))
        table.add("SIGTERM at random points, restart", *bench.signals("term", signal.SIGTERM, args.terms))
        table.add("checkpoint: array file truncated", *bench.corrupted("trunc", harness.truncate_an_array_file))
        table.add("checkpoint: meta/ deleted", *bench.corrupted("nometa", lambda d: shutil.rmtree(d / "meta")))
        table.add("checkpoint: every one unreadable", *bench.all_corrupted())
        table.add("disk full during a save", *bench.disk_full())
        table.add("NaN gradients for 2 steps", *bench.nan(2))
        table.add("NaN gradients from step 5 on", *bench.nan(1000))
        table.add("shard with 10% corrupt records", *corrupt_shard(work, bench.data))
        table.add("generated bad configs (hypothesis)", *fuzz(args.fuzz))
    finally:
        for t in bench.started:
            t.stop()
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
