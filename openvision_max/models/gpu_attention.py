"""Which fused kernel `attention=flash` runs on an NVIDIA GPU: cuDNN or the Pallas/Triton kernel.

cuDNN takes only bf16/fp16 and head dims that are multiples of 8 up to 256 (128 before Hopper); outside that
the Pallas kernel runs. Inside it, the faster one wins: on first use of a shape (per process) both are timed,
forward + backward, on random inputs of the per-device shape on the local GPU, and the choice is logged.
Without a local GPU (an AOT compile for GPU from another host) nothing can be timed and cuDNN is taken.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def cudnn_supports(dtype, head_dim: int) -> bool:
    return jnp.dtype(dtype) in [jnp.dtype(d) for d in CUDNN_DTYPES] and head_dim % 8 == 0 and head_dim <= 256


def measure_on_gpu(fn: Callable[..., jax.Array], shape: tuple[int, ...], dtype,
                   prefix_len: Optional[int]) -> Optional[float]:
    """Seconds per forward + backward of fn on the local GPU (median of 5); None without a GPU, inf if the
    kernel refuses the shape (cuDNN raises at compile time for what it does not support)."""
    try:
        gpu = jax.devices("gpu")[0]
    except RuntimeError:
        return None
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.device_put(jax.random.normal(key, shape, jnp.float32).astype(dtype), gpu) for key in keys)
    step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, prefix_len=prefix_len).astype(jnp.float32)),
                            argnums=(0, 1, 2)))
    try:
        jax.block_until_ready(step(q, k, v))
    except Exception as e:  # noqa: BLE001 - any refusal means "cannot run this shape"
        log.warning("attention=flash probe: %s failed on %s %s: %s", getattr(fn, "__name__", fn), shape,
                    jnp.dtype(dtype).name, str(e).splitlines()[0])
        return float("inf")
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(step(q, k, v))
        times.append(time.perf_counter() - t0)
    return sorted(times)[2]


@functools.cache
def choose(shape: tuple[int, ...], dtype, prefix_len: Optional[int], cudnn: Callable, pallas: Callable,
           measure: Callable = measure_on_gpu) -> str:
    """"cudnn" or "pallas" for q, k, v of this per-device `shape` [batch, seq, heads, head_dim]."""
    if not cudnn_supports(dtype, shape[-1]):
        return "pallas"
    t_cudnn = measure(cudnn, shape, dtype, prefix_len)
    if t_cudnn is None:
        return "cudnn"
    t_pallas = measure(pallas, shape, dtype, prefix_len)
    choice = "pallas" if t_pallas < t_cudnn else "cudnn"
    log.warning("attention=flash on GPU, %s %s prefix_len=%s: cuDNN %.3f ms, Pallas %.3f ms (measured) -> %s",
                shape, jnp.dtype(dtype).name, prefix_len, t_cudnn * 1e3, t_pallas * 1e3, choice)
    return choice
