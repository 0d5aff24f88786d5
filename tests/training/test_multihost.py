"""`python train.py` as several JAX processes on this machine (2 processes x 4 CPU devices) against one
process with 8: the same losses and evals, one writer, each host resuming its own
data position; a SIGTERM to one host; a coordinator that never answers.

Every process a test starts is killed by its pid (or, for the launcher, its process group) at the end, also
when the test fails. The model is the suite's tiny one, the data the demo's handwritten digits.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from openvision_max.launch.local_cluster import child_env, free_port
from openvision_max.mesh.host_devices import xla_flags

from conftest import CONFIGS, ROOT, TINY

# Steps of the 2-process runs: a checkpoint at 8, the kill after step 10, the restart trains 9 to 14.
STEPS = 14
MESH = ["ici_data_parallelism=2", "ici_fsdp_parallelism=2", "ici_tensor_parallelism=2"]


def demo_digits(tmp_path):
    """The demo's handwritten digits (train shards, test set with its ten classes), generated in tmp_path."""
    from openvision_max.data import demo_data
    sets = demo_data.ensure_demo_data(tmp_path / "demo", shapes_train=10, shapes_test_per_class=1)
    return sets["digits_train"], sets["digits_test"]


def config_args(tmp_path, run_name, *, steps=10):
    """The tiny model on the demo's digits (no bad records: each host's share of a batch is exactly the one
    process's batch), with a zero-shot eval on their test set at the end."""
    data, test = demo_digits(tmp_path)
    # The real tokenizer's ids need the BERT vocabulary (TINY's 128 rows would be read out of range).
    data_keys = ["dataset_type=grain", f"train_data=[{data}]", "grain_worker_count=0",
                 f"evals=[{{name: v, type: zeroshot, path: {test}}}]"]
    return [str(CONFIGS / "base.yml"), *TINY, "vocab_size=32000", *MESH, f"steps={steps}", "checkpoint_period=8",
            "log_period=1", "warmup_steps=5", *data_keys, f"base_output_directory={tmp_path}",
            f"run_name={run_name}"]


