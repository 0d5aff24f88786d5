"""`python -m openvision_max.launch local`: N processes of the training binary on this machine, as N hosts.

Each process sees `--devices-per-process` fake CPU devices and joins one JAX distributed cluster through the
coordinator contract below, so multi-host code paths (process ids, cross-process collectives, a crashed or
preempted host) run on a laptop or in tests. Standard library only: the launcher starts fast and never
imports JAX (the children do).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import IO, Callable, Optional

from openvision_max.mesh.host_devices import DEVICE_COUNT_FLAG, xla_flags

PROG = "python -m openvision_max.launch local"
TRAIN_PY = pathlib.Path(__file__).resolve().parents[2] / "train.py"
DEFAULT_GRACE = 30.0
TIMEOUT_STATUS = 124          # as timeout(1)
TAIL_LINES = 20
POLL_S = 0.05
FORWARDED = (signal.SIGTERM, signal.SIGINT)

DESCRIPTION = f"""\
Start N processes of `python train.py CONFIG key=value ...` on this machine, as N hosts of one JAX
cluster on CPU. Each process gets, in its environment:
  JAX_PLATFORMS=cpu
  XLA_FLAGS=<XLA_FLAGS> {DEVICE_COUNT_FLAG}=<devices-per-process>
                (any other device count removed, other flags kept)
  JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo          (CPU collectives across processes)
  JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>
  JAX_NUM_PROCESSES=<N>, JAX_PROCESS_ID=<0..N-1>   (for jax.distributed.initialize)
  PYTHONUNBUFFERED=1                               (unless set, so that logs are live)

Process 0's stdout/stderr are this command's; the others' go to <log-dir>/process-<i>.log, whose last
{TAIL_LINES} lines are printed when that process fails. SIGTERM and SIGINT (Ctrl-C) are forwarded to every
process. When a process exits non-zero while others still run, the others get SIGTERM after --grace
seconds (a crashed host would leave them waiting in a collective), and SIGKILL after --grace more.
--timeout stops every process the same way (SIGTERM, SIGKILL after --grace).

