"""Remat policies change memory, never results."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openvision_max import models
from openvision_max.data.synthetic import _make as synthetic_batch
from openvision_max.models.layers import Stack, StackConfig
from openvision_max.schema import REMAT_POLICIES
from openvision_max.train_step import loss_fn

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


# Scanned stacks with every policy; the unrolled path (remat with prevent_cse) with two of them.
@pytest.mark.parametrize("scan, policies", [(True, ON_CPU[1:]), (False, ["full", "minimal"])])
def test_every_policy_matches_no_remat(scan, policies):
    ref_loss, ref_grads = loss_and_grads("none", scan)
    for policy in policies:
        loss, grads = loss_and_grads(policy, scan)
        np.testing.assert_allclose(loss, ref_loss, atol=1e-5, rtol=0, err_msg=policy)
        for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(g, r, atol=1e-5, rtol=0, err_msg=f"{policy} {jax.tree_util.keystr(path)}")


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