def launch(processes, tmp_path, args, *, log=None):
    """`python -m openvision_max.launch local --processes 2 --devices-per-process 4 -- args` (Popen)."""
    cmd = [sys.executable, "-m", "openvision_max.launch", "local", "--processes", "2", "--devices-per-process", "4",
           "--log-dir", str(tmp_path / "logs"), "--timeout", "500", "--", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log or subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    processes.append(proc)
    return proc


def finished(proc, log_dir):
    """The launcher's stdout once it exited 0; otherwise the whole log of process 1 is printed (a hang at exit
    prints each thread's stack there: mesh/distributed.py) and the test fails on the launcher's stderr."""
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        for log in sorted(log_dir.glob("process-*.log")):
            print(f"--- {log}:\n{log.read_text(errors='replace')}")
    assert proc.returncode == 0, err[-3000:]
    return out


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


def one_process(tmp_path, args):
    env = {**os.environ, "XLA_FLAGS": xla_flags(os.environ.get("XLA_FLAGS"), 8)}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_processes_train_and_resume_as_one(tmp_path, processes):
    """2 x 4 devices against 1 x 8 on the demo digits. The 2-process run is killed (both processes) two steps
    after its step-8 checkpoint and restarted: the steps it trains again (9, 10) give the losses it logged
    before the kill to the bit, each host resumes from its own saved position, the lost progress is what the
    goodput command finds, and every step's loss and the final zero-shot figures are the 1-process run's
    (1e-6), from one writer. (One test, so that the runs find the step already compiled. Synthetic batches do
    not depend on the mesh: tests/data/test_synthetic.py.)"""
    # One run at a time: on two cores, processes that wait long for a peer's collective time out.
    one_process(tmp_path, config_args(tmp_path, "one", steps=STEPS))
    killed = launch(processes, tmp_path, config_args(tmp_path, "two", steps=STEPS), log=subprocess.DEVNULL)
    step8, log = tmp_path / "two" / "checkpoints" / "8", tmp_path / "two" / "metrics.jsonl"
    deadline = time.time() + 400
    # A few steps after the checkpoint too, which the restart trains again (the goodput check counts them).
    while not (step8.is_dir() and log.exists() and '{"step": 10,' in log.read_text()) \
            and time.time() < deadline and killed.poll() is None:
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)  # the launcher; its children die with it (PR_SET_PDEATHSIG)
    killed.wait()
    before_restart = log.read_text().splitlines()
    assert step8.is_dir() and not (tmp_path / "two" / "checkpoints" / str(STEPS)).is_dir()
    out = finished(launch(processes, tmp_path, config_args(tmp_path, "two", steps=STEPS)), tmp_path / "logs")
    assert "resuming from checkpoint step 8" in out

    rows = metrics(tmp_path / "two")
    first = [m for m in rows[:len(before_restart)] if "loss" in m]
    again = [m for m in rows[len(before_restart):] if "loss" in m]
    # One line per logged step (log_period=1) and attempt, from the one writer.
    assert [m["step"] for m in again] == list(range(9, STEPS + 1))
    assert [m["step"] for m in first] == list(range(1, len(first) + 1)) and len(first) >= 10
    assert list(tmp_path.glob("two/**/metrics.jsonl")) == [log]
    assert out.count(f"step {STEPS} [main {STEPS}/{STEPS}") == 1
    redone = {m["step"]: m["loss"] for m in first if m["step"] > 8}
    assert redone and all(m["loss"] == redone[m["step"]] for m in again if m["step"] in redone)  # bitwise
    two, one = {**{m["step"]: m["loss"] for m in first}, **{m["step"]: m["loss"] for m in again}}, \
        losses(tmp_path / "one")
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    for step in two:
        assert two[step] == pytest.approx(one[step], rel=1e-6), step
    evals_two = [m for m in rows if "eval/v/top1" in m]
    evals_one = [m for m in metrics(tmp_path / "one") if "eval/v/top1" in m]
    assert len(evals_two) == 1 and {k: v for k, v in evals_two[0].items() if not k.endswith("/seconds")} == \
        {k: v for k, v in evals_one[0].items() if not k.endswith("/seconds")}

    goodput_of_the_kill(tmp_path / "two", before_restart)
    from openvision_max.training import checkpointing
    manager = checkpointing._manager(step8.parent, read_only=True)
    saved = [json.loads(s) for s in manager.restore(8, args=checkpointing.ocp.args.Composite(
        meta=checkpointing.ocp.args.JsonRestore())).meta["data_by_process"]]
    manager.close()
    assert [s["host"] for s in saved] == [[0, 2], [1, 2]]
    assert host_keys(tmp_path, 1, state=saved[1]) == host_keys(tmp_path, 1, skip_batches=8)
    with pytest.raises(Exception, match="the data iterator state of host 0 of 2 cannot resume host 1 of 2"):
        host_keys(tmp_path, 1, state=saved[0])


def goodput_of_the_kill(run_dir, lines):
    """`python -m openvision_max.goodput`'s figures (in-process) for the run killed two steps after checkpoint
    8: the steps trained again after the restart, and their time, as the killed run's metric `lines` (read at
    the kill) show them, within one step (the kill may fall between a step's timeline record and its line)."""
    from openvision_max.observe import goodput, timeline
    report = goodput.compute(timeline.read(run_dir))
    killed = []
    for line in lines:
        try:
            killed.append(json.loads(line))
        except json.JSONDecodeError:  # a line the kill cut short
            pass
    lost = [m for m in killed if m["step"] > 8]
    one_step = max(m["step_time_s"] for m in killed[1:])  # the first line includes the compile
    (interruption,) = report["interruptions"]
    print(goodput.format_report(str(run_dir), report))
    print(f"metrics before the kill: steps {[m['step'] for m in lost]} after checkpoint 8 took "
          f"{sum(m['step_time_s'] for m in lost):.3f} s; the slowest step {one_step:.3f} s")
    assert interruption["ended"] == "killed" and interruption["resumed_from"] == 8 and lost
    assert interruption["progress_lost_s"] == pytest.approx(sum(m["step_time_s"] for m in lost), abs=one_step)
    first, last = interruption["lost_steps"]
    assert first == 9 and last - lost[-1]["step"] in (0, 1)
    assert report["last_step"] == STEPS and 0 < report["productive_s"] < report["total_s"]


