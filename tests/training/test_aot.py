"""Ahead-of-time compilation for a TPU topology (libtpu's compile-only devices) and topology names.

The compile tests need libtpu (skipped without it) and compile a tiny model: ~15-20 s each on two cores.
"""

import json
import os
import subprocess
import sys

import pytest

from openvision_max.config import topology
from openvision_max.config.schema import ConfigError

from conftest import CONFIGS, ROOT, TINY


@pytest.mark.parametrize("name, grid, chips", [
    ("v5p-8", "v5p:2x2x1", 4), ("v5p-16", "v5p:2x2x2", 8), ("v5p-256", "v5p:4x4x8", 128),
    ("v5p-384", "v5p:4x4x12", 192), ("v5p-768", "v5p:4x8x12", 384), ("v4-8", "v4:2x2x1", 4),
    ("v4-512", "v4:4x8x8", 256), ("v5e-1", "v5e:1x1", 1), ("v5e-8", "v5e:2x4", 8),
    ("v5litepod-16", "v5e:4x4", 16), ("v6e-256", "v6e:16x16", 256), ("v5p:4x8x12", "v5p:4x8x12", 384),
])
def test_topology_names(name, grid, chips):
    spec = topology.spec(name)
    assert (spec.grid_name, spec.chips) == (grid, chips)
    assert topology.chips(name)[1] == chips
    assert topology.device_count(name, 2) == 2 * chips


def test_hbm_per_chip():
    gib = 2 ** 30
    assert {k: topology.spec(n).hbm_bytes // gib for k, n in
            [("v4", "v4-8"), ("v5p", "v5p-8"), ("v5e", "v5e-4"), ("v6e", "v6e-4")]} == \
        {"v4": 32, "v5p": 95, "v5e": 16, "v6e": 32}


@pytest.mark.parametrize("name, needle", [
    ("v5p-4", "smallest v5p slice"), ("v5p-7", "2 cores per chip"), ("v5e-12", "no standard v5e slice"),
    ("v5p:2x2", "3 positive axes"), ("tpu-8", "not a TPU topology name"),
])
def test_bad_topology_names(name, needle):
    with pytest.raises(ConfigError, match=needle):
        topology.spec(name)


def test_topology_devices_one_per_chip_and_slices():
    pytest.importorskip("libtpu")
    one = topology.devices("v5p-8")
    assert len(one) == 4 and {d.device_kind for d in one} == {"TPU v5"}
    assert len(topology.devices("v4-8")) == 4  # megacore: one device per chip, not per TensorCore
    two = topology.devices("v5p-8", num_slices=2)
    assert len(two) == 8 and sorted({d.slice_index for d in two}) == [0, 1]
    assert len(topology.devices("v5e:1x1")) == 1


@pytest.fixture(scope="module")
def tiny_v5p8():
    """(config, report) of the tiny model AOT-compiled for v5p-8 (4 chips, fsdp over all of them), unrolled:
    the cost model counts a scanned layer once, so only an unrolled program has a modelled step time."""
    pytest.importorskip("libtpu")
    from openvision_max.config import load_config
    from openvision_max.training import aot
    cfg = load_config([str(CONFIGS / "base.yml"), *TINY, "compile_topology=v5p-8", "scan_layers=false"])
    return cfg, aot.report(cfg)


def test_aot_report_of_tiny_model(tiny_v5p8, capsys):
    cfg, r = tiny_v5p8
    assert (r["grid"], r["num_devices"], r["device_kind"]) == ("v5p:2x2x1", 4, "TPU v5")
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    m = r["memory"]
    assert m["total_bytes"] > 0 and m["argument_bytes"] > 0 and m["temp_bytes"] > 0 and m["fits"]
    # The donated state is aliased to the new state: nearly all of the output.
    assert 0 < m["alias_bytes"] <= m["output_bytes"]
    assert r["compiled_flops_per_device"] > 0 and r["model_flops_per_device"] > 0 and r["while_loops"] == []
    assert r["modelled_step_seconds"] > 0 and 0 < r["modelled_mfu"] < 1
    # The text names the compiler's time as modelled, and the JSON line carries the same figures.
    from openvision_max.training import aot
    text = aot.format_report(r)
    assert "modelled step time" in text and "not measured" in text and "measured" not in text.replace(
        "not measured", "")
    assert "fits" in text
    assert json.loads(json.dumps({"aot": r}, default=aot._jsonable))["aot"]["memory"] == m


def test_abstract_batch_matches_the_synthetic_pipeline(tiny_v5p8):
    """The AOT batch must have the layout the trainer feeds (data/synthetic.py)."""
    import functools

    import jax

    from openvision_max.data import synthetic
    from openvision_max.training import aot
    cfg, _ = tiny_v5p8
    mesh = aot.build_mesh(cfg)
    real = jax.eval_shape(functools.partial(synthetic._make, cfg), jax.random.key(0))
    fake = aot.abstract_batch(cfg, mesh)
    assert {k: (v.shape, v.dtype) for k, v in fake.items()} == {k: (v.shape, v.dtype) for k, v in real.items()}


