"""`python train.py` as several JAX processes on this machine (2 processes x 4 CPU devices) against one
process with 8: the same losses and evals, one writer, each host resuming its own data position, a SIGTERM
to one host, a coordinator that never answers.

Every process a test starts is killed by its pid (or, for the launcher, its process group) at the end, also
when the test fails. The model is the suite's tiny one; the data a small grain dataset with three bad
records, so the two hosts' iterator states differ (a resume that swapped them would be seen).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from openvision_max.launch.local_cluster import child_env, free_port

from conftest import CONFIGS, ROOT, TINY
from photo_data import png, write_dataset

MESH = ["ici_data_parallelism=2", "ici_fsdp_parallelism=2", "ici_tensor_parallelism=2"]


@pytest.fixture
def processes():
    """Popen objects to kill (group-wise) when the test ends, however it ends."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def eval_set(directory):
    """Six noise images in three classes: a zero-shot eval whose figures depend on every parameter."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from openvision_max.data.records import Record, shard_name
    directory.mkdir()
    writer = ArrayRecordWriter(str(directory / shard_name("val", 0, 1)), "group_size:1")
    for i in range(6):
        writer.write(Record(f"v{i}", png(100 + i, size=(32, 32)), label=i % 3).encode())
    writer.close()
    return f"evals=[{{name: v, type: zeroshot, path: {directory}, class_names: [red, green, blue]}}]"


def config_args(tmp_path, run_name, *, bad=False, steps=10):
    """The tiny model on grain data in `tmp_path`: clean (each host's share of a batch is exactly the one
    process's batch), or with three bad records (skips make the hosts' iterator states differ)."""
    data = tmp_path / ("bad" if bad else "clean")
    if not data.exists():
        write_dataset(data, n=40, shards=2, bad=bad)
    if not (tmp_path / "val").exists():
        (tmp_path / "evals.txt").write_text(eval_set(tmp_path / "val"))
    # The real tokenizer's ids need the BERT vocabulary (TINY's 128 rows would be read out of range).
    return [str(CONFIGS / "base.yml"), *TINY, "vocab_size=32000", *MESH, f"steps={steps}", "checkpoint_period=10",
            "log_period=1", "warmup_steps=5", "dataset_type=grain", f"train_data=[{data}]", "grain_worker_count=0",
            (tmp_path / "evals.txt").read_text(), f"base_output_directory={tmp_path}", f"run_name={run_name}"]


def launch(processes, tmp_path, args, *, log=None):
    """`python -m openvision_max.launch local --processes 2 --devices-per-process 4 -- args` (Popen)."""
    cmd = [sys.executable, "-m", "openvision_max.launch", "local", "--processes", "2", "--devices-per-process", "4",
           "--log-dir", str(tmp_path / "logs"), "--timeout", "500", "--", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log or subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    processes.append(proc)
    return proc


def finished(proc):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


def one_process(tmp_path, args):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_processes_train_as_one(tmp_path, processes):
    two = launch(processes, tmp_path, config_args(tmp_path, "two"))
    one_process(tmp_path, config_args(tmp_path, "one"))
    out = finished(two)
    a, b = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert sorted(a) == list(range(1, 11)) and sorted(b) == sorted(a)
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-6), step
    evals_two = [m for m in metrics(tmp_path / "two") if "eval/v/top1" in m]
    evals_one = [m for m in metrics(tmp_path / "one") if "eval/v/top1" in m]
    assert len(evals_two) == 1 and {k: v for k, v in evals_two[0].items() if not k.endswith("/seconds")} == \
        {k: v for k, v in evals_one[0].items() if not k.endswith("/seconds")}
    # One writer: one metrics file, each logged step once, one printed line per step.
    assert list(tmp_path.glob("two/**/metrics.jsonl")) == [tmp_path / "two" / "metrics.jsonl"]
    assert out.count("step 10 [main 10/10") == 1


def test_sigkill_both_and_restart_resumes_each_host(tmp_path, processes):
    """Killed (both processes) after the step-20 checkpoint and restarted: the uninterrupted run's final
    loss bitwise, each host from its own saved position."""
    straight = launch(processes, tmp_path, config_args(tmp_path, "straight", bad=True, steps=30))
    killed = launch(processes, tmp_path, config_args(tmp_path, "killed", bad=True, steps=30),
                    log=subprocess.DEVNULL)
    step20 = tmp_path / "killed" / "checkpoints" / "20"
    deadline = time.time() + 400
    while not step20.is_dir() and time.time() < deadline and killed.poll() is None:
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)  # the launcher; its children die with it (PR_SET_PDEATHSIG)
    killed.wait()
    finished(straight)
    assert step20.is_dir() and not (tmp_path / "killed" / "checkpoints" / "30").is_dir()
    out = finished(launch(processes, tmp_path, config_args(tmp_path, "killed", bad=True, steps=30)))
    assert "resuming from checkpoint step 20" in out
    assert losses(tmp_path / "killed")[30] == losses(tmp_path / "straight")[30]  # bitwise

    from openvision_max.training import checkpointing
    manager = checkpointing._manager(tmp_path / "killed" / "checkpoints", read_only=True)
    saved = [json.loads(s) for s in manager.restore(20, args=checkpointing.ocp.args.Composite(
        meta=checkpointing.ocp.args.JsonRestore())).meta["data_by_process"]]
    manager.close()
    assert len(saved) == 2 and saved[0] != saved[1]  # the hosts' positions differ: a swap would show
    assert host_keys(tmp_path, 1, state=saved[1]) == host_keys(tmp_path, 1, skip_batches=20)


def host_iterator(tmp_path, host, count, *, bad):
    from openvision_max.config import load_config
    from openvision_max.data.grain_pipeline import GrainIterator
    from openvision_max.mesh.sharding import create_mesh

    cfg = load_config([*config_args(tmp_path, "keys", bad=bad), "ici_fsdp_parallelism=-1", "ici_data_parallelism=1",
                       "ici_tensor_parallelism=1"], platform="cpu", num_devices=1)
    return GrainIterator(cfg, create_mesh(cfg), process_index=host, process_count=count, augment=False)


def host_keys(tmp_path, host, *, state=None, skip_batches=0):
    """The record keys host `host` of 2 reads in its next batch: from `state`, or after `skip_batches`."""
    it = host_iterator(tmp_path, host, 2, bad=True)
    try:
        if state is not None:
            it.set_state(state)
        for _ in range(skip_batches):
            it.host_examples()
        return [e["key"] for e in it.host_examples()]
    finally:
        it.close()


def test_each_hosts_records_together_are_the_one_process_batch(tmp_path):
    """Hosts read disjoint records; together, batch by batch, the records of one process's batch."""
    its = [host_iterator(tmp_path, i, n, bad=False) for i, n in ((0, 1), (0, 2), (1, 2))]
    try:
        for _ in range(12):  # beyond an epoch of 40 records at 8 per batch
            whole, host0, host1 = ([e["key"] for e in it.host_examples()] for it in its)
            assert not set(host0) & set(host1)
            assert sorted(host0 + host1) == sorted(whole)
    finally:
        for it in its:
            it.close()


