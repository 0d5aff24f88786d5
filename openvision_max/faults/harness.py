"""Runs `python train.py` under faults and accounts for what they cost: steps done twice, records read twice or
never (by key, against a clean run), whether the final loss is the clean run's.

Every run is the tiny model on the demo's handwritten digits with the record-key log on (see
training/fault_hooks.py), one process of one CPU device, so a fault run takes seconds. Processes are started
in their own session and killed by process group; `Trainer.stop()` is safe to call at any time (the callers
do, in `finally`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, Callable

from openvision_max.mesh.host_devices import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ["image_size=32", "patch_size=8", "embed_dim=32", "global_batch_size=8",
         "vision.width=32", "vision.depth=2", "vision.mlp_dim=64", "vision.num_heads=2",
         "text.width=32", "text.depth=2", "text.mlp_dim=64", "text.num_heads=2", "text.context_length=8",
         "decoder.width=32", "decoder.depth=1", "decoder.mlp_dim=64", "decoder.num_heads=2",
         "decoder.caption_length=8", "dtype=float32", "remat_policy=none"]


def demo_digits(root: pathlib.Path) -> pathlib.Path:
    """The demo's handwritten-digit training shards (generated under `root` if missing)."""
    from openvision_max.data import demo_data
    return demo_data.ensure_demo_data(root, shapes_train=10, shapes_test_per_class=1)["digits_train"]


def run_args(data: pathlib.Path | str, out: pathlib.Path, name: str, *, steps: int, period: int,
             extra: tuple[str, ...] = ()) -> list[str]:
    """train.py's arguments for a fault run: grain data, a log line and a key-log line every step."""
    return [str(ROOT / "configs" / "base.yml"), *MODEL, "dataset_type=grain", f"train_data=[{data}]",
            "grain_worker_count=0", "evals=[]", f"steps={steps}", f"checkpoint_period={period}", "log_period=1",
            "warmup_steps=2", f"base_output_directory={out}", f"run_name={name}", *extra]


