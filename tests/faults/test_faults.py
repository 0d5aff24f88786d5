"""The short fault suite (benchmarks/faults.py runs the long one): the binary on grain data killed during an
asynchronous save and after a later one, a corrupted checkpoint, a full disk, NaN gradients. Every process is
killed by its process group at the end, also when a test fails."""

import json
import signal
import time

import pytest

from openvision_max.faults import harness


@pytest.fixture
def trainers():
    started: list[harness.Trainer] = []
    yield started
    for t in started:
        t.stop()


def test_kills_a_corrupt_checkpoint_and_a_full_disk_lose_no_record(tmp_path, trainers):
    """One clean run (12 steps, a checkpoint every 4) against: the same run SIGKILLed while its first save is
    being written, restarted, SIGKILLed again after its step-8 checkpoint, that checkpoint's biggest array file
    truncated, restarted; and the same run on a disk that fills up during its second save, restarted once space
    is freed. Both end on the clean run's final loss bitwise, every step on the clean run's records."""
    data = harness.demo_digits(tmp_path / "demo")

    def trainer(name, **faults):
        args = harness.run_args(data, tmp_path / "runs", name, steps=12, period=4)
        t = harness.Trainer(args, tmp_path / f"{name}.keys", tmp_path / f"{name}.log", faults)
        trainers.append(t)
        return t.start()

    assert trainer("clean").wait() == 0
    clean = harness.final_loss(tmp_path / "runs" / "clean", 12)
    run = tmp_path / "runs" / "faulty"

    first = trainer("faulty", slow_save_s=30)  # the meta item of every save waits 30 s
    assert first.wait_until(lambda: 4 in harness.checkpoint_dirs(run)[1])
    time.sleep(0.5)
    first.kill(signal.SIGKILL)
    first.wait()
    assert harness.checkpoint_dirs(run)[0] == []  # killed between the save's start and its finalisation

    second = trainer("faulty")
    assert second.wait_until(lambda: 8 in harness.checkpoint_dirs(run)[0] and harness.logged_step(second, 9)())
    second.kill(signal.SIGKILL)
    second.wait()
    assert "resuming" not in second.output()  # nothing complete to resume from
    harness.truncate_an_array_file(run / "checkpoints" / "8")

    third = trainer("faulty")
    assert third.wait() == 0, third.output()[-3000:]
    out = third.output()
    assert "warning: checkpoint 8 is unusable: " in out and "resuming from checkpoint step 4" in out
    assert (run / "checkpoints" / "8.unusable" / "restore-error.txt").is_file()
    assert harness.final_loss(run, 12) == clean  # bitwise
    faulty = harness.account(tmp_path / "faulty.keys", tmp_path / "clean.keys", 12)
    assert (faulty.repeated, faulty.missing, faulty.same_batches) == (0, 0, True)
    assert faulty.lost_steps >= 4 + 9 - 4  # the first attempt's steps, and the second's beyond step 4

    # A full disk: room for one checkpoint and a half, so the step-8 save fails part-way.
    if why := harness.can_mount_tmpfs():
        pytest.skip(f"cannot mount a tmpfs here: {why}")
    args = harness.run_args(data, tmp_path / "full", "disk", steps=12, period=4)
    size = int(1.5 * harness.tree_bytes(tmp_path / "runs" / "clean" / "checkpoints" / "4")) + (1 << 20)
    codes = harness.disk_full_session(args, tmp_path / "full", size, tmp_path / "kept", tmp_path / "disk.log",
                                      tmp_path / "disk.keys")
    log = (tmp_path / "disk.log").read_text()
    assert codes == [1, 0], log[-3000:]
    line = next(ln for ln in log.splitlines() if ln.startswith("train.py: checkpoint 8 could not be written"))
    assert "no space left on device" in line and "the last complete checkpoint (step 4) is intact" in line
    assert "Traceback" not in log and "resuming from checkpoint step 4" in log
    assert harness.final_loss(tmp_path / "kept" / "disk", 12) == clean
    disk = harness.account(tmp_path / "disk.keys", tmp_path / "clean.keys", 12)
    assert (disk.repeated, disk.missing, disk.same_batches) == (0, 0, True)


def test_nan_gradients_are_skipped_and_stop_the_run(tmp_path, trainers):
    """NaN gradients from step 3 on, max_nonfinite_steps=3: steps 3-5 are skipped (the step-4 checkpoint holds
    the step-2 parameters, all finite) and the run stops with the message and exit status 1."""
    args = harness.run_args("unused", tmp_path, "nan", steps=12, period=2,
                            extra=("dataset_type=synthetic", "vocab_size=128", "max_nonfinite_steps=3"))
    t = harness.Trainer(args, tmp_path / "nan.keys", tmp_path / "nan.log", {"nan_gradients": [3, 100]})
    trainers.append(t)
    assert t.start().wait() == 1
    last = t.output().strip().splitlines()[-1]
    assert last == ("train.py: stopping: 3 steps in a row had a non-finite loss or gradient (max_nonfinite_steps=3); "
                    "their updates were skipped and the last complete checkpoint holds the last good state")
    logged = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [int(m["nonfinite_in_a_row"]) for m in logged] == [0, 0, 1, 2, 3]

    saved = harness.saved_states(tmp_path / "nan")
    assert sorted(saved) == [2, 4]
    assert all(harness.all_finite(state) for state in saved.values())
    import jax
    import numpy as np
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), saved[2]["params"], saved[4]["params"])
    assert all(jax.tree.leaves(same))
