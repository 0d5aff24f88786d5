"""Flash attention for TPU (Pallas/Mosaic): online softmax forward, FlashAttention-2 backward, custom VJP.

Layout. Callers pass q, k, v as [batch, seq, heads, head_dim]; the kernels work on [batch, heads, seq,
head_dim] so that one (batch, head) pair is a grid cell and a block is a [block, head_dim] tile whose last
dimension is the full head_dim (72 and 80 work: a block dimension equal to the array's needs no 128
multiple).

Ragged tails. The grid covers the sequence rounded up to a multiple of both blocks (the TPU wants
128-multiple KV blocks, and 197, 257, 577, 730, 80 and the decoder's lengths are not multiples of anything
useful), but the arrays keep their real length: the last block of each runs past the end, Pallas reads
unspecified values there and drops the writes. Blocks that reach past the end take the masked path, which
zeroes the rows past the end of every input tile and masks keys and queries past it, so those values never
reach a real row. (A padded copy of q, k, v and o around every call, as before, was a fifth of the modelled
step of a ViT on TPU: head_dim 64 fills half the lanes and the pads were not fused.) Blocks larger than the
rounded length are shrunk to it (T=80 runs as one 128 block, not a 512 one).

Masks. `prefix_len=None` is bidirectional. `prefix_len=P` is the caption decoder's prefix-LM: key j is
visible to query i when j < P or j <= i. A (query block, key block) pair is classified per grid step:
fully hidden pairs are skipped (no matmul; their key/value block index repeats the previous one, so the
pipeline fetches nothing new either), fully visible pairs run without any mask arithmetic, and only the
pairs crossing the causal diagonal or the padding edge build the iota mask.

Memory. Forward keeps per query block a running max m, sum l and an f32 accumulator [block_q, head_dim];
it saves only o and the log-sum-exp (one float per row, stored as a [1, T] row: a [T, 1] column would take
128 lanes per row in HBM) for the backward, which recomputes the scores block by block: O(T) per head, never
O(T^2). Backward runs two kernels (dK/dV with the query blocks as the reduction axis, dQ with the key blocks
as the reduction axis), so no accumulation crosses grid cells; both compute keys-first ([block_kv, block_q])
so the per-query rows broadcast as they are.

Numerics. Matmuls take the input dtype (bf16 or f32) with f32 accumulation; softmax statistics are f32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# Finite "minus infinity": exp(MASK - m) is exactly 0 and MASK - MASK is 0, never NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LANES = 128  # TPU KV blocks must be multiples of this (the vector lane count)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query and key/value block lengths of the forward and the backward kernels (multiples of 128)."""
    block_q: int = 128
    block_kv: int = 128
    block_q_bwd: int = 128
    block_kv_bwd: int = 128

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if value <= 0 or value % LANES:
                raise ValueError(f"{name}={value} must be a positive multiple of {LANES}")


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Static facts of one call: real length, the length rounded up to every block (for cost estimates),
    blocks, mask."""
    seq_len: int
    padded_len: int
    block_q: int
    block_kv: int
    prefix_len: Optional[int]
    scale: float

    # Grid extents: blocks that hold some of the sequence (a block wholly past its end would be a write out
    # of bounds, not a dropped one).
    @property
    def num_q(self) -> int:
        return -(-self.seq_len // self.block_q)

    @property
    def num_kv(self) -> int:
        return -(-self.seq_len // self.block_kv)

    # Block classification, on traced block indices (grid program ids).
    def needed(self, q_start, k_start):
        """Some query row of the block sees some key of the block."""
        ok = k_start < self.seq_len
        if self.prefix_len is not None:
            ok = ok & ((k_start < self.prefix_len) | (k_start <= q_start + self.block_q - 1))
        return ok

    def full(self, q_start, k_start):
        """Every query row of the block sees every key of the block, and both lie within the sequence."""
        k_end = k_start + self.block_kv
        ok = (k_end <= self.seq_len) & (q_start + self.block_q <= self.seq_len)
        if self.prefix_len is not None:
            ok = ok & ((k_end <= self.prefix_len) | (k_end - 1 <= q_start))
        return ok

    def visible(self, q_start, k_start, keys_first: bool = False):
        """[block_q, block_kv] bool: query i sees key j ([block_kv, block_q] with `keys_first`)."""
        q_axis, k_axis = (1, 0) if keys_first else (0, 1)
        shape = (self.block_kv, self.block_q) if keys_first else (self.block_q, self.block_kv)
        queries = q_start + lax.broadcasted_iota(jnp.int32, shape, q_axis)
        keys = k_start + lax.broadcasted_iota(jnp.int32, shape, k_axis)
        ok = (keys < self.seq_len) & (queries < self.seq_len)
        if self.prefix_len is not None:
            ok = ok & ((keys < self.prefix_len) | (keys <= queries))
        return ok

    def rows(self, ref, start):
        """The tile of `ref` ([block, D], rows from `start`) with its rows past the sequence zeroed: the
        values Pallas reads there are unspecified (NaN included), and 0 * NaN would reach real rows."""
        x = ref[...]
        valid = start + lax.broadcasted_iota(jnp.int32, x.shape, 0) < self.seq_len
        return jnp.where(valid, x, jnp.zeros_like(x))

    def has_mask(self) -> bool:
        return bool(self.seq_len % self.block_q or self.seq_len % self.block_kv) or self.prefix_len is not None

    # Index-map clamps: skipped grid steps reuse the block of a needed step, so no new DMA is issued.
    def last_kv_block(self, qi):
        """The last key block query block `qi` needs."""
        last_real = (self.seq_len - 1) // self.block_kv
        if self.prefix_len is None:
            return last_real
        q_last = (qi + 1) * self.block_q - 1
        reach = _div(jnp.maximum(self.prefix_len - 1, q_last), self.block_kv)
        return jnp.minimum(reach, last_real)

    def q_block_range(self, kj):
        """(first, last) query block that needs key block `kj`; rows past seq_len only feed padding."""
        last = (self.seq_len - 1) // self.block_q
        if self.prefix_len is None:
            return 0, last
        k_start = kj * self.block_kv
        first = jnp.where(k_start < self.prefix_len, 0, _div(k_start, self.block_q))
        return jnp.minimum(first, last), last


def _div(x, n: int):
    """x // n for non-negative traced ints: truncating division, since Mosaic's lowering of the floor
    division's sign test asks the default backend (the CPU of an AOT host) for its TPU generation."""
    return lax.div(x, jnp.int32(n))