def test_does_not_fit_is_reported():
    from openvision_max.training import aot
    text = aot.format_report(_fake_report(total=200e9, hbm=95 * 2 ** 30))
    assert "does NOT fit" in text
    assert ("not modelled: the compiler's cost model books each custom call it cannot cost at -1 s (25 SliceId, "
            "50 ZeroCrop; optimal_seconds=-75)") in text


def _fake_report(total: float, hbm: int) -> dict:
    return {
        "compile_topology": "v5p-8", "grid": "v5p:2x2x1", "num_slices": 1, "device_kind": "TPU v5",
        "num_devices": 4, "mesh": {}, "stage": "main", "global_batch_size": 8, "per_device_batch_size": 2,
        "image_size": 32, "dtype": "bfloat16", "lower_s": 1.0, "compile_s": 1.0,
        "cost_model_of": "the configured program",
        "memory": {"argument_bytes": 0, "output_bytes": 0, "alias_bytes": 0, "temp_bytes": total, "code_bytes": 0,
                   "total_bytes": total, "hbm_bytes": hbm, "fits": total <= hbm},
        "compiled_flops_per_device": 1e12, "compiled_bytes_accessed_per_device": 1e9,
        "model_flops_per_device": 1e12, "while_loops": [], "optimal_seconds_raw": -75.0,
        "uncosted_custom_calls": {"SliceId": 25, "ZeroCrop": 50},
        "modelled_step_seconds": None, "peak_flops_per_device": 459e12, "modelled_mfu": None,
        "modelled_samples_per_second": None,
    }


def _user_env() -> dict:
    """The environment of a user's shell: none of the variables conftest or libtpu_env_for_cpu_host set, so
    libtpu's start-up noise, or a clash on its lock file with this process, would show."""
    drop = ("JAX_PLATFORMS", "XLA_FLAGS", "TPU_HOST_BOUNDS", "TPU_WORKER_HOSTNAMES", "ALLOW_MULTIPLE_LIBTPU_LOAD",
            "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
    return {k: v for k, v in os.environ.items() if k not in drop}


def test_train_py_compiles_and_does_not_train(tmp_path, tiny_v5p8):
    """The binary with compile_topology= prints the report and exits 0, with a quiet stderr, while this
    process holds libtpu too (the fixture); no run directory, no metrics. demo.yml scans its layers, so the
    cost model is taken from the same step compiled unrolled, and says so."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), str(CONFIGS / "demo.yml"), "compile_topology=v5p-8",
         f"base_output_directory={tmp_path}"],
        capture_output=True, text=True, cwd=ROOT, env=_user_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(ln)["aot"] for ln in proc.stdout.splitlines() if ln.startswith('{"aot"')]
    assert len(lines) == 1, proc.stdout
    r = lines[0]
    assert r["memory"]["total_bytes"] > 0 and r["compiled_flops_per_device"] > 0
    assert "vision/transformer" in r["while_loops_of_configured_program"] and r["while_loops"] == []
    assert r["cost_model_of"] == "the same step unrolled (scan_layers=false)"
    assert r["modelled_step_seconds"] > 0 and 0 < r["modelled_mfu"] < 1
    assert ("modelled step time (TPU compiler cost model of the same step unrolled (scan_layers=false), "
            "not measured)") in proc.stdout
    assert not list(tmp_path.rglob("metrics.jsonl")) and not any(tmp_path.iterdir())
    assert proc.stderr.strip() == "", proc.stderr


def test_config_error_is_one_line_with_libtpu_installed():
    """libtpu on a CPU host must not add its warnings to the one-line config error (exit 2)."""
    pytest.importorskip("libtpu")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), str(CONFIGS / "demo.yml"), "attention=cudnn"],
        capture_output=True, text=True, cwd=ROOT, env=_user_env(), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "train.py: config error: attention='cudnn' is not available on cpu; available: dot_product, flash"], proc.stderr


def test_a_refused_cost_model_says_why_and_is_not_compiled_twice():
    """The demo on v5e-4: the compiler slices the prefetch of its vocab-sized shards (ConcatBitcast custom
    calls, which the cost model books at -1 s each), so no time is modelled; the unrolled program would hold
    the same calls, so it is not compiled."""
    pytest.importorskip("libtpu")
    from openvision_max.config import load_config
    from openvision_max.training import aot
    r = aot.report(load_config([str(CONFIGS / "demo.yml"), "compile_topology=v5e-4"]))
    assert r["optimal_seconds_raw"] <= 0 and r["modelled_step_seconds"] is None
    assert r["uncosted_custom_calls"].get("ConcatBitcast", 0) > 0
    assert "unrolled_compile_s" not in r and r["cost_model_of"] == "the configured program"
    assert "not modelled: the compiler's cost model books each custom call it cannot cost at -1 s (" in \
        aot.format_report(r)
