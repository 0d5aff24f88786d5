"""Attention implementations behind the `attention` config key.

All take q, k, v as [batch, seq, heads, head_dim] and return [batch, seq, heads, head_dim]. `prefix_len`
selects the caption decoder's prefix-LM mask: positions < prefix_len attend bidirectionally among
themselves, later positions attend to the whole prefix and causally among themselves. None means
unmasked bidirectional attention (vision and text towers).

`flash` is the Pallas kernel of `openvision_kernels.flash_attention` on TPU (interpreted on CPU) and, on
NVIDIA GPUs, the faster of cuDNN and `openvision_kernels.flash_attention_gpu`; under a mesh it runs per shard
inside `shard_map`.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from openvision_max.models import gpu_attention

# The logical names of q, k, v and the output (layers.Attention constrains them to these).
QKV_NAMES = ("activation_batch", "activation_length", "activation_heads", "activation_kv")


def prefix_lm_mask(q_len: int, kv_len: int, prefix_len: int) -> jax.Array:
    """Boolean [q_len, kv_len]: True where query i may attend key j."""
    i = jnp.arange(q_len)[:, None]
    j = jnp.arange(kv_len)[None, :]
    return (j < prefix_len) | (j <= i)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax_as(logits: jax.Array, dtype: Any) -> jax.Array:
    """softmax(logits) over the last axis, computed in fp32 and returned in `dtype`; the backward pass keeps
    only that `dtype` output. (jax.nn.softmax's rule keeps its fp32 output too: with bf16 compute that is a
    second, twice as large copy of every [B, H, T, T] probability tensor, 0.9 GB per decoder layer at L/14@224
    and 64 samples per chip, held from the forward to the backward pass of a tower without remat.)"""
    return _softmax_and_lse(logits.astype(jnp.float32), dtype)[0]


def _softmax_as_fwd(logits, dtype):
    probs = softmax_as(logits, dtype)
    return probs, probs


def _softmax_as_bwd(dtype, probs, g):
    # d softmax: p * (g - sum(g * p)), in fp32 from the kept probabilities.
    p, g = probs.astype(jnp.float32), g.astype(jnp.float32)
    return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),)


softmax_as.defvjp(_softmax_as_fwd, _softmax_as_bwd)


def dot_product(q: jax.Array, k: jax.Array, v: jax.Array, *, prefix_len: Optional[int]) -> jax.Array:
    """Plain softmax attention; logits and softmax in fp32, matmuls in the input dtype.

    With a prefix-LM mask (`prefix_lm`) the block of the probabilities that the mask zeroes is never formed."""
    t = q.shape[1]
    if prefix_len is None or prefix_len >= t:
        return _softmax_attention(q, k, v)
    return prefix_lm(q, k, v, prefix_len)


def _scaled_logits(q: jax.Array, k: jax.Array) -> jax.Array:
    scale = q.shape[-1] ** -0.5
    return jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k, preferred_element_type=jnp.float32)


def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return jnp.einsum("bhqk,bkhd->bqhd", softmax_as(_scaled_logits(q, k), v.dtype), v)


def _query_rows_bias(t: int, prefix_len: int) -> jax.Array:
    """The query rows' mask as an additive [T - P, T] bias: the whole prefix, then causal among the queries
    (min + any finite logit stays finite and its exp is 0)."""
    mask = prefix_lm_mask(t, t, prefix_len)[prefix_len:]
    return jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def prefix_lm(q: jax.Array, k: jax.Array, v: jax.Array, prefix_len: int) -> jax.Array:
    """Prefix-LM attention in two parts: the prefix rows attend to the prefix only ([P, P] probabilities) and
    the query rows to every key ([T - P, T]), so the [P, T - P] block that the mask zeroes is never formed.

    The backward pass keeps q, k, v and each row's fp32 log-sum-exp, and recomputes the probabilities from
    them, as flash attention does: a decoder without remat would otherwise hold two bf16 probability tensors
    per layer from the forward to the backward pass (0.26 GB a layer at L/14@224 and 64 samples per chip, 3.1
    GB over its 12 layers), for one extra q k^T matmul per part in the backward pass."""
    return _prefix_lm_fwd(q, k, v, prefix_len)[0]


def _softmax_and_lse(logits: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """softmax over the last axis of fp32 `logits`, returned in `dtype` (the same operations as
    jax.nn.softmax), and the rows' fp32 log-sum-exp, from which `_probabilities` recomputes it."""
    top = jnp.max(logits, axis=-1, keepdims=True, initial=-jnp.inf)  # initial: a causal decoder's empty prefix
    unnormalised = jnp.exp(logits - top)
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    return (unnormalised / total).astype(dtype), top + jnp.log(total)