def _dot(a, b, contract: tuple[int, int]):
    """a @ b contracting dims `contract` (f32 accumulation; full f32 precision for f32 inputs)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, ((contract[:1], contract[1:]), ((), ())),
                           preferred_element_type=jnp.float32, precision=precision)


def _run_masked(geo: _Geometry, q_start, k_start, body, keys_first: bool = False):
    """Calls body(mask) where the block needs work: mask=None for fully visible blocks, else the iota mask."""
    if not geo.has_mask():
        body(None)
        return
    needed, full = geo.needed(q_start, k_start), geo.full(q_start, k_start)

    @pl.when(needed & full)
    def _unmasked():
        body(None)

    @pl.when(needed & jnp.logical_not(full))
    def _masked():
        body(geo.visible(q_start, k_start, keys_first))


# --- Forward ---------------------------------------------------------------------------------------------

def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, geo: _Geometry):
    qi, kj = pl.program_id(2), pl.program_id(3)

    @pl.when(kj == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    k_start = kj * geo.block_kv

    def body(mask):
        k, v = (k_ref[...], v_ref[...]) if mask is None else (geo.rows(k_ref, k_start), geo.rows(v_ref, k_start))
        s = _dot(q_ref[...], k, (1, 1)) * geo.scale
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        # Key block 0 is never skipped and every row sees key 0, so m_new is finite from the first step
        # and masked entries give exp(MASK - m_new) == 0.
        p = jnp.exp(s - m_new)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + _dot(p.astype(v.dtype), v, (1, 0))
        m_sc[...] = m_new

    _run_masked(geo, qi * geo.block_q, k_start, body)

    @pl.when(kj == geo.num_kv - 1)
    def _finish():
        l = l_sc[...]
        o_ref[...] = (acc_sc[...] / l).astype(o_ref.dtype)
        # Stored as a row [1, block_q]: a [T, 1] column would be padded to 128 lanes in HBM (128x its size).
        lse = jnp.broadcast_to(m_sc[...] + jnp.log(l), (geo.block_q, LANES))
        lse_ref[...] = lse.T[:1]


def _forward(q, k, v, geo: _Geometry, interpret):
    """q, k, v [B, H, T, D] -> (o [B, H, T, D], lse [B, H, 1, T] f32)."""
    b, h, t, d = q.shape
    tp = geo.padded_len
    bq, bk = geo.block_q, geo.block_kv
    q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j: (b_, h_, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d),
                           lambda b_, h_, i, j: (b_, h_, jnp.minimum(j, geo.last_kv_block(i)), 0))
    row_spec = pl.BlockSpec((None, None, 1, bq), lambda b_, h_, i, j: (b_, h_, 0, i))
    itemsize = q.dtype.itemsize
    cost = pl.CostEstimate(
        flops=int(4 * b * h * tp * tp * d * _visible_fraction(geo)),
        transcendentals=int(b * h * tp * tp * _visible_fraction(geo)),
        bytes_accessed=int(b * h * tp * d * itemsize * (2 + 2 * geo.num_q) + b * h * tp * 4))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, geo=geo),
        out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, 1, t), jnp.float32)),
        grid=(b, h, geo.num_q, geo.num_kv),
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=(q_spec, row_spec),
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, d), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
        name="flash_attention_fwd",
    )(q, k, v)


# --- Backward --------------------------------------------------------------------------------------------

def _tiles(q_ref, k_ref, v_ref, do_ref, mask, geo: _Geometry, q_start, k_start):
    """q, k, v, dO tiles; in masked blocks with their rows past the sequence zeroed (`_Geometry.rows`)."""
    if mask is None:
        return q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    return (geo.rows(q_ref, q_start), geo.rows(k_ref, k_start), geo.rows(v_ref, k_start),
            geo.rows(do_ref, q_start))


def _probs_and_dscores(q, k, v, do, lse_ref, di_ref, mask, geo: _Geometry):
    """Recomputed probabilities and score gradients, keys first: pT, dsT [block_kv, block_q] f32.

    Keys-first lets the per-query statistics (lse, di) arrive as [1, block_q] rows, which broadcast down the
    key axis as they are; it also makes dV and dK plain (untransposed) matmuls. In masked blocks both are
    zero outside the mask (the statistics of query rows past the sequence are unspecified values).
    """
    s_t = _dot(k, q, (1, 1)) * geo.scale
    if mask is not None:
        s_t = jnp.where(mask, s_t, MASK_VALUE)
    p_t = jnp.exp(s_t - lse_ref[...])
    dp_t = _dot(v, do, (1, 1))
    ds_t = p_t * (dp_t - di_ref[...]) * geo.scale
    if mask is not None:
        p_t, ds_t = jnp.where(mask, p_t, 0.0), jnp.where(mask, ds_t, 0.0)
    return p_t, ds_t


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref, dk_sc, dv_sc, *,
                geo: _Geometry):
    kj, qi = pl.program_id(2), pl.program_id(3)

    @pl.when(qi == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    q_start, k_start = qi * geo.block_q, kj * geo.block_kv

    def body(mask):
        q, k, v, do = _tiles(q_ref, k_ref, v_ref, do_ref, mask, geo, q_start, k_start)
        p_t, ds_t = _probs_and_dscores(q, k, v, do, lse_ref, di_ref, mask, geo)
        dv_sc[...] += _dot(p_t.astype(do.dtype), do, (1, 0))
        dk_sc[...] += _dot(ds_t.astype(q.dtype), q, (1, 0))

    # Query blocks wholly past the sequence (the rounded grid of a longer backward block) have nothing.
    live = q_start < geo.seq_len

    @pl.when(live)
    def _live():
        _run_masked(geo, q_start, k_start, body, keys_first=True)

    @pl.when(qi == geo.num_q - 1)
    def _finish():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_ref, dq_sc, *, geo: _Geometry):
    qi, kj = pl.program_id(2), pl.program_id(3)

    @pl.when(kj == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    q_start, k_start = qi * geo.block_q, kj * geo.block_kv

    def body(mask):
        q, k, v, do = _tiles(q_ref, k_ref, v_ref, do_ref, mask, geo, q_start, k_start)
        _, ds_t = _probs_and_dscores(q, k, v, do, lse_ref, di_ref, mask, geo)
        dq_sc[...] += _dot(ds_t.astype(k.dtype), k, (0, 0))

    _run_masked(geo, q_start, k_start, body, keys_first=True)

    @pl.when(kj == geo.num_kv - 1)
    def _finish():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _backward(q, k, v, o, lse, do, geo: _Geometry, interpret):
    b, h, _, d = q.shape
    tp = geo.padded_len
    bq, bk = geo.block_q, geo.block_kv
    di = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)[:, :, None, :]  # rows, like lse
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))
    frac = _visible_fraction(geo)
    itemsize = q.dtype.itemsize

    # dK, dV: grid (b, h, key block, query block); the query blocks are the reduction axis.
    def q_index(kj, qi):
        first, last = geo.q_block_range(kj)
        return jnp.minimum(jnp.maximum(qi, first), last)

    q_rows = pl.BlockSpec((None, None, bq, d), lambda b_, h_, j, i: (b_, h_, q_index(j, i), 0))
    q_stats = pl.BlockSpec((None, None, 1, bq), lambda b_, h_, j, i: (b_, h_, 0, q_index(j, i)))
    kv_rows = pl.BlockSpec((None, None, bk, d), lambda b_, h_, j, i: (b_, h_, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, geo=geo),
        out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        grid=(b, h, geo.num_kv, geo.num_q),
        in_specs=[q_rows, kv_rows, kv_rows, q_rows, q_stats, q_stats],
        out_specs=(kv_rows, kv_rows),
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        compiler_params=params,
        cost_estimate=pl.CostEstimate(
            flops=int(8 * b * h * tp * tp * d * frac), transcendentals=int(b * h * tp * tp * frac),
            bytes_accessed=int(b * h * tp * d * itemsize * (4 + 2 * geo.num_kv))),
        interpret=interpret,
        name="flash_attention_dkv",
    )(q, k, v, do, lse, di)

    # dQ: grid (b, h, query block, key block); the key blocks are the reduction axis.
    q_rows = pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j: (b_, h_, i, 0))
    q_stats = pl.BlockSpec((None, None, 1, bq), lambda b_, h_, i, j: (b_, h_, 0, i))
    kv_rows = pl.BlockSpec((None, None, bk, d),
                           lambda b_, h_, i, j: (b_, h_, jnp.minimum(j, geo.last_kv_block(i)), 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, geo=geo),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(b, h, geo.num_q, geo.num_kv),
        in_specs=[q_rows, kv_rows, kv_rows, q_rows, q_stats, q_stats],
        out_specs=q_rows,
        scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        compiler_params=params,
        cost_estimate=pl.CostEstimate(
            flops=int(6 * b * h * tp * tp * d * frac), transcendentals=int(b * h * tp * tp * frac),
            bytes_accessed=int(b * h * tp * d * itemsize * (2 + 2 * geo.num_q))),
        interpret=interpret,
        name="flash_attention_dq",
    )(q, k, v, do, lse, di)
    return dq, dk, dv


def _visible_fraction(geo: _Geometry) -> float:
    """Share of the padded score matrix that is computed (for the compiler's cost estimate)."""
    t, p = geo.seq_len, geo.prefix_len
    visible = t * t if p is None or p >= t else p * t + (t - p) * (t - p + 1) / 2
    return visible / geo.padded_len ** 2


# --- Custom VJP on the [B, H, T, D] layout -----------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _flash(q, k, v, fwd_geo: _Geometry, bwd_geo: _Geometry, interpret):
    return _forward(q, k, v, fwd_geo, interpret)[0]


def _flash_fwd(q, k, v, fwd_geo, bwd_geo, interpret):
    o, lse = _forward(q, k, v, fwd_geo, interpret)
    return o, (q, k, v, o, lse)


def _flash_bwd(fwd_geo, bwd_geo, interpret, residuals, do):
    q, k, v, o, lse = residuals
    return _backward(q, k, v, o, lse, do, bwd_geo, interpret)


_flash.defvjp(_flash_fwd, _flash_bwd)


def padded_length(seq_len: int, blocks: BlockSizes) -> int:
    """The length the kernels run at: a multiple of every (shrunk) block of the forward and backward."""
    base = -(-seq_len // LANES) * LANES
    sizes = [min(s, base) for s in dataclasses.astuple(blocks)]
    step = math.lcm(*sizes)
    return -(-seq_len // step) * step


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, prefix_len: Optional[int] = None,
                    blocks: BlockSizes = BlockSizes(), interpret=False) -> jax.Array:
    """Softmax attention of q, k, v [batch, seq, heads, head_dim] -> [batch, seq, heads, head_dim].

    `prefix_len` as in `openvision_max.models.attention` (None: bidirectional). `interpret` is passed to
    `pallas_call` (e.g. `pltpu.InterpretParams()` to run the TPU kernel on CPU).
    """
    b, t, h, d = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have one shape, got {q.shape}, {k.shape}, {v.shape}")
    if d > LANES and d % LANES:
        raise ValueError(f"head_dim={d}: over {LANES} it must be a multiple of {LANES} on TPU")
    tp = padded_length(t, blocks)

    def geometry(bq: int, bk: int) -> _Geometry:
        return _Geometry(seq_len=t, padded_len=tp, block_q=min(bq, tp), block_kv=min(bk, tp),
                         prefix_len=prefix_len, scale=d ** -0.5)

    fwd_geo = geometry(blocks.block_q, blocks.block_kv)
    bwd_geo = geometry(blocks.block_q_bwd, blocks.block_kv_bwd)

    def to_kernel(x):  # [B, T, H, D] -> [B, H, T, D]
        return jnp.swapaxes(x, 1, 2)

    out = _flash(to_kernel(q), to_kernel(k), to_kernel(v), fwd_geo, bwd_geo, interpret)
    return jnp.swapaxes(out, 1, 2)