@dataclasses.dataclass
class Trainer:
    """One `python train.py` process with the faults `faults` (the record keys always logged to key_log)."""
    args: list[str]
    key_log: pathlib.Path
    log: pathlib.Path
    faults: dict[str, Any] = dataclasses.field(default_factory=dict)
    prefix: tuple[str, ...] = ()  # e.g. ("unshare", "-m", ...) for a run in a mount namespace of its own
    proc: subprocess.Popen | None = None
    offset: int = 0  # where this attempt's output begins in `log` (attempts of one run share the file)

    def start(self) -> Trainer:
        env = {**os.environ, "XLA_FLAGS": xla_flags(os.environ.get("XLA_FLAGS"), 1), "JAX_PLATFORMS": "cpu",
               "OPENVISION_FAULTS": json.dumps({**self.faults, "key_log": str(self.key_log)})}
        with open(self.log, "a") as f:
            self.offset = f.tell()
            self.proc = subprocess.Popen([*self.prefix, sys.executable, str(ROOT / "train.py"), *self.args],
                                         cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self

    def output(self) -> str:
        """What this attempt printed so far."""
        if not self.log.exists():
            return ""
        with open(self.log, "rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")

    def wait_until(self, ready: Callable[[], bool], timeout: float = 300) -> bool:
        """Polls `ready` every 20 ms until it holds (True), the process ends or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return True
            if self.proc.poll() is not None:
                return ready()
            time.sleep(0.02)
        return False

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.stop()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """Kills the process group if it still runs and reaps it."""
        self.kill()
        if self.proc is not None:
            self.proc.wait()


def logged_step(trainer: Trainer, step: int) -> Callable[[], bool]:
    return lambda: f"\nstep {step} [" in "\n" + trainer.output()


def checkpoint_dirs(run_dir: pathlib.Path) -> tuple[list[int], list[int]]:
    """(complete steps, steps being written: an Orbax tmp directory) under run_dir/checkpoints."""
    complete, writing = [], []
    directory = run_dir / "checkpoints"
    for p in directory.iterdir() if directory.is_dir() else ():
        head = p.name.split(".")[0]
        if p.name.isdigit():
            complete.append(int(p.name))
        elif head.isdigit() and "orbax-checkpoint-tmp" in p.name:
            writing.append(int(head))
    return sorted(complete), sorted(writing)


def read_key_log(path: pathlib.Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclasses.dataclass
class Accounting:
    steps_done: int        # train steps run, over every attempt
    lost_steps: int        # steps run again after a restart (done, then lost with the process)
    repeated: int          # records read more often than in the clean run (by key, over the whole run)
    missing: int           # records the clean run read that this one did not (by key)
    same_batches: bool     # every step trained on the clean run's records


def account(key_log: pathlib.Path, clean_key_log: pathlib.Path, steps: int) -> Accounting:
    """The last attempt to run a step is the one whose result survived (a later attempt resumes before it
    only after its process was lost), so the run's records are each step's last logged keys."""
    lines = read_key_log(key_log)
    last: dict[int, list[str]] = {}
    for line in lines:
        last[line["step"]] = line["keys"]
    clean = {line["step"]: line["keys"] for line in read_key_log(clean_key_log)}
    ours = [k for s in range(1, steps + 1) for k in last.get(s, [])]
    theirs = [k for s in range(1, steps + 1) for k in clean.get(s, [])]
    have, want = collections.Counter(ours), collections.Counter(theirs)
    return Accounting(steps_done=len(lines), lost_steps=len(lines) - len(last),
                      repeated=sum((have - want).values()), missing=sum((want - have).values()),
                      same_batches=all(last.get(s) == clean.get(s) for s in range(1, steps + 1)))


def final_loss(run_dir: pathlib.Path, step: int) -> float | None:
    """The loss last logged for `step` in run_dir/metrics.jsonl (None if it never was)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    found = [json.loads(line) for line in path.read_text().splitlines()]
    losses = [m["loss"] for m in found if m.get("step") == step and "loss" in m]
    return losses[-1] if losses else None


def truncate_an_array_file(step_dir: pathlib.Path) -> pathlib.Path:
    """Cuts the biggest array data file of a checkpoint to 1,000 bytes (a disk that lost the file's end)."""
    files = sorted((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
                   key=lambda p: p.stat().st_size)
    with open(files[-1], "r+b") as f:
        f.truncate(1000)
    return files[-1]


def saved_states(run_dir: pathlib.Path) -> dict[int, Any]:
    """Every complete checkpoint's train state as numpy arrays, by step (read without a target)."""
    import numpy as np

    import jax
    from openvision_max.training import checkpointing
    manager = checkpointing._manager(run_dir / "checkpoints", read_only=True)
    try:
        return {s: jax.tree.map(np.asarray, manager.restore(s, args=checkpointing.ocp.args.Composite(
            state=checkpointing.ocp.args.PyTreeRestore())).state) for s in manager.all_steps()}
    finally:
        manager.close()


def all_finite(tree: Any) -> bool:
    import numpy as np

    import jax
    return all(bool(np.isfinite(x).all()) for x in jax.tree.leaves(tree) if np.issubdtype(x.dtype, np.inexact))


def tree_bytes(path: pathlib.Path) -> int:
    """Bytes of the files under `path` (a checkpoint's size on disk: TensorStore compresses, so a state's
    array bytes do not say it)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def can_mount_tmpfs() -> str:
    """'' when this process may mount a tmpfs in a mount namespace of its own (root, or user namespaces);
    else why not."""
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True, text=True, timeout=30)
    return "" if probe.returncode == 0 else (probe.stderr.strip() or f"unshare exited {probe.returncode}")


def disk_full_session(args: list[str], mount: pathlib.Path, size_bytes: int, keep: pathlib.Path, log: pathlib.Path,
                      key_log: pathlib.Path, timeout: float = 600) -> list[int]:
    """In a mount namespace of its own: a tmpfs of `size_bytes` at `mount` (the runs' base_output_directory),
    `train.py args` until it fails, the tmpfs grown to 4x (the operator freeing space), the same command
    again; then the run directory copied to `keep`. Returns both exit statuses. The namespace, and the tmpfs
    with it, ends with the session's processes."""
    env = {**os.environ, "XLA_FLAGS": xla_flags(os.environ.get("XLA_FLAGS"), 1), "JAX_PLATFORMS": "cpu",
           "OPENVISION_FAULTS": json.dumps({"key_log": str(key_log)})}
    train = " ".join(shlex.quote(a) for a in [sys.executable, str(ROOT / "train.py"), *args])
    script = "\n".join([
        "set -u", f"mount -t tmpfs -o size={size_bytes} tmpfs {shlex.quote(str(mount))} || exit 90",
        f"{train}; first=$?", f"mount -o remount,size={4 * size_bytes} {shlex.quote(str(mount))}",
        f"{train}; second=$?", f"cp -r {shlex.quote(str(mount))}/. {shlex.quote(str(keep))}/",
        'echo "exit statuses: $first $second"'])
    mount.mkdir(parents=True, exist_ok=True)
    keep.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script], cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    last = [line for line in log.read_text().splitlines() if line.startswith("exit statuses: ")]
    if proc.returncode == 90 or not last:
        raise RuntimeError(f"the disk-full session did not run (status {proc.returncode}): "
                           f"{log.read_text()[-2000:]}")
    return [int(x) for x in last[-1].split(": ")[1].split()]