Exit status: the worst of the processes that ended on their own (a signal counts as 128+signal, else
the largest code); processes stopped by this launcher do not count; a timeout gives at least {TIMEOUT_STATUS}.
Usage errors print one line and exit 2."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def seconds(text: str, *, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0 or (value == 0 and not allow_zero) or value != value:
        raise argparse.ArgumentTypeError(f"must be {'at least 0' if allow_zero else 'positive'}, not {text}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    """The `local` subcommand; its `run` default is called with (parser, args, command after `--`)."""
    p = subparsers.add_parser(
        "local", prog=PROG, help="N processes on this machine (CPU devices), for development and tests",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"{PROG} [options] -- CONFIG [key=value ...]")
    p.add_argument("--processes", type=positive_int, default=2, metavar="N",
                   help="processes (hosts) to start (default: %(default)s)")
    p.add_argument("--devices-per-process", type=positive_int, default=4, metavar="D",
                   help="fake CPU devices in each process (default: %(default)s)")
    p.add_argument("--log-dir", type=pathlib.Path, default=None, metavar="DIR",
                   help="where process-<i>.log of processes 1..N-1 go (created if missing; default: a new "
                        "temporary directory, printed at start)")
    p.add_argument("--timeout", type=lambda t: seconds(t, allow_zero=False), default=None, metavar="SECONDS",
                   help="stop every process after this long (default: no limit)")
    p.add_argument("--grace", type=lambda t: seconds(t, allow_zero=True), default=DEFAULT_GRACE,
                   metavar="SECONDS", help="after a failure: how long the others may still run; after SIGTERM: "
                                           "how long before SIGKILL (default: %(default)s)")
    p.add_argument("--program", type=pathlib.Path, default=TRAIN_PY, metavar="SCRIPT",
                   help="the Python script each process runs with CONFIG key=value ... (default: the "
                        "repository's train.py)")
    p.set_defaults(run=run_from_args)
    return p


def run_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, command: Optional[list[str]]) -> int:
    if command is None:
        parser.error("put `--` before the training command: -- CONFIG [key=value ...]")
    if not command:
        parser.error("no config after `--`: -- CONFIG [key=value ...]")
    if not args.program.is_file():
        parser.error(f"no program at {args.program}" + (" (the repository's train.py: run from a checkout, or "
                                                         "give --program)" if args.program == TRAIN_PY else ""))
    try:
        log_dir = make_log_dir(args.log_dir, args.processes)
    except OSError as e:
        parser.error(f"--log-dir {args.log_dir}: {e.strerror or e}")
    return run_cluster([sys.executable, str(args.program), *command], processes=args.processes,
                       devices=args.devices_per_process, log_dir=log_dir, timeout=args.timeout, grace=args.grace)


def make_log_dir(given: Optional[pathlib.Path], processes: int) -> Optional[pathlib.Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        return given
    if processes == 1:
        return None
    return pathlib.Path(tempfile.mkdtemp(prefix="openvision-local-"))


def free_port() -> int:
    """A port nobody listens on now (bound to port 0 and released; the coordinator binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(base: dict, *, process_id: int, processes: int, devices: int, coordinator: str) -> dict:
    env = dict(base)
    env.update({
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": xla_flags(base.get("XLA_FLAGS"), devices),
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
        "JAX_COORDINATOR_ADDRESS": coordinator,
        "JAX_NUM_PROCESSES": str(processes),
        "JAX_PROCESS_ID": str(process_id),
    })
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def exit_status(returncode: int) -> int:
    """A shell's view of a return code: killed by signal S -> 128 + S."""
    return 128 - returncode if returncode < 0 else returncode


def log_tail(path: pathlib.Path, lines: int = TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read()
    except OSError as e:
        return f"(cannot read {path}: {e.strerror or e})"
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def _death_signal() -> Callable[[], None]:
    """preexec_fn: on Linux the child gets SIGKILL when the launcher dies, even by SIGKILL (no orphans)."""
    parent = os.getpid()
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
    except (OSError, AttributeError):
        prctl = None

    def setup() -> None:
        if prctl is not None:
            prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
        if os.getppid() != parent:     # the launcher died before prctl
            os.kill(os.getpid(), signal.SIGKILL)
    return setup


@dataclasses.dataclass
class Child:
    index: int
    proc: subprocess.Popen
    log: Optional[pathlib.Path]
    stopped: bool = False          # the launcher sent it SIGTERM/SIGKILL (after a failure or the timeout)
    returncode: Optional[int] = None

    @property
    def running(self) -> bool:
        return self.returncode is None

    def signal(self, sig: int) -> None:
        if self.running:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def kill_group(self) -> None:
        """SIGKILL to the child's process group: the child and whatever it started (it leads the group)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def run_cluster(argv: list[str], *, processes: int, devices: int, log_dir: Optional[pathlib.Path],
                timeout: Optional[float] = None, grace: float = DEFAULT_GRACE, err: IO[str] = sys.stderr) -> int:
    """Runs `argv` as `processes` processes; returns the exit status (see DESCRIPTION)."""
    def say(message: str) -> None:
        print(f"launch local: {message}", file=err, flush=True)

    if log_dir is None and processes > 1:
        log_dir = make_log_dir(None, processes)
    coordinator = f"127.0.0.1:{free_port()}"
    others = "process 1" if processes == 2 else f"processes 1-{processes - 1}"
    logs = f"; logs of {others} in {log_dir}" if processes > 1 else ""
    say(f"{processes} process{'es' if processes > 1 else ''} x {devices} CPU devices, coordinator "
        f"{coordinator}{logs}")

    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in FORWARDED}
    children: list[Child] = []
    timed_out = False
    failed_at: Optional[float] = None   # when the first process failed while others ran
    kill_at: Optional[float] = None     # when SIGTERMed processes get SIGKILL
    try:
        setup = _death_signal()
        for i in range(processes):
            env = child_env(os.environ, process_id=i, processes=processes, devices=devices, coordinator=coordinator)
            log = None if i == 0 else log_dir / f"process-{i}.log"
            out = None if log is None else open(log, "wb")
            try:
                proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=None if out is None else subprocess.STDOUT,
                                        process_group=0, preexec_fn=setup)
            finally:
                if out is not None:
                    out.close()
            children.append(Child(i, proc, log))
        started = time.monotonic()

        def stop(reason: str) -> None:
            nonlocal kill_at
            running = [c for c in children if c.running and not c.stopped]
            if running:
                say(f"{reason}: SIGTERM to process{'es' if len(running) > 1 else ''} "
                    f"{', '.join(str(c.index) for c in running)}" + (f", SIGKILL in {grace:g} s" if grace else ""))
            for c in running:
                c.stopped = True
                c.signal(signal.SIGTERM)
            if running and kill_at is None:
                kill_at = time.monotonic() + grace

        while True:
            while pending:
                sig = pending.pop(0)
                for c in children:
                    c.signal(sig)
            ended = [c for c in children if c.running and c.proc.poll() is not None]
            for c in ended:
                c.returncode = c.proc.returncode
                c.kill_group()       # anything it left behind
            for c in ended:
                if c.returncode != 0 and not c.stopped:
                    say(f"process {c.index} exited with status {exit_status(c.returncode)}")
                    if c.log is not None:
                        say(f"last {TAIL_LINES} lines of {c.log}:\n{log_tail(c.log)}")
                    if failed_at is None and any(o.running for o in children):
                        failed_at = time.monotonic()
                        if grace:
                            say(f"stopping the others in {grace:g} s (--grace)")
            if not any(c.running for c in children):
                break
            now = time.monotonic()
            if timeout is not None and not timed_out and now - started >= timeout:
                timed_out = True
                stop(f"timeout after {timeout:g} s")
            if failed_at is not None and now - failed_at >= grace and kill_at is None:
                stop(f"{grace:g} s after the failure")
            if kill_at is not None and now >= kill_at:
                for c in children:
                    if c.running:
                        c.kill_group()
            time.sleep(POLL_S)
    finally:
        for c in children:           # an exception or an early exit: leave nothing running
            if c.running:
                c.kill_group()
                c.returncode = c.proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    own = [exit_status(c.returncode) for c in children if not c.stopped]
    status = max(own, default=0)
    return max(status, TIMEOUT_STATUS) if timed_out else status