def _probabilities(logits: jax.Array, lse: jax.Array, dtype: Any) -> jax.Array:
    """The forward pass's probabilities again, within fp32 rounding: exp(logits - log-sum-exp)."""
    return jnp.exp(logits - lse).astype(dtype)


def _prefix_lm_parts(q, k, prefix_len):
    """The two parts' fp32 logits: prefix rows over the prefix keys, query rows (masked) over every key."""
    p = prefix_len
    return (_scaled_logits(q[:, :p], k[:, :p]),
            _scaled_logits(q[:, p:], k) + _query_rows_bias(q.shape[1], p))


def _prefix_lm_fwd(q, k, v, prefix_len):
    p = prefix_len
    logits_prefix, logits_queries = _prefix_lm_parts(q, k, p)
    probs_prefix, lse_prefix = _softmax_and_lse(logits_prefix, v.dtype)
    probs_queries, lse_queries = _softmax_and_lse(logits_queries, v.dtype)
    out = jnp.concatenate([jnp.einsum("bhqk,bkhd->bqhd", probs_prefix, v[:, :p]),
                           jnp.einsum("bhqk,bkhd->bqhd", probs_queries, v)], axis=1)
    return out, (q, k, v, lse_prefix, lse_queries)


def _attention_part_bwd(q, k, v, probs, g):
    """Gradients of q, k, v for one part, out = softmax(q k^T * scale + bias) v, from its probabilities: the
    same matmul and softmax forms as autodiff of `_softmax_attention` (fp32 softmax gradient)."""
    scale = q.shape[-1] ** -0.5
    d_v = jnp.einsum("bhqk,bqhd->bkhd", probs, g)
    d_probs = jnp.einsum("bqhd,bkhd->bhqk", g, v)
    (d_logits,) = _softmax_as_bwd(v.dtype, probs, d_probs)
    d_logits = d_logits.astype(q.dtype)
    d_q = jnp.einsum("bhqk,bkhd->bqhd", d_logits, k, preferred_element_type=jnp.float32)
    d_k = jnp.einsum("bhqk,bqhd->bkhd", d_logits, q * jnp.asarray(scale, q.dtype),
                     preferred_element_type=jnp.float32)
    return (d_q * scale).astype(q.dtype), d_k.astype(k.dtype), d_v


def _prefix_lm_bwd(prefix_len, residuals, g):
    # Tied to the incoming gradient, the recompute can neither be merged with the forward's q k^T (which
    # would keep its fp32 logits instead) nor be scheduled before this layer's backward pass begins.
    q, k, v, lse_prefix, lse_queries = residuals
    q, k, lse_prefix, lse_queries, g = jax.lax.optimization_barrier((q, k, lse_prefix, lse_queries, g))
    p = prefix_len
    g = g.astype(v.dtype)
    logits_prefix, logits_queries = _prefix_lm_parts(q, k, p)
    probs_prefix = _probabilities(logits_prefix, lse_prefix, v.dtype)
    probs_queries = _probabilities(logits_queries, lse_queries, v.dtype)
    dq_p, dk_p, dv_p = _attention_part_bwd(q[:, :p], k[:, :p], v[:, :p], probs_prefix, g[:, :p])
    dq_q, dk_q, dv_q = _attention_part_bwd(q[:, p:], k, v, probs_queries, g[:, p:])
    tail = ((0, 0), (0, k.shape[1] - p), (0, 0), (0, 0))
    return (jnp.concatenate([dq_p, dq_q], axis=1), dk_q + jnp.pad(dk_p, tail), dv_q + jnp.pad(dv_p, tail))


prefix_lm.defvjp(_prefix_lm_fwd, _prefix_lm_bwd)


def cudnn(q: jax.Array, k: jax.Array, v: jax.Array, *, prefix_len: Optional[int],
          implementation: str = "cudnn") -> jax.Array:
    """NVIDIA cuDNN fused attention (GPU only; bf16/fp16, head_dim a multiple of 8 up to 128, 256 on Hopper).

    cuDNN turns a mask into a bias, and trains with a bias only at even lengths (the decoder's are odd at
    most resolutions): there the sequence is padded by one and the pad masked by sequence lengths, which
    cuDNN applies natively. `implementation="xla"` runs the same call through XLA (tests on CPU).
    """
    if prefix_len is None:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    b, t = q.shape[:2]
    padded = t + t % 2

    def pad(x):
        return jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, 0)))

    lengths = jnp.full((b,), t, jnp.int32)
    out = jax.nn.dot_product_attention(
        pad(q), pad(k), pad(v), mask=prefix_lm_mask(padded, padded, prefix_len)[None, None],
        query_seq_lengths=lengths, key_value_seq_lengths=lengths, implementation=implementation)
    return out[:, :t]


