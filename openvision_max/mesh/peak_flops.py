"""Peak FLOP/s per device, the denominator of MFU: datasheet figures, or a measured probe on CPU."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp

# Dense peak FLOP/s per device (one chip; JAX sees one device per chip on these), from vendor datasheets.
# (bfloat16, float32). TPUs publish no separate fp32 figure: fp32 matmuls run as bf16 passes on the MXU, so
# MFU of an fp32 run is stated against the bf16 peak.
PEAK_FLOPS = {
    "TPU v4": (275e12, 275e12),
    "TPU v5 lite": (197e12, 197e12),   # v5e
    "TPU v5e": (197e12, 197e12),
    "TPU v5p": (459e12, 459e12),
    "TPU v5": (459e12, 459e12),         # v5p reports "TPU v5"
    "TPU v6 lite": (918e12, 918e12),   # v6e (Trillium)
    "TPU v6e": (918e12, 918e12),
    "A100": (312e12, 19.5e12),
    "H100": (989e12, 67e12),
    "H200": (989e12, 67e12),
}


def datasheet_peak(device_kind: str, dtype: str) -> float | None:
    """The table entry whose name is the longest match inside `device_kind`, or None."""
    matches = [k for k in PEAK_FLOPS if k.lower() in device_kind.lower()]
    if not matches:
        return None
    bf16, fp32 = PEAK_FLOPS[max(matches, key=len)]
    return bf16 if dtype == "bfloat16" else fp32


# Matmul shapes (M, K, N) the CPU probe tries: square and flat ones of the sizes a ViT's dots have. The best
# of them is the peak; which one gave it goes into the report.
PROBE_SHAPES = ((1024, 1024, 1024), (2048, 2048, 2048), (4096, 1024, 2048))


@functools.lru_cache(maxsize=None)  # once per dtype and process: a sweep measures many points
def measure_peak(dtype: str, shapes=PROBE_SHAPES, repeats: int = 3) -> tuple[float, str]:
    """(matmul FLOP/s of this host at `dtype` with fp32 accumulation, the shape that gave it): the best over
    `shapes` of the best of `repeats`. One device's matmul uses every core of the host (XLA's CPU thread
    pool is shared by all local devices), so this is the whole host's figure."""
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    best_rate, best_shape = 0.0, ""
    for m, k, n in shapes:
        a, b = jnp.ones((m, k), dtype), jnp.ones((k, n), dtype)
        f(a, b).block_until_ready()
        for _ in range(repeats):
            t0 = time.perf_counter()
            f(a, b).block_until_ready()
            rate = 2 * m * k * n / (time.perf_counter() - t0)
            if rate > best_rate:
                best_rate, best_shape = rate, f"{m}x{k} @ {k}x{n}"
    return best_rate, best_shape


def _host_key(device_kind: str, dtype: str) -> str:
    """What a measured host peak depends on: the processor, the cores this process may use, the JAX version."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{device_kind}|{model}|{cores} cores|jax {jax.__version__}|{dtype}"


def _cache_file() -> pathlib.Path:
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "openvision-max" / \
        "measured-peaks.json"


def _cached_measure(device_kind: str, dtype: str) -> tuple[float, str, str]:
    """measure_peak through a per-user file keyed by the host (`_host_key`): the probe costs seconds at every
    start of the trainer, for a figure that only changes with the machine. Returns (rate, shape, where)."""
    path, key = _cache_file(), _host_key(device_kind, dtype)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), dict) and {"rate", "shape"} <= set(known[key]):
        return float(known[key]["rate"]), str(known[key]["shape"]), f"; cached in {path}"
    rate, shape = measure_peak(dtype)
    _remember(known, key, rate, shape)
    return rate, shape, ""


def _remember(known: dict, key: str, rate: float, shape: str) -> None:
    """Keeps the best rate measured for `key` (a peak: a probe on a busy host reads low, never high)."""
    if isinstance(known.get(key), dict) and float(known[key].get("rate", 0)) >= rate:
        return
    path = _cache_file()
    try:  # best effort, atomic: several processes of one job may start at once
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**known, key: {"rate": rate, "shape": shape}}, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass


def peak_flops_per_device(dtype: str, *, cached: bool = True) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from). On CPU the host's matmul peak, measured once
    per host and kept in a per-user file (`cached`), or measured now (`cached=False`: a benchmark, whose
    figure replaces the file's when higher). Delete ~/.cache/openvision-max/measured-peaks.json to re-measure."""
    device = jax.devices()[0]
    peak = datasheet_peak(device.device_kind, dtype)
    if peak is not None:
        return peak, f"datasheet ({device.device_kind}, {dtype})"
    # CPU (or an unknown accelerator): measure. Fake CPU devices share the host's cores.
    if cached:
        host_peak, shape, where = _cached_measure(device.device_kind, dtype)
    else:
        (host_peak, shape), where = measure_peak(dtype), ""
        try:
            known = json.loads(_cache_file().read_text())
        except (OSError, ValueError):
            known = {}
        _remember(known, _host_key(device.device_kind, dtype), host_peak, shape)
    return (host_peak / jax.local_device_count(),
            f"measured matmul peak ({device.device_kind}, {dtype} in, fp32 accumulation, best shape {shape}: "
            f"{host_peak / 1e9:.0f} GFLOP/s for the host{where})")
