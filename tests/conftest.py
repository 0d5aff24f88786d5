"""Shared fixtures. Every test process sees 8 fake CPU devices, so mesh tests need no subprocess.

Compiled programs are kept in JAX's persistent compilation cache under .cache/jax (the variables are
inherited by the binaries tests start): the suite compiles the same tiny train step dozens of times, in
processes of its own, and a cache hit takes a second where a compile takes ten or more on two cores. The
cache is keyed by the program, its compile options and the JAX version, so it changes no result (one
exception seen: 2 processes x 1 CPU device with a warm cache once failed in gloo; test_gke runs those cold).
"""

import os
import pathlib
import signal
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]

# LLVM at -O1 for the suite's CPU programs (the binaries tests start keep these flags: launch.local_cluster's
# xla_flags changes only the device count): the tiny train step compiles in about half the time of -O2 and
# runs as fast (its matmuls are library calls), and the suite compiles far more than it runs. Results agree
# with -O2 to fp32 rounding (6 steps: the same losses bitwise, one gradient norm 1e-7 apart), and every
# program of a test, in whichever process, compiles at the same level.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=1"
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The trainer's measured CPU peak (mesh/peak_flops.py) is kept per user; the suite keeps its own.
os.environ.setdefault("XDG_CACHE_HOME", str(ROOT / ".cache"))
# For the binaries tests start with an environment of their own choosing.
JAX_CACHE_ENV = {k: os.environ[k] for k in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
# data_cache_dir of the tests that run the demo configs on their own data: the demo sets (20,000 training
# shapes: 20 s of generating) are made once for the suite, by whichever test comes first (a racer's copy is
# discarded: data/demo_data.py publishes by rename).
DEMO_CACHE = ROOT / ".cache"

import pytest  # noqa: E402

CONFIGS = ROOT / "configs"

# A tiny model: fast to compile, every dimension divisible by the 2x2x2 test mesh.
TINY = [
    "image_size=32", "patch_size=8", "embed_dim=32", "vocab_size=128", "global_batch_size=8",
    "vision.width=32", "vision.depth=2", "vision.mlp_dim=64", "vision.num_heads=2",
    "text.width=32", "text.depth=2", "text.mlp_dim=64", "text.num_heads=2", "text.context_length=8",
    "decoder.width=32", "decoder.depth=1", "decoder.mlp_dim=64", "decoder.num_heads=2",
    "decoder.caption_length=8", "dtype=float32", "remat_policy=none",
]


@pytest.fixture(scope="session")
def root() -> pathlib.Path:
    return ROOT


def tiny_config(*overrides: str, num_devices: int = 1):
    from openvision_max.config import load_config
    return load_config([str(CONFIGS / "base.yml"), *TINY, *overrides], platform="cpu", num_devices=num_devices)


# The longest tests (several processes, whole training runs) start first, so that on two workers the suite
# does not end with one of them still running a long test while the other waits.
SLOW_FIRST = ("test_multihost.py", "test_readme.py", "test_evals.py", "test_gcs_run.py", "test_train_binary.py",
              "test_observe.py", "test_benchmark.py", "test_gke.py", "test_step.py", "test_aot.py", "test_remat.py",
              "test_attention.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))


@pytest.fixture
def processes():
    """Popen objects (started with start_new_session=True) killed by process group when the test ends, however
    it ends."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
