"""The Pallas flash-attention kernel (kernels/openvision_kernels/flash_attention.py) against `dot_product`.

On CPU the kernel runs in Pallas' interpreter: the generic one (`interpret=True`, what `attention=flash` uses
on CPU) for the covering set, and the TPU interpreter (`pltpu.InterpretParams()`, TPU memory semantics) for
one masked case. The TPU build itself is checked by AOT-compiling through Mosaic for a v5p topology.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from openvision_kernels.flash_attention import BlockSizes, _Geometry, flash_attention, padded_length
from openvision_max.models.attention import dot_product, prefix_lm_mask

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
DEFAULT = BlockSizes()
MIXED = BlockSizes(block_q=256, block_kv=128, block_q_bwd=128, block_kv_bwd=256)
LARGE = BlockSizes(256, 256, 256, 256)

# Every length the family makes (towers: 80 text, 197 B/16@224, 257 L/14@224, 577 L/14@336, 730 So400m@384;
# decoder: patches + 79 + 128 with prefix patches + 79), every head dim, both masks, both dtypes: a covering
# set, not the full product. (seq, prefix_len, head_dim, dtype, blocks)
CASES = [
    (80, None, 128, jnp.float32, DEFAULT),
    (197, None, 72, jnp.bfloat16, MIXED),
    (257, None, 80, jnp.float32, MIXED),
    (577, None, 96, jnp.bfloat16, DEFAULT),
    (730, None, 72, jnp.float32, LARGE),
    (243, 115, 96, jnp.float32, DEFAULT),     # L/14 @ 84 (pretraining stage)
    (403, 275, 64, jnp.bfloat16, DEFAULT),    # B/16 @ 224
    (463, 335, 80, jnp.bfloat16, MIXED),      # L/14, H/14 @ 224
    (783, 655, 64, jnp.float32, DEFAULT),     # L/14 @ 336
    (936, 808, 128, jnp.bfloat16, LARGE),     # So400m/14 @ 384
]


def _inputs(seq, head_dim, dtype, batch=3, heads=3):
    keys = jax.random.split(jax.random.key(seq * 1000 + head_dim), 4)
    return [jax.random.normal(k, (batch, seq, heads, head_dim), jnp.float32).astype(dtype) for k in keys]


def _value_and_grads(attend, q, k, v, do):
    def loss(q, k, v):
        return jnp.sum(attend(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))
    return jax.jit(lambda q, k, v: (attend(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)


def _max_errors(seq, prefix, head_dim, dtype, blocks, interpret, batch=3, heads=3):
    q, k, v, do = _inputs(seq, head_dim, dtype, batch, heads)
    out, grads = _value_and_grads(
        lambda q, k, v: flash_attention(q, k, v, prefix_len=prefix, blocks=blocks, interpret=interpret), q, k, v, do)
    ref_out, ref_grads = _value_and_grads(lambda q, k, v: dot_product(q, k, v, prefix_len=prefix), q, k, v, do)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    diff = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
    return {"out": diff(out, ref_out), **{f"d{n}": diff(g, r) for n, g, r in zip("qkv", grads, ref_grads)}}


@pytest.mark.parametrize("seq, prefix, head_dim, dtype, blocks", CASES)
def test_forward_and_gradients_match_dot_product(seq, prefix, head_dim, dtype, blocks):
    errors = _max_errors(seq, prefix, head_dim, dtype, blocks, interpret=True)
    print(f"T={seq} prefix={prefix} d={head_dim} {jnp.dtype(dtype).name}: max abs error {errors}")
    assert max(errors.values()) <= TOLERANCE[dtype], errors


def test_tpu_interpreter_prefix_lm():
    """The same kernel under the TPU interpreter (VMEM scratch, grid order and DMA as on a TPU)."""
    errors = _max_errors(243, 115, 72, jnp.float32, MIXED, interpret=pltpu.InterpretParams(), batch=1, heads=1)
    assert max(errors.values()) <= TOLERANCE[jnp.float32], errors


@pytest.mark.parametrize("seq, blocks, padded", [
    (80, DEFAULT, 128), (80, LARGE, 128), (197, DEFAULT, 256), (257, DEFAULT, 384), (257, LARGE, 512),
    (577, DEFAULT, 640), (577, MIXED, 768), (730, DEFAULT, 768), (936, DEFAULT, 1024),
])
def test_padded_length(seq, blocks, padded):
    assert padded_length(seq, blocks) == padded


@pytest.mark.parametrize("seq, prefix, bq, bk", [(403, 275, 128, 128), (783, 655, 256, 128), (197, None, 128, 256)])
def test_block_classification_matches_the_mask(seq, prefix, bq, bk):
    """Skipped blocks see nothing, unmasked blocks see everything, and the index-map clamps fetch every block
    that is computed: checked block by block against the dense mask (keys and query rows past the sequence
    hidden: the last blocks reach past the arrays' end)."""
    tp = padded_length(seq, BlockSizes(bq, bk, bq, bk))
    geo = _Geometry(seq_len=seq, padded_len=tp, block_q=bq, block_kv=bk, prefix_len=prefix, scale=1.0)
    dense = np.array(prefix_lm_mask(tp, tp, tp if prefix is None else prefix))
    dense[:, seq:] = False
    dense[seq:, :] = False
    skipped = 0
    for i in range(geo.num_q):
        for j in range(geo.num_kv):
            block = dense[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            needed, full = bool(geo.needed(i * bq, j * bk)), bool(geo.full(i * bq, j * bk))
            assert needed == block.any() and full == block.all(), (i, j)
            np.testing.assert_array_equal(np.asarray(geo.visible(i * bq, j * bk)), block)
            skipped += not needed
            if needed:
                assert j <= int(geo.last_kv_block(i))
                if i * bq < seq:
                    first, last = geo.q_block_range(j)
                    assert int(first) <= i <= int(last)
    # Skipped: key blocks right of the prefix above the causal diagonal (403: block 3 for query blocks 0-2;
    # 783: block 6 for query blocks 0-2). The grid holds no block wholly past the sequence.
    assert (geo.num_q, geo.num_kv) == (-(-seq // bq), -(-seq // bk))
    assert skipped == {(403, 275): 3, (783, 655): 3, (197, None): 0}[(seq, prefix)]


@pytest.mark.parametrize("seq, prefix, head_dim", [(197, None, 72), (403, 275, 80), (730, None, 128)])
def test_tpu_kernel_compiles_through_mosaic(seq, prefix, head_dim):
    """Forward and both backward kernels lower through Mosaic and compile for a v5p chip (bf16)."""
    pytest.importorskip("libtpu")
    from openvision_max.config import topology
    device = topology.devices("v5p-8")[0]
    x = jax.ShapeDtypeStruct((2, seq, 4, head_dim), jnp.bfloat16, sharding=jax.sharding.SingleDeviceSharding(device))

    def loss(q, k, v):
        return jnp.sum(flash_attention(q, k, v, prefix_len=prefix).astype(jnp.float32))

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    text = compiled.as_text()
    assert text.count('custom_call_target="tpu_custom_call"') == 3, "expected the fwd, dkv and dq kernels"
    for name in ("flash_attention_fwd", "flash_attention_dkv", "flash_attention_dq"):
        assert name in text


def test_bad_shapes_and_blocks_are_refused():
    q = jnp.zeros((1, 8, 1, 160), jnp.float32)
    with pytest.raises(ValueError, match="head_dim=160"):
        flash_attention(q, q, q)
    with pytest.raises(ValueError, match="block_kv=200 must be a positive multiple of 128"):
        BlockSizes(block_kv=200)


# The Pallas/Triton kernel for NVIDIA GPUs: no GPU here, so interpreted on CPU and lowered to Triton IR.
GPU_CASES = [(77, 40, 72, jnp.float32), (150, None, 80, jnp.bfloat16), (80, None, 64, jnp.float32)]


@pytest.mark.parametrize("seq, prefix, head_dim, dtype", GPU_CASES)
def test_gpu_kernel_matches_dot_product(seq, prefix, head_dim, dtype):
    from openvision_kernels.flash_attention_gpu import flash_attention_gpu
    q, k, v, do = _inputs(seq, head_dim, dtype)
    attend = lambda q, k, v: flash_attention_gpu(q, k, v, prefix_len=prefix, interpret=True)
    out, grads = _value_and_grads(attend, q, k, v, do)
    ref_out, ref_grads = _value_and_grads(lambda q, k, v: dot_product(q, k, v, prefix_len=prefix), q, k, v, do)
    for got, want in zip([out, *grads], [ref_out, *ref_grads]):
        assert got.dtype == dtype
        assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)))) <= TOLERANCE[dtype]


def test_gpu_kernel_lowers_to_triton():
    from openvision_kernels.flash_attention_gpu import flash_attention_gpu
    x = jax.ShapeDtypeStruct((2, 403, 4, 72), jnp.bfloat16)
    loss = lambda q, k, v: jnp.sum(flash_attention_gpu(q, k, v, prefix_len=275).astype(jnp.float32))
    lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(x, x, x).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3, "expected the fwd, dkv and dq kernels"
