"""`layers.dense`: the towers' weight matmuls, in the forms XLA's CPU backend runs fastest, with the products and
gradients of a plain tensordot + bias."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from openvision_max.models import layers


def plain(x, kernel, bias, in_axes):
    return jnp.tensordot(x, kernel, axes=in_axes) + bias


# (x shape, kernel shape, in_axes): the MLP's [B, T, D] x [D, M], the q/k/v projections' [D] -> [H, K] and the
# output projection's [H, K] -> [D].
SHAPES = [((3, 5, 16), (16, 24), 1), ((3, 5, 16), (16, 2, 8), 1), ((3, 5, 2, 8), (2, 8, 16), 2)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("x_shape,kernel_shape,in_axes", SHAPES)
def test_dense_has_the_values_and_gradients_of_a_tensordot(dtype, x_shape, kernel_shape, in_axes):
    kx, kk, kb, kg = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, x_shape).astype(dtype)
    kernel = jax.random.normal(kk, kernel_shape).astype(dtype)
    bias = jax.random.normal(kb, kernel_shape[in_axes:]).astype(dtype)
    probe = jax.random.normal(kg, (*x_shape[:x.ndim - in_axes], *kernel_shape[in_axes:]))

    def loss(f):  # a non-linear read-out, so that every gradient entry differs
        return lambda *a: jnp.sum(jnp.sin(f(*a, in_axes).astype(jnp.float32)) * probe)

    grads = jax.jit(jax.grad(loss(layers.dense), argnums=(0, 1, 2)))(x, kernel, bias)
    y = layers.dense(x, kernel, bias, in_axes)
    assert y.dtype == jnp.dtype(dtype)
    assert [g.dtype for g in grads] == [jnp.dtype(dtype)] * 3
    # The reference: autodiff of the plain form in fp32 from the same (bf16-representable) inputs. fp32: the same
    # dots, equal to rounding. bf16: every dot and sum accumulates in fp32 and is rounded once to bf16 (8 bits
    # of mantissa), so each entry is within a few bf16 steps of the fp32 value at its tensor's scale.
    up = [jnp.asarray(a, jnp.float32) for a in (x, kernel, bias)]
    ref_grads = jax.jit(jax.grad(loss(plain), argnums=(0, 1, 2)))(*up)
    rel = 1e-6 if dtype == "float32" else 2 ** -6
    for ours, ref in [(y, plain(*up, in_axes)), *zip(grads, ref_grads)]:
        ref = np.asarray(ref)
        np.testing.assert_allclose(np.asarray(ours, np.float32), ref, rtol=rel, atol=rel * np.abs(ref).max())


def test_bf16_dense_runs_bf16_dots_with_fp32_results_forward_and_backward():
    x = jnp.ones((4, 8, 16), jnp.bfloat16)
    kernel, bias = jnp.ones((16, 32), jnp.bfloat16), jnp.zeros((32,), jnp.bfloat16)
    grad = jax.value_and_grad(lambda x, k, b: jnp.sum(layers.dense(x, k, b, 1).astype(jnp.float32)),
                              argnums=(0, 1, 2))
    text = jax.jit(grad).lower(x, kernel, bias).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line and "=" in line]
    assert len(dots) == 3, dots  # forward, d_x, d_kernel
    for line in dots:
        operands, result = line.split(":")[-1].split("->")
        assert operands.count("bf16") == 2 and "f32" in result and "bf16" not in result, line


@pytest.mark.parametrize("policy", ["minimal", "save_dot_except_mlp"])
def test_policies_that_keep_matmul_outputs_keep_them_in_the_compute_dtype(policy, capsys):
    cfg = layers.StackConfig(width=32, depth=1, mlp_dim=64, num_heads=2, remat_policy=policy, scan_layers=False,
                             attention="dot_product", dtype="bfloat16", gelu_tanh=False, cpu_dense=True)
    stack = layers.Stack(cfg)
    x = jnp.ones((2, 6, 32), jnp.bfloat16)
    params = stack.init(jax.random.key(0), x)
    print_saved_residuals(lambda p, x: jnp.sum(stack.apply(p, x).astype(jnp.float32)), params, x)
    kept = [line for line in capsys.readouterr().out.splitlines() if "from the argument" not in line]
    expected = {"minimal": 5, "save_dot_except_mlp": 4}[policy]  # q, k, v, out (+ the MLP's first matmul)
    assert len(kept) == expected, kept
    assert all(line.startswith("bf16[") and "named" in line for line in kept), kept
