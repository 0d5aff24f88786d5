"""Flash attention for NVIDIA GPUs (Pallas/Triton): the TPU kernel's algorithm with Triton's shape rules.

Same masks, padding and block skipping as `flash_attention` (it shares `_Geometry`), but Triton has no
sequential grid axis with VMEM scratch: each program owns one query block (forward, dQ) or one key block
(dK/dV) and loops over the other axis itself, only over the blocks it needs (`fori_loop` with a per-program
trip count: skipped blocks cost nothing). Triton wants power-of-two block shapes, so head_dim is padded to
the next power of two (72, 80, 96 -> 128; zero columns change no dot product) and the sequence to the
block. Statistics (lse, di) are [B, H, T] vectors. Memory O(T) per head, as on TPU.

Untested on a GPU here (none was available): checked in Pallas' interpreter on CPU against `dot_product`,
and lowered to Triton IR for CUDA on a CPU host.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from openvision_kernels.flash_attention import MASK_VALUE, _dot, _Geometry

NUM_WARPS = 4
NUM_STAGES = 2


def _masked(geo: _Geometry, s, q_start, k_start):
    return jnp.where(geo.visible(q_start, k_start), s, MASK_VALUE) if geo.has_mask() else s


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, geo: _Geometry):
    qi = pl.program_id(2)
    bq, bk = geo.block_q, geo.block_kv
    q = q_ref[...]

    def step(kj, carry):
        m, l, acc = carry
        k, v = k_ref[pl.ds(kj * bk, bk), :], v_ref[pl.ds(kj * bk, bk), :]
        s = _masked(geo, _dot(q, k, (1, 1)) * geo.scale, qi * bq, kj * bk)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp(s - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        return m_new, alpha * l + jnp.sum(p, axis=1), alpha[:, None] * acc + _dot(p.astype(v.dtype), v, (1, 0))

    init = (jnp.full((bq,), MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, q.shape[-1]), jnp.float32))
    m, l, acc = lax.fori_loop(0, geo.last_kv_block(qi) + 1, step, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref, *, geo: _Geometry):
    kj = pl.program_id(2)
    bq, bk = geo.block_q, geo.block_kv
    k, v = k_ref[...], v_ref[...]

    def step(qi, carry):
        dk, dv = carry
        rows = pl.ds(qi * bq, bq)
        q, do = q_ref[rows, :], do_ref[rows, :]
        s = _masked(geo, _dot(q, k, (1, 1)) * geo.scale, qi * bq, kj * bk)
        p = jnp.exp(s - lse_ref[rows][:, None])
        ds = p * (_dot(do, v, (1, 1)) - di_ref[rows][:, None]) * geo.scale
        return dk + _dot(ds.astype(q.dtype), q, (0, 0)), dv + _dot(p.astype(do.dtype), do, (0, 0))

    first, last = geo.q_block_range(kj)
    zeros = jnp.zeros(k.shape, jnp.float32)
    # Key blocks past the real length see no query: the range is empty there (first > last is not enough,
    # q_block_range clamps first, so bound the loop by the key block's own need).
    stop = jnp.where(kj * bk < geo.seq_len, last + 1, first)
    dk, dv = lax.fori_loop(first, stop, step, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_ref, *, geo: _Geometry):
    qi = pl.program_id(2)
    bq, bk = geo.block_q, geo.block_kv
    q, do = q_ref[...], do_ref[...]
    lse, di = lse_ref[...][:, None], di_ref[...][:, None]

    def step(kj, dq):
        k, v = k_ref[pl.ds(kj * bk, bk), :], v_ref[pl.ds(kj * bk, bk), :]
        s = _masked(geo, _dot(q, k, (1, 1)) * geo.scale, qi * bq, kj * bk)
        p = jnp.exp(s - lse)
        ds = p * (_dot(do, v, (1, 1)) - di) * geo.scale
        return dq + _dot(ds.astype(k.dtype), k, (1, 0))

    dq = lax.fori_loop(0, geo.last_kv_block(qi) + 1, step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _call(kernel, geo: _Geometry, grid_blocks: int, ins, outs, in_specs, out_specs, interpret, name):
    b, h = ins[0].shape[:2]
    return pl.pallas_call(
        functools.partial(kernel, geo=geo), out_shape=outs, grid=(b, h, grid_blocks),
        in_specs=in_specs, out_specs=out_specs, interpret=interpret, name=name,
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES))(*ins)


def _whole(tp, d):
    """The whole padded sequence of one (batch, head): the kernel slices its blocks itself."""
    return pl.BlockSpec((None, None, tp, d), lambda b_, h_, i: (b_, h_, 0, 0))


def _whole_vec(tp):
    return pl.BlockSpec((None, None, tp), lambda b_, h_, i: (b_, h_, 0))


def _forward(q, k, v, geo: _Geometry, interpret):
    b, h, tp, d = q.shape
    rows = pl.BlockSpec((None, None, geo.block_q, d), lambda b_, h_, i: (b_, h_, i, 0))
    stats = pl.BlockSpec((None, None, geo.block_q), lambda b_, h_, i: (b_, h_, i))
    return _call(_fwd_kernel, geo, geo.num_q, (q, k, v),
                 (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, tp), jnp.float32)),
                 [rows, _whole(tp, d), _whole(tp, d)], (rows, stats), interpret, "flash_attention_gpu_fwd")


def _backward(q, k, v, o, lse, do, geo: _Geometry, interpret):
    b, h, tp, d = q.shape
    di = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    ins = (q, k, v, do, lse, di)
    kv_rows = pl.BlockSpec((None, None, geo.block_kv, d), lambda b_, h_, j: (b_, h_, j, 0))
    whole = [_whole(tp, d), kv_rows, kv_rows, _whole(tp, d), _whole_vec(tp), _whole_vec(tp)]
    dk, dv = _call(_dkv_kernel, geo, geo.num_kv, ins,
                   (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
                   whole, (kv_rows, kv_rows), interpret, "flash_attention_gpu_dkv")
    q_rows = pl.BlockSpec((None, None, geo.block_q, d), lambda b_, h_, i: (b_, h_, i, 0))
    q_stats = pl.BlockSpec((None, None, geo.block_q), lambda b_, h_, i: (b_, h_, i))
    dq = _call(_dq_kernel, geo, geo.num_q, ins, jax.ShapeDtypeStruct(q.shape, q.dtype),
               [q_rows, _whole(tp, d), _whole(tp, d), q_rows, q_stats, q_stats], q_rows, interpret,
               "flash_attention_gpu_dq")
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _flash(q, k, v, fwd_geo: _Geometry, bwd_geo: _Geometry, interpret):
    return _forward(q, k, v, fwd_geo, interpret)[0]


def _flash_fwd(q, k, v, fwd_geo, bwd_geo, interpret):
    o, lse = _forward(q, k, v, fwd_geo, interpret)
    return o, (q, k, v, o, lse)


def _flash_bwd(fwd_geo, bwd_geo, interpret, residuals, do):
    return _backward(*residuals, do, bwd_geo, interpret)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def flash_attention_gpu(q: jax.Array, k: jax.Array, v: jax.Array, *, prefix_len: Optional[int] = None,
                        block_q: int = 64, block_kv: int = 64, block_q_bwd: int = 64, block_kv_bwd: int = 64,
                        interpret=False) -> jax.Array:
    """Softmax attention of q, k, v [batch, seq, heads, head_dim] -> [batch, seq, heads, head_dim] (Triton).

    Blocks must be powers of two (Triton); they shrink to the sequence's next power of two for short ones.
    """
    b, t, h, d = q.shape
    blocks = (block_q, block_kv, block_q_bwd, block_kv_bwd)
    if any(x & (x - 1) or x < 16 for x in blocks):
        raise ValueError(f"Triton blocks must be powers of two >= 16, got {blocks}")
    blocks = tuple(min(x, max(16, _pow2(t))) for x in blocks)
    step = max(blocks)  # powers of two: the largest is a multiple of all
    tp, dp = -(-t // step) * step, _pow2(max(d, 16))

    def geometry(bq: int, bk: int) -> _Geometry:
        return _Geometry(seq_len=t, padded_len=tp, block_q=bq, block_kv=bk, prefix_len=prefix_len, scale=d ** -0.5)

    def to_kernel(x):  # [B, T, H, D] -> [B, H, Tp, Dp]
        return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, tp - t), (0, dp - d)))

    out = _flash(to_kernel(q), to_kernel(k), to_kernel(v), geometry(*blocks[:2]), geometry(*blocks[2:]), interpret)
    return jnp.swapaxes(out[:, :, :t, :d], 1, 2)
