"""`attention=flash` in the model: config, shard_map under the mesh, the GPU (cuDNN) call's padding, training
on CPU (interpret mode) and the memory it saves when compiled for TPU."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import Literal

from openvision_max.config import load_config
from openvision_max.config.schema import ConfigError
from openvision_max.mesh import sharding
from openvision_max.models import attention
from openvision_max.models.attention import dot_product

from conftest import CONFIGS, tiny_config
from train_steps import MESH_2x2x2, run_steps

FLASH_CPU = dict(platform="cpu", block_q=128, block_kv=128, block_q_bwd=128, block_kv_bwd=128)


def _qkv(shape, seed=0):
    return [jax.random.normal(k, shape, jnp.float32) for k in jax.random.split(jax.random.key(seed), 3)]


def test_config_threads_flash_options_to_the_stacks():
    from openvision_max import models
    cfg = tiny_config("attention=flash", "flash_block_kv=256", "flash_block_q_bwd=512")
    spec = models.build(cfg).spec
    assert dict(spec.decoder.attention_options) == dict(
        platform="cpu", block_q=128, block_kv=256, block_q_bwd=512, block_kv_bwd=128)
    assert spec.vision.attention_options == spec.text.attention_options == spec.decoder.attention_options
    assert models.build(tiny_config()).spec.vision.attention_options == ()


@pytest.mark.parametrize("args, platform, message", [
    (["flash_block_q=96"], "cpu", "flash_block_q=96 must be a positive multiple of 128 (TPU vector lanes)"),
    (["flash_block_kv_bwd=0"], "tpu", "flash_block_kv_bwd=0 must be a positive multiple of 128"),
    (["attention=flash", "vision.width=320", "vision.num_heads=2"], "tpu",
     "attention=flash on TPU needs head_dim <= 128 or a multiple of 128; vision has 160"),
    (["attention=flash", "ici_tensor_parallelism=2", "text.num_heads=1"], "cpu",
     "attention=flash splits heads over 2 devices (activation_heads -> tensor), which text.num_heads=1"),
])
def test_flash_config_errors(args, platform, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(*args) if platform == "cpu" and "ici_tensor_parallelism=2" not in args else load_config(
            [str(CONFIGS / "base.yml"), *args], platform=platform, num_devices=8)


def test_flash_is_available_where_it_runs():
    for platform in ("cpu", "tpu", "gpu"):
        cfg = load_config([str(CONFIGS / "base.yml"), "attention=flash"], platform=platform, num_devices=8)
        assert cfg.attention == "flash" and cfg.flash_block_q == 128
    # On GPU head dims cuDNN refuses (and fp32) go to the Pallas kernel, so the config accepts them.
    load_config([str(CONFIGS / "base.yml"), "attention=flash", "dtype=float32", "vision.width=320",
                 "vision.num_heads=2"], platform="gpu", num_devices=8)


def test_flash_under_the_mesh_matches_dot_product(prefix=5):
    """Batch over (data, fsdp) and heads over tensor via shard_map (2x2x2 fake devices), forward and grads;
    a batch the mesh does not divide (model.init's batch of 1) runs with that dimension whole."""
    cfg = tiny_config(*MESH_2x2x2, num_devices=8)
    mesh = sharding.create_mesh(cfg)
    flash = attention.get("flash", **FLASH_CPU)
    for batch in (4, 1):
        q, k, v = _qkv((batch, 13, 2, 16))

        def out_and_grads(fn, q, k, v):
            loss = lambda *a: jnp.sum(jnp.sin(fn(*a, prefix_len=prefix)))
            return fn(q, k, v, prefix_len=prefix), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

        with sharding.activate(cfg, mesh):
            assert nn.logical_to_mesh_axes(attention.QKV_NAMES) == jax.P(("data", "fsdp"), None, "tensor", None)
            got = jax.jit(lambda *a: out_and_grads(flash, *a))(q, k, v)
            text = jax.jit(lambda *a: flash(*a, prefix_len=prefix)).lower(q, k, v).as_text()
        want = out_and_grads(dot_product, q, k, v)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, w, atol=1e-5)
        assert "shard_map" in text or "sdy.manual_computation" in text


def test_cudnn_call_pads_odd_masked_lengths(seq=7, prefix=4):
    """The cuDNN call's padding and sequence-length masks, run through XLA's implementation of the same API
    (cuDNN itself needs an NVIDIA GPU): equal to dot_product, forward and grads."""
    q, k, v = _qkv((3, seq, 3, 8), seed=seq)

    def out_and_grads(fn):
        loss = lambda *a: jnp.sum(jnp.cos(fn(*a, prefix_len=prefix)))
        return fn(q, k, v, prefix_len=prefix), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    via_xla = lambda q, k, v, prefix_len: attention.cudnn(q, k, v, prefix_len=prefix_len, implementation="xla")
    got, want = jax.jit(lambda: out_and_grads(via_xla))(), out_and_grads(dot_product)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, atol=1e-5)