def host_iterator(tmp_path, host, count):
    from openvision_max.config import load_config
    from openvision_max.data.grain_pipeline import GrainIterator
    from openvision_max.mesh.sharding import create_mesh

    cfg = load_config([*config_args(tmp_path, "keys"), "ici_fsdp_parallelism=-1", "ici_data_parallelism=1",
                       "ici_tensor_parallelism=1"], platform="cpu", num_devices=1)
    return GrainIterator(cfg, create_mesh(cfg), process_index=host, process_count=count, augment=False)


def host_keys(tmp_path, host, *, state=None, skip_batches=0):
    """The record keys host `host` of 2 reads in its next batch: from `state`, or after `skip_batches`."""
    it = host_iterator(tmp_path, host, 2)
    try:
        if state is not None:
            it.set_state(state)
        for _ in range(skip_batches):
            it.host_examples()
        return [e["key"] for e in it.host_examples()]
    finally:
        it.close()


def test_each_hosts_records_together_are_the_one_process_batch(tmp_path):
    """Hosts read disjoint records; together, batch by batch, the records of one process's batch (the demo
    digits, as the 2-process runs read them)."""
    its = [host_iterator(tmp_path, i, n) for i, n in ((0, 1), (0, 2), (1, 2))]
    try:
        for _ in range(STEPS):  # the batches of test_two_processes_train_and_resume_as_one
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
    """Two processes of one device each (the cheapest 2-host run): a SIGTERM to host 1 only."""
    args = [str(CONFIGS / "base.yml"), *TINY, "dataset_type=synthetic", "steps=100000", "checkpoint_period=100000",
            "log_period=1", f"base_output_directory={tmp_path}", "run_name=term"]
    coordinator = f"127.0.0.1:{free_port()}"
    logs = [open(tmp_path / f"p{i}.log", "w") for i in range(2)]
    procs = [start(processes, args, env=child_env(dict(os.environ), process_id=i, processes=2, devices=1,
                                                  coordinator=coordinator), stdout=logs[i]) for i in range(2)]
    wait_for_line(tmp_path / "p0.log", "step 3 [", procs)
    procs[1].send_signal(signal.SIGTERM)  # one host's preemption notice
    codes = [p.wait(timeout=120) for p in procs]
    for f in logs:
        f.close()
    assert codes == [0, 0], (tmp_path / "p0.log").read_text()[-3000:]
    steps = [p.name for p in (tmp_path / "term" / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1  # one collective save, at the step both agreed on
    assert f"preempted: saved checkpoint at step {steps[0]}" in (tmp_path / "p0.log").read_text()
    assert "SIGTERM caught" in (tmp_path / "p1.log").read_text()  # JAX's preemption notifier, on host 1


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


def test_a_resume_with_another_process_count_is_refused():
    from openvision_max.training.checkpointing import CheckpointError
    from openvision_max.training.loop import _own_data_state

    two_hosts = {"data_by_process": [json.dumps({"step": 3}), json.dumps({"step": 4})]}
    with pytest.raises(CheckpointError, match="holds the data iterator states of 2 processes, this run has 1: "
                                              "resume with 2"):
        _own_data_state(two_hosts, 20)
    assert _own_data_state({"data_by_process": [json.dumps({"step": 3})]}, 20) == {"step": 3}
