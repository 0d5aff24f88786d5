"""Peak FLOP/s per device, the denominator of MFU: datasheet figures, or a measured probe on CPU."""

from __future__ import annotations

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


def measure_peak(dtype: str, n: int = 1024, repeats: int = 5) -> float:
    """Matmul FLOP/s of this host at `dtype` (fp32 accumulation), best of `repeats`."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def peak_flops_per_device(dtype: str) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    device = jax.devices()[0]
    peak = datasheet_peak(device.device_kind, dtype)
    if peak is not None:
        return peak, f"datasheet ({device.device_kind}, {dtype})"
    # CPU (or an unknown accelerator): measure. Fake CPU devices share the host's cores.
    host_peak = measure_peak(dtype)
    return host_peak / jax.local_device_count(), f"measured matmul probe ({device.device_kind}, {dtype})"