def test_cpu_says_once_that_it_interprets(caplog):
    attention._warn_interpreting.cache_clear()
    q, k, v = _qkv((1, 9, 1, 8))
    flash = attention.get("flash", **FLASH_CPU)
    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        flash(q, k, v, prefix_len=None)
        flash(q, k, v, prefix_len=4)
    assert [r.getMessage() for r in caplog.records] == [
        "attention=flash on CPU: running the Pallas TPU kernel in interpret mode (correct, slow)"]


def test_twenty_steps_flash_equal_dot_product():
    """The acceptance run: 20 fp32 steps of the tiny model, flash (CPU interpret) vs dot_product."""
    args = ["base_lr=0.256", "warmup_steps=1"]
    _, flash = run_steps(tiny_config(*args, "attention=flash"), 20)
    _, dot = run_steps(tiny_config(*args), 20)
    diff = float(np.max(np.abs(np.array(flash) - np.array(dot))))
    print(f"20 steps: max |loss_flash - loss_dot_product| = {diff:.3g} (losses {dot[0]:.4f} -> {dot[-1]:.4f})")
    assert diff <= 1e-4 and dot[-1] < dot[0]


def _attention_layer_memory(kind: str) -> int:
    """Bytes per device of the grad of one L/14-shaped attention layer (width 1024, 16 heads, T=577 =
    L/14 @ 336) at 16 samples per chip, bf16, compiled for v5p-8 (fsdp over 4 chips)."""
    from openvision_max.models.layers import Attention, StackConfig
    from openvision_max.training import aot
    cfg = load_config([str(CONFIGS / "L14.yml"), "compile_topology=v5p-8", "stage=finetune_336",
                       "global_batch_size=64", f"attention={kind}"])
    stack = StackConfig(width=1024, depth=1, mlp_dim=4096, num_heads=16, remat_policy="full", scan_layers=True,
                        attention=kind, dtype="bfloat16", gelu_tanh=False,
                        attention_options=attention.options(cfg, kind))
    mesh = aot.build_mesh(cfg)
    layer = Attention(stack)
    x = jax.ShapeDtypeStruct((64, 577, 1024), jnp.bfloat16, sharding=sharding.batch_sharding(mesh))
    with sharding.activate(cfg, mesh):
        boxed = jax.eval_shape(layer.init, jax.eval_shape(jax.random.key, 0), x)
        params = jax.tree.map(lambda b: b.unbox(apply_constraint=False), boxed,
                              is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))
        shardings = sharding.logical_to_shardings(cfg, mesh, nn.get_partition_spec(boxed))
        params = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), params, shardings)
        grad = jax.grad(lambda p, x: jnp.sum(layer.apply(p, x).astype(jnp.float32)), argnums=(0, 1))
        compiled = jax.jit(grad).lower(params, x).compile()
    return aot.memory_report(compiled, 0)["total_bytes"]


def test_flash_uses_less_memory_than_dot_product_at_l14_336():
    pytest.importorskip("libtpu")
    dot, flash = _attention_layer_memory("dot_product"), _attention_layer_memory("flash")
    print(f"L/14 @ 336 attention layer grad, v5p-8, 16/chip: dot_product {dot / 1e6:.1f} MB, "
          f"flash {flash / 1e6:.1f} MB per device")
    assert flash < dot


def _fake_timer(times: dict):
    calls = []

    def measure(fn, shape, dtype, prefix_len):
        calls.append(fn.__name__)
        return times.get(fn.__name__)
    return measure, calls


@pytest.mark.parametrize("dtype, head_dim, times, choice, probed", [
    (jnp.bfloat16, 64, {"cudnn": 2e-3, "flash_attention_gpu": 3e-3}, "cudnn", ["cudnn", "flash_attention_gpu"]),
    (jnp.bfloat16, 72, {"cudnn": 2e-3, "flash_attention_gpu": 1e-3}, "pallas", ["cudnn", "flash_attention_gpu"]),
    (jnp.bfloat16, 64, {"cudnn": float("inf"), "flash_attention_gpu": 1.0}, "pallas",
     ["cudnn", "flash_attention_gpu"]),
    (jnp.float32, 64, {}, "pallas", []),            # cuDNN has no fp32: no probe
    (jnp.bfloat16, 36, {}, "pallas", []),           # head_dim not a multiple of 8
    (jnp.bfloat16, 80, {}, "cudnn", ["cudnn"]),     # no local GPU to time on: cuDNN
])
def test_gpu_flash_takes_the_faster_kernel(dtype, head_dim, times, choice, probed):
    from openvision_kernels.flash_attention_gpu import flash_attention_gpu
    from openvision_max.models import gpu_attention
    measure, calls = _fake_timer(times)
    shape = (2, 403, 12, head_dim)
    assert gpu_attention.choose(shape, dtype, 275, attention.cudnn, flash_attention_gpu, measure) == choice
    assert calls == probed
    gpu_attention.choose(shape, dtype, 275, attention.cudnn, flash_attention_gpu, measure)
    assert calls == probed  # measured once per shape