def start(processes, args, *, env, stdout):
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, stdout=stdout,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    processes.append(proc)
    return proc


def wait_for_line(log, text, procs, timeout=300):
    deadline = time.time() + timeout
    while text not in log.read_text():
        assert time.time() < deadline and all(p.poll() is None for p in procs), log.read_text()[-3000:]
        time.sleep(0.1)


def test_sigterm_to_one_process_saves_on_both_and_exits_zero(tmp_path, processes):
    """Also the synthetic-data half of "2 processes train as one": the losses of the steps both runs logged
    equal those of one process with 8 devices (stopped the same way)."""
    args = [str(CONFIGS / "base.yml"), *TINY, *MESH, "dataset_type=synthetic", "steps=100000",
            "checkpoint_period=100000", "log_period=1", f"base_output_directory={tmp_path}"]
    coordinator = f"127.0.0.1:{free_port()}"
    logs = [open(tmp_path / f"p{i}.log", "w") for i in range(3)]
    procs = [start(processes, [*args, "run_name=term"], env=child_env(
        dict(os.environ), process_id=i, processes=2, devices=4, coordinator=coordinator), stdout=logs[i])
        for i in range(2)]
    single = start(processes, [*args, "run_name=single"], stdout=logs[2],
                   env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    wait_for_line(tmp_path / "p0.log", "step 3 [", procs)
    procs[1].send_signal(signal.SIGTERM)  # one host's preemption notice
    wait_for_line(tmp_path / "p2.log", "step 3 [", [single])
    single.send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=120) for p in (*procs, single)]
    for f in logs:
        f.close()
    assert codes == [0, 0, 0], (tmp_path / "p0.log").read_text()[-3000:]
    steps = [p.name for p in (tmp_path / "term" / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1  # one collective save, at the step both agreed on
    assert f"preempted: saved checkpoint at step {steps[0]}" in (tmp_path / "p0.log").read_text()
    a, b = losses(tmp_path / "term"), losses(tmp_path / "single")
    assert len(set(a) & set(b)) >= 3
    for step in set(a) & set(b):
        assert a[step] == pytest.approx(b[step], rel=1e-6), step


def test_a_coordinator_that_never_answers_is_one_error(tmp_path):
    env = child_env(dict(os.environ), process_id=1, processes=2, devices=4, coordinator=f"127.0.0.1:{free_port()}")
    start_time = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), str(CONFIGS / "demo.yml"),
                           "jax_distributed_initialization_timeout=5", f"base_output_directory={tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: no coordinator answered at 127.0.0.1:") and \
        "within jax_distributed_initialization_timeout=5 s" in last, proc.stderr[-2000:]
    assert time.time() - start_time < 60 and not any(tmp_path.iterdir())