def flash(q: jax.Array, k: jax.Array, v: jax.Array, *, prefix_len: Optional[int], platform: str,
          block_q: int, block_kv: int, block_q_bwd: int, block_kv_bwd: int) -> jax.Array:
    """Flash attention for `platform` (the one the config compiles for, not the tracing host's).

    TPU: the Pallas kernel (Mosaic). CPU: the same kernel in Pallas' interpreter (slow; said once in the
    log). GPU: the faster of cuDNN and the Pallas/Triton kernel per shape (`gpu_attention.choose`); the block
    sizes are the TPU kernel's (the Triton kernel keeps its own power-of-two blocks).
    """
    if platform == "gpu":
        return _per_shard(_gpu_flash, q, k, v, prefix_len=prefix_len)
    from openvision_kernels.flash_attention import BlockSizes, flash_attention

    interpret = False
    if platform == "cpu":
        _warn_interpreting()
        # Pallas' generic interpreter (the grid and kernel body as XLA ops): 5x faster here than the TPU
        # interpreter (`pltpu.InterpretParams()`, which the kernel tests also run) on the tiny test models.
        interpret = True
    blocks = BlockSizes(block_q, block_kv, block_q_bwd, block_kv_bwd)
    return _per_shard(functools.partial(flash_attention, blocks=blocks, interpret=interpret), q, k, v,
                      prefix_len=prefix_len)


def _gpu_flash(q: jax.Array, k: jax.Array, v: jax.Array, *, prefix_len: Optional[int]) -> jax.Array:
    from openvision_kernels.flash_attention_gpu import flash_attention_gpu
    kind = gpu_attention.choose(tuple(q.shape), q.dtype, prefix_len, cudnn, flash_attention_gpu)
    return (cudnn if kind == "cudnn" else flash_attention_gpu)(q, k, v, prefix_len=prefix_len)


def _per_shard(fn: Callable[..., jax.Array], q, k, v, *, prefix_len: Optional[int]) -> jax.Array:
    """fn(q, k, v) on each device's shard when a mesh is active: a custom kernel is opaque to the SPMD
    partitioner, so it runs under `shard_map` with the batch and heads split as the logical rules say
    (attention needs the whole sequence and head_dim per shard; `activation_length`/`_kv` are replicated).
    A dimension its mesh axes do not divide (model.init's batch of 1) is left whole rather than failing."""
    call = functools.partial(fn, prefix_len=prefix_len)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return call(q, k, v)
    logical = nn.logical_to_mesh_axes(QKV_NAMES) or (None,) * q.ndim

    def divides(axes, size: int) -> bool:
        names = (axes,) if isinstance(axes, str) else axes or ()
        return size % math.prod(mesh.shape[a] for a in names) == 0

    spec = jax.sharding.PartitionSpec(*(a if divides(a, n) else None for a, n in zip(logical, q.shape)))
    return jax.shard_map(call, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


@functools.cache
def _warn_interpreting() -> None:
    logging.getLogger(__name__).warning(
        "attention=flash on CPU: running the Pallas TPU kernel in interpret mode (correct, slow)")


IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    "dot_product": dot_product,
    "flash": flash,
    "cudnn": cudnn,
}


def options(cfg: Any, kind: str) -> tuple[tuple[str, Any], ...]:
    """The keyword options `get` needs for attention `kind` under `cfg`, as a hashable tuple (for
    StackConfig)."""
    if kind != "flash":
        return ()
    return (("platform", cfg.derived.platform), ("block_q", cfg.flash_block_q), ("block_kv", cfg.flash_block_kv),
            ("block_q_bwd", cfg.flash_block_q_bwd), ("block_kv_bwd", cfg.flash_block_kv_bwd))


def get(kind: str, **opts: Any) -> Callable[..., jax.Array]:
    """The implementation for a config's `attention` value (validated by the config schema), with `opts`
    (from `options(cfg, kind)`) bound."""
    return functools.partial(IMPLEMENTATIONS[kind], **opts) if opts else IMPLEMENTATIONS[kind]
