"""`python -m openvision_max.launch local`: N processes as N JAX hosts on CPU, signals, failures, timeouts.

The programs run by the launcher are small scripts written here (`--program`); each writes its pid to
<tmp>/pids/, and the `launched` fixture kills every launcher and script process left alive, even when a
test fails.
"""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT
from openvision_max.launch.local_cluster import exit_status
from openvision_max.mesh.host_devices import xla_flags

LAUNCH = [sys.executable, "-m", "openvision_max.launch", "local"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(ROOT), str(ROOT / "kernels"), *filter(None, [os.environ.get("PYTHONPATH")])])}

# Every script starts by recording its pid (and the pid of anything it starts) for the cleanup.
PREAMBLE = """\
import os, pathlib, signal, subprocess, sys, time
HERE = pathlib.Path(__file__).parent
INDEX = int(os.environ["JAX_PROCESS_ID"])
(HERE / "pids").mkdir(exist_ok=True)
(HERE / "pids" / f"{os.getpid()}").write_text("")
"""

GLOBAL_SUM = PREAMBLE + """\
import jax
import numpy as np
# The launcher's environment variable alone selects gloo: no jax.config.update needed (it is also JAX's default).
assert os.environ["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"
assert jax.config.jax_cpu_collectives_implementation == "gloo"
jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                           num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                           process_id=int(os.environ["JAX_PROCESS_ID"]))
n, d = jax.process_count(), jax.local_device_count()
assert jax.device_count() == n * d, (jax.device_count(), n, d)
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("x",))
rows = 3 * d                       # this process's slice of a global arange
local = np.arange(INDEX * rows, (INDEX + 1) * rows, dtype=np.float32)
array = jax.make_array_from_process_local_data(NamedSharding(mesh, P("x")), local)
total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))(array)
print(f"process {INDEX} of {n}: args {sys.argv[1:]} devices {jax.device_count()} x {d} sum {float(total)}")
"""


def pid_alive(pid: int, tmp: pathlib.Path) -> bool:
    """Whether `pid` is still a process of this test (its command line names the test's directory)."""
    try:
        cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return str(tmp).encode() in cmdline and state != "Z"


def script_pids(tmp: pathlib.Path) -> list[int]:
    return [int(p.name) for p in (tmp / "pids").glob("*")] if (tmp / "pids").is_dir() else []


@pytest.fixture
def launched(tmp_path):
    """launch(script, *launcher_args, config_args=...) -> Popen of the launcher; all killed at teardown."""
    procs = []

    def launch(script: str, *args: str, command=("tiny.yml", "steps=1")) -> subprocess.Popen:
        program = tmp_path / "program.py"
        program.write_text(script)
        proc = subprocess.Popen([*LAUNCH, "--program", str(program), "--log-dir", str(tmp_path / "logs"), *args,
                                 "--", *command], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc

    yield launch
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    for pid in script_pids(tmp_path):
        if pid_alive(pid, tmp_path):
            os.kill(pid, signal.SIGKILL)


def finish(proc: subprocess.Popen, timeout: float = 15) -> tuple[int, str, str, float]:
    start = time.monotonic()
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err, time.monotonic() - start


def wait_for(paths, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"not created in {timeout} s: {[str(p) for p in paths]}"
        time.sleep(0.05)


def test_two_processes_of_two_devices_sum_across_processes(launched, tmp_path):
    code, out, err, _ = finish(launched(GLOBAL_SUM, "--processes", "2", "--devices-per-process", "2"))
    assert code == 0, err
    # 2 processes x 6 values: sum(range(12)) = 66; 4 devices although this test process's XLA_FLAGS asks for 8.
    line = "of 2: args ['tiny.yml', 'steps=1'] devices 4 x 2 sum 66.0"
    assert f"process 0 {line}" in out
    assert "process 1" not in out                          # only process 0 on stdout
    assert f"process 1 {line}" in (tmp_path / "logs" / "process-1.log").read_text()
    assert err.startswith("launch local: 2 processes x 2 CPU devices, coordinator 127.0.0.1:")
    assert err.count(str(tmp_path / "logs")) == 1


def test_a_failing_process_sets_the_status_and_the_others_are_stopped(launched, tmp_path):
    script = PREAMBLE + textwrap.dedent("""\
        if INDEX == 1:
            print("process 1: something broke")
            sys.exit(3)
        time.sleep(60)                 # process 0 would wait for process 1 forever
    """)
    code, out, err, took = finish(launched(script, "--processes", "3", "--grace", "0.5"))
    assert code == 3, err
    assert "process 1 exited with status 3" in err
    assert "process 1: something broke" in err             # the tail of its log
    assert "SIGTERM to processes 0, 2" in err
    assert took < 10
    assert len(script_pids(tmp_path)) == 3
    assert not [pid for pid in script_pids(tmp_path) if pid_alive(pid, tmp_path)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_launcher_reaches_every_process(launched, tmp_path, sig):
    script = PREAMBLE + textwrap.dedent("""\
        def on_signal(signum, frame):
            (HERE / f"got-{signum}-{INDEX}").write_text("")
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        (HERE / f"ready-{INDEX}").write_text("")
        while True:
            time.sleep(0.05)
    """)
    proc = launched(script, "--processes", "2")
    wait_for([tmp_path / "ready-0", tmp_path / "ready-1"])
    proc.send_signal(sig)
    code, out, err, _ = finish(proc)
    assert code == 0, err
    assert (tmp_path / f"got-{int(sig)}-0").exists() and (tmp_path / f"got-{int(sig)}-1").exists()


def test_timeout_kills_a_hanging_process_and_what_it_started(launched, tmp_path):
    script = PREAMBLE + textwrap.dedent("""\
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # deaf to SIGTERM: needs the SIGKILL
        if INDEX == 1:
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(HERE)])
            (HERE / "pids" / f"{child.pid}").write_text("")
        time.sleep(60)
    """)
    code, out, err, took = finish(launched(script, "--processes", "2", "--timeout", "1", "--grace", "0.5"))
    assert code == 124, err
    assert "timeout after 1 s: SIGTERM to processes 0, 1, SIGKILL in 0.5 s" in err
    assert took < 10
    assert len(script_pids(tmp_path)) == 3
    assert not [pid for pid in script_pids(tmp_path) if pid_alive(pid, tmp_path)]


@pytest.mark.parametrize("args, message", [
    (["--processes", "2"], "put `--` before the training command"),
    (["--"], "no config after `--`"),
    (["--processes", "0", "--", "c.yml"], "argument --processes: must be at least 1, not 0"),
])
def test_bad_usage_is_one_line_and_exit_2(args, message):
    proc = subprocess.run([*LAUNCH, *args], env=ENV, capture_output=True, text=True, timeout=20)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_help_documents_the_contract():
    proc = subprocess.run([*LAUNCH, "--help"], env=ENV, capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0
    for word in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "gloo", "--timeout", "--grace",
                 "process-<i>.log", "128+signal"):
        assert word in proc.stdout, word


def test_the_launcher_does_not_import_jax():
    code = "import sys, openvision_max.launch.__main__; print(sorted({'jax', 'jaxlib'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


def test_xla_flags_replace_the_device_count_and_keep_the_rest():
    assert xla_flags(None, 4) == "--xla_force_host_platform_device_count=4"
    assert xla_flags("--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=8 --xla_foo", 2) == \
        "--xla_dump_to=/tmp/d --xla_foo --xla_force_host_platform_device_count=2"


def test_exit_status_of_a_signal_is_128_plus_it():
    assert exit_status(-signal.SIGKILL) == 137 and exit_status(3) == 3 and exit_status(0) == 0
