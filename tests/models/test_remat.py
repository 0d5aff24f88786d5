"""Remat policies change memory, never results."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openvision_max import models
from openvision_max.config.schema import REMAT_POLICIES
from openvision_max.data.synthetic import _make as synthetic_batch
from openvision_max.models.layers import Stack, StackConfig
from openvision_max.training.step import loss_fn

from conftest import tiny_config

ON_CPU = [p for p in REMAT_POLICIES if not p.endswith("_offloaded")]


def loss_and_grads(policy: str, scan: bool):
    cfg = tiny_config(f"remat_policy={policy}", "decoder.remat_policy=null", f"scan_layers={str(scan).lower()}")
    model = models.build(cfg)
    batch = synthetic_batch(cfg, jax.random.key(0))
    params = nn.unbox(model.init(jax.random.key(1), *(jnp.zeros(s.shape, s.dtype)
                                                      for s in models.dummy_inputs(cfg)))["params"])
    fn = jax.jit(jax.value_and_grad(functools.partial(loss_fn, model, cfg), has_aux=True))
    (loss, _), grads = fn(params, batch)
    return loss, grads



def stack_loss_and_grads(policy: str, scan: bool, prefix_len=None):
    """A 2-block stack (where remat is applied) under `policy`: loss mean(y^2) and its gradients."""
    cfg = StackConfig(width=32, depth=2, mlp_dim=64, num_heads=2, remat_policy=policy, scan_layers=scan,
                      attention="dot_product", dtype="float32", gelu_tanh=False, prefix_len=prefix_len)
    stack = Stack(cfg)
    x = jax.random.normal(jax.random.key(0), (2, 12, 32))
    params = stack.init(jax.random.key(1), x)
    return jax.jit(jax.value_and_grad(lambda p: jnp.mean(stack.apply(p, x) ** 2)))(params)


def assert_same(result, reference, label):
    (loss, grads), (ref_loss, ref_grads) = result, reference
    np.testing.assert_allclose(loss, ref_loss, atol=1e-5, rtol=0, err_msg=label)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=0, err_msg=f"{label} {jax.tree_util.keystr(path)}")


# Every policy, scanned and unrolled (remat with prevent_cse), bidirectional and prefix-LM masked: two of the
# four pairs, so that each value of each runs (the mask is the attention's business, the scan the stack's).
@pytest.mark.parametrize("scan, prefix_len", [(True, None), (False, 5)])
def test_every_policy_matches_no_remat_in_a_stack(scan, prefix_len):
    reference = stack_loss_and_grads("none", scan, prefix_len)
    for policy in ON_CPU[1:]:
        assert_same(stack_loss_and_grads(policy, scan, prefix_len), reference, policy)


def test_full_remat_matches_no_remat_for_the_whole_model():
    """Per-tower policies wired through the model: the training loss and every gradient are unchanged."""
    assert_same(loss_and_grads("full", True), loss_and_grads("none", True), "full")


def temp_bytes_of_grad(policy: str) -> int:
    stack_cfg = StackConfig(width=128, depth=4, mlp_dim=512, num_heads=4, remat_policy=policy, scan_layers=True,
                            attention="dot_product", dtype="float32", gelu_tanh=False)
    stack = Stack(stack_cfg)
    x = jnp.ones((8, 64, 128))
    params = stack.init(jax.random.key(0), x)

    def loss(p, x):
        return jnp.sum(stack.apply(p, x) ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_full_remat_uses_less_temporary_memory():
    none, full = temp_bytes_of_grad("none"), temp_bytes_of_grad("full")
    print(f"4-layer tower gradient temp memory: none={none} B, full={full} B")
    assert full < none
