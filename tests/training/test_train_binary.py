"""`python train.py` end to end (one process): metrics, warnings, SIGTERM, multi-stage, relative paths."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from openvision_max.mesh.host_devices import xla_flags

from conftest import CONFIGS, ROOT

# The demo model with a small vocabulary: these tests check the binary's mechanics, and the 32,000-way
# caption head would dominate their time on two cores.
SMALL = ["dtype=float32", "vocab_size=512"]
# The demo's model on synthetic data at a small batch, without its zero-shot evals.
DEMO = [str(ROOT / "train.py"), str(CONFIGS / "demo.yml"), "dataset_type=synthetic", "evals=[]",
        "global_batch_size=16", *SMALL]
REQUIRED = {"step", "stage", "loss", "contrastive_loss", "caption_loss", "learning_rate", "temperature",
            "grad_norm", "step_time_s", "samples_per_s", "tflops_per_device", "mfu"}


def env(devices: int) -> dict:
    e = dict(os.environ)
    e["XLA_FLAGS"] = xla_flags(e.get("XLA_FLAGS"), devices)
    return e


def train(tmp_path, *args, devices=1, timeout=600):
    proc = subprocess.run([sys.executable, *DEMO, f"base_output_directory={tmp_path}", *args],
                          capture_output=True, text=True, cwd=ROOT, env=env(devices), timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_binary_writes_metrics_tensorboard_and_warnings(tmp_path):
    """The metric line (loss composition, progress and ETA), the warmup warning, TensorBoard events readable
    by TensorBoard, and the warning when a resume changes the learning-rate schedule. (Mesh-invariant losses:
    tests/training/test_step.py in-process, test_multihost.py for the binary; an exact resume after SIGKILL:
    test_multihost.py.)"""
    common = ["steps=5", "log_period=1", "warmup_steps=8"]
    out = train(tmp_path, "run_name=one", *common, devices=1).stdout
    one = metrics(tmp_path / "one")
    assert [m["step"] for m in one] == [1, 2, 3, 4, 5]
    for m in one:
        assert REQUIRED <= set(m) and 0 < m["mfu"] <= 1
        assert m["loss"] == pytest.approx(m["contrastive_loss"] + 2 * m["caption_loss"], rel=1e-5)
    assert out.count("loss = 1 x contrastive_loss + 2 x caption_loss") == 1
    assert out.count("warning: warmup_steps=8 >= steps=5 (stage main)") == 1
    assert "step 5 [main 5/5, eta 0m00s] loss=" in out and "step 2 [main 2/5, eta " in out
    run = tmp_path / "one"
    assert (run / "config.yml").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([m["loss"] for m in one])

    longer = train(tmp_path, "run_name=one", "steps=7", "log_period=1", "warmup_steps=8").stdout
    assert "resuming from checkpoint step 5" in longer
    lr = [m["learning_rate"] for m in metrics(run) if m["step"] == 6][0]
    assert (f"warning: the learning-rate schedule changed at resume (steps 5 -> 7): at step 6 of stage main the "
            f"learning rate is {lr:.4g}, the run as it began would have used ") in longer


def test_sigterm_saves_and_exits_zero(tmp_path):
    cmd = [sys.executable, *DEMO, f"base_output_directory={tmp_path}", "run_name=term", "steps=100000",
           "checkpoint_period=100000", "log_period=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 300
    while (not log.exists() or len(log.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    saved = [int(p.name) for p in (tmp_path / "term" / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 3 <= saved[0] < 100000
    assert f"saved checkpoint at step {saved[0]}" in out


def two_stage_config(tmp_path):
    config = tmp_path / "two.yml"
    config.write_text(
        f"base_config: {CONFIGS / 'demo.yml'}\n"
        "dataset_type: synthetic\n"
        "evals: []\n"
        "global_batch_size: 16\n"
        "log_period: 1\n"
        "stages:\n"
        "  - {name: low, image_size: 32, steps: 12, base_lr: 0.256, warmup_steps: 2}\n"
        "  - {name: high, image_size: 48, steps: 3, base_lr: 0.0016, warmup_steps: 0}\n")
    return config


def train_config(config, tmp_path, *args):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), str(config), f"base_output_directory={tmp_path}",
                           *SMALL, *args], capture_output=True, text=True, cwd=ROOT, env=env(1), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory):
    """(config, output directory) with the run `straight`: both stages uninterrupted."""
    out = tmp_path_factory.mktemp("stages")
    config = two_stage_config(out)
    train_config(config, out, "run_name=straight")
    return config, out


def test_two_stages_continue_from_the_first(two_stage_run):
    config, tmp_path = two_stage_run
    train_config(config, tmp_path, "run_name=fresh", "stage=high")  # stage 2 from scratch
    fresh = metrics(tmp_path / "fresh")
    rows = metrics(tmp_path / "straight")
    low = [m for m in rows if m["stage"] == "low"]
    high = [m for m in rows if m["stage"] == "high"]
    assert [m["step"] for m in high] == [13, 14, 15]
    print(f"low: {low[0]['loss']:.3f} -> {low[-1]['loss']:.3f}; high starts at {high[0]['loss']:.3f}; "
          f"high from scratch starts at {fresh[0]['loss']:.3f}")
    # Same data, same step: starting from the first stage's parameters beats a fresh init by at least half of
    # what the first stage learned.
    assert high[0]["loss"] < fresh[0]["loss"] - 0.5 * (low[0]["loss"] - low[-1]["loss"])


def test_restart_between_stages_starts_the_next_from_the_checkpoint(two_stage_run):
    config, tmp_path = two_stage_run
    train_config(config, tmp_path, "run_name=split", "stage=low")  # as if stopped after stage 1
    out = train_config(config, tmp_path, "run_name=split")
    assert "stage low: already complete" in out
    split = [m for m in metrics(tmp_path / "split") if m["stage"] == "high"]
    straight = [m for m in metrics(tmp_path / "straight") if m["stage"] == "high"]
    assert [m["loss"] for m in split] == [m["loss"] for m in straight]  # bitwise: same parameters, same data


def test_relative_output_directory_checkpoints_and_prints_an_absolute_path(tmp_path):
    """`make demo` runs with base_output_directory=runs (relative); orbax needs absolute paths."""
    proc = subprocess.run([sys.executable, *DEMO, "base_output_directory=runs", "run_name=rel", "steps=2",
                           "log_period=1"], capture_output=True, text=True, cwd=tmp_path, env=env(1), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "rel" / "checkpoints" / "2").is_dir()
    assert f"run directory: {tmp_path / 'runs' / 'rel'}" in proc.stdout