def test_gpu_probe_without_a_gpu_measures_nothing():
    from openvision_max.models import gpu_attention
    assert gpu_attention.measure_on_gpu(attention.cudnn, (1, 8, 1, 8), jnp.bfloat16, None) is None


def _reference_attention(q, k, v, prefix_len):
    """Textbook softmax attention in fp32 (jax.nn.softmax and its own gradient rule)."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * q.shape[-1] ** -0.5, k)
    if prefix_len is not None:
        logits = jnp.where(attention.prefix_lm_mask(q.shape[1], k.shape[1], prefix_len), logits, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


@pytest.mark.parametrize("prefix_len", [None, 5, 0])
def test_dot_product_keeps_only_its_compute_dtype_probabilities(prefix_len, capsys):
    """fp32: output and gradients of q, k, v equal textbook attention's within fp32 rounding. bf16: unmasked,
    the one [B, H, T, T] tensor the backward pass keeps is the bf16 probabilities (not also an fp32 softmax
    output or masked logits: 3x the memory of a decoder layer without remat); with a prefix-LM mask it keeps
    none, only each row's log-sum-exp (and q, k, v, not the prefix's slices of them)."""
    q, k, v = _qkv((2, 11, 2, 8))
    cot = jax.random.normal(jax.random.key(9), q.shape)
    ours = jax.grad(lambda *x: jnp.sum(dot_product(*x, prefix_len=prefix_len) * cot), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(lambda *x: jnp.sum(_reference_attention(*x, prefix_len) * cot), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(dot_product(q, k, v, prefix_len=prefix_len),
                               _reference_attention(q, k, v, prefix_len), rtol=1e-5, atol=1e-6)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    jax.ad_checkpoint.print_saved_residuals(
        lambda *x: jnp.sum(dot_product(*x, prefix_len=prefix_len).astype(jnp.float32)), q16, k16, v16)
    lines = capsys.readouterr().out.splitlines()
    kept = [line.split()[0] for line in lines if line.startswith(("bf16[2,2,", "f32[2,2,"))]  # [B, H, ...]
    # With the prefix-LM mask no probabilities at all: the prefix rows' and the query rows' fp32 log-sum-exp,
    # from which the backward pass recomputes them (prefix_len 0: a causal decoder, an empty prefix).
    assert kept == (["bf16[2,2,11,11]"] if prefix_len is None
                    else [f"f32[2,2,{prefix_len},1]", f"f32[2,2,{11 - prefix_len},1]"])
    assert not [line for line in lines if line.startswith("bf16[2,5,")]  # nor the prefix's slices of k, v


def test_prefix_lm_recomputes_its_probabilities_only_once_the_gradient_arrives():
    """The backward pass's q k^T reads q and k through an optimization_barrier that also holds the incoming
    gradient. Without it XLA merges the recompute with the forward's q k^T and keeps the fp32 logits (or, with
    q and k alone in the barrier, runs every layer's recompute early). Modelled on v5p-8 at 64 per chip, a
    2/2/4-block proxy of L/14@224 needs 5.68 GB of temporaries without the barrier, 3.36 GB with it
    (docs/performance.md)."""
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv((2, 11, 2, 8)))
    _, backward = jax.vjp(lambda *x: dot_product(*x, prefix_len=5), q, k, v)
    jaxpr = jax.make_jaxpr(backward)(jnp.ones_like(q)).jaxpr
    (barrier,) = [e for e in jaxpr.eqns if e.primitive.name == "optimization_barrier"]
    assert jaxpr.invars[0] in barrier.invars  # the cotangent
    after = set(barrier.outvars)
    for eqn in jaxpr.eqns:
        if any(x in after for x in eqn.invars if not isinstance(x, Literal)):
            after.update(eqn.outvars)
        if eqn.primitive.name == "dot_general":
            # every matmul of the backward pass (the logits' recompute first) waits for the barrier
            assert any(x in after for x in eqn.invars), eqn
