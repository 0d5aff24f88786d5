"""The train step: sharding-invariant losses, exact gradient accumulation, memorisation, non-finite skipping."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from openvision_max import models
from openvision_max.data.synthetic import SyntheticIterator
from openvision_max.data.synthetic import _make as synthetic_batch
from openvision_max.mesh.sharding import create_mesh
from openvision_max.training.optimizer import learning_rate_schedule
from openvision_max.training.step import accumulated_loss_and_grads, loss_fn

from conftest import tiny_config
from train_steps import MESH_2x2x2, activate, run_steps, stepper


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_mesh_losses_equal_single_device(loss):
    args = ["base_lr=0.256", "warmup_steps=1", f"contrastive_loss={loss}"]
    _, single = run_steps(tiny_config(*args), 5)
    _, meshed = run_steps(tiny_config(*args, *MESH_2x2x2, num_devices=8), 5)
    np.testing.assert_allclose(meshed, single, rtol=1e-4)
    assert single[-1] < single[0]  # it trains


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_gradient_accumulation_equals_full_batch(loss):
    full_cfg = tiny_config("global_batch_size=16", f"contrastive_loss={loss}")
    accum_cfg = tiny_config("global_batch_size=16", "gradient_accumulation_steps=4", f"contrastive_loss={loss}")
    model = models.build(full_cfg)
    dummy = [jnp.zeros(s.shape, s.dtype) for s in models.dummy_inputs(full_cfg)]
    params = nn.unbox(model.init(jax.random.key(0), *dummy)["params"])
    batch = synthetic_batch(full_cfg, jax.random.key(5))
    (loss_full, _), g_full = jax.jit(jax.value_and_grad(functools.partial(loss_fn, model, full_cfg),
                                                        has_aux=True))(params, batch)
    (loss_acc, _), g_acc = jax.jit(functools.partial(accumulated_loss_and_grads, model, accum_cfg))(params, batch)
    np.testing.assert_allclose(loss_acc, loss_full, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_acc), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_gradient_accumulation_same_params_after_one_step():
    # Peak LR 1e-4. (Adam's first update is ~lr x sign(g), so tiny gradients amplify fp32 rounding by lr.)
    args = ["global_batch_size=16", "base_lr=0.0016", "warmup_steps=0"]
    full, _ = run_steps(tiny_config(*args), 1)
    accum, _ = run_steps(tiny_config(*args, "gradient_accumulation_steps=4"), 1)
    for a, b in zip(jax.tree.leaves(accum.params), jax.tree.leaves(full.params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_synthetic_loss_halves_within_200_steps():
    """reuse_example_batch=true: one fixed batch, repeated, which the model memorises."""
    cfg = tiny_config("base_lr=0.256", "warmup_steps=10", "steps=200", "global_batch_size=8",
                      "reuse_example_batch=true")
    with activate(cfg):
        mesh = create_mesh(cfg)
        reused, fresh = SyntheticIterator(cfg, mesh), SyntheticIterator(tiny_config(), mesh)
        first, second = next(reused), next(reused)
        assert all(first[k] is second[k] for k in first)
        assert not np.array_equal(next(fresh)["images"], next(fresh)["images"])
    _, losses = run_steps(cfg, 200)
    print(f"synthetic memorisation: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.5 * losses[0]


def is_schedule(x):
    return isinstance(x, optax.ScaleByScheduleState)


def test_nonfinite_step_is_skipped_and_counted():
    cfg = tiny_config("max_nonfinite_steps=2")  # the next test's config: one compiled step for both
    with activate(cfg):
        state, step_fn, data = stepper(cfg)
        state, _ = step_fn(state, next(data))
        before = jax.device_get(state.params)
        poisoned = jax.tree.map(lambda x: x, state)
        poisoned = poisoned.replace(params={**poisoned.params, "t": jnp.asarray(jnp.inf)})
        after, metrics = step_fn(poisoned, next(data))
    assert int(metrics["nonfinite_in_a_row"]) == 1 and int(after.step) == 2
    assert not np.isfinite(float(metrics["loss"]))
    # The schedule moved on with the step (its count is state.step), so the logged LR is the applied one.
    counts = [s.count for s in jax.tree.leaves(after.opt_state, is_leaf=is_schedule) if is_schedule(s)]
    assert [int(c) for c in counts] == [int(after.step)]
    assert float(metrics["learning_rate"]) == pytest.approx(float(learning_rate_schedule(cfg)(int(after.step) - 1)),
                                                            rel=1e-5)  # jitted vs eager rounding
    # The update was not applied: every parameter except the poisoned t is unchanged.
    for path, a in jax.tree_util.tree_leaves_with_path(jax.device_get(after.params)):
        if jax.tree_util.keystr(path) != "['t']":
            b = functools.reduce(lambda d, k: d[k.key], path, before)
            np.testing.assert_array_equal(a, b)


def test_a_run_of_nonfinite_steps_between_logs_is_seen_at_the_next_log():
    """max_nonfinite_steps=2: two bad steps, then good ones. The counter stays at 2 and no update is applied
    after the run, so a log 3 steps later still stops the run (log_period > max_nonfinite_steps)."""
    from openvision_max.training.loop import TrainingStopped, _log
    cfg = tiny_config("max_nonfinite_steps=2", "log_period=5")
    with activate(cfg):
        state, step_fn, data = stepper(cfg)
        state, _ = step_fn(state, next(data))
        good = jax.device_get(state.params)
        for _ in range(2):
            bad = state.replace(params={**state.params, "t": jnp.asarray(jnp.nan)})
            state, metrics = step_fn(bad, next(data))
            state = state.replace(params={**state.params, "t": jnp.asarray(good["t"])})  # one step's poison
        for _ in range(3):
            state, metrics = step_fn(state, next(data))
    assert int(state.step) == 6 and int(metrics["nonfinite_in_a_row"]) == 2
    assert np.isfinite(float(metrics["loss"]))  # the last steps were good, and still not applied
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(good)):
        np.testing.assert_array_equal(a, b)

    class Writer:
        def write(self, *args):
            pass

    class Timer:
        def measure(self, step):
            return {"step_time_s": 0.1}

    class Observer:
        def log_values(self, step):
            return {}
    with pytest.raises(TrainingStopped, match="2 steps in a row had a non-finite loss"):
        _log(cfg, Writer(), Timer(), Observer(), 6, metrics, {})
