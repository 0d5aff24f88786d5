"""objective=openvision2: visual token masking, memorisation, sharding invariance, exact resume, accumulation."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from conftest import tiny_config
from train_steps import MESH_2x2x2, activate, run_steps, stepper

from openvision_max import models
from openvision_max.data.synthetic import _make as synthetic_batch
from openvision_max.data.tokenizer import teacher_forcing
from openvision_max.mesh import sharding
from openvision_max.models import token_masking
from openvision_max.models.inputs import normalize_images
from openvision_max.training import optimizer
from openvision_max.training import step as train_step
from openvision_max.training.checkpointing import Checkpointer, abstract_like

OV2 = ["objective=openvision2", "decoder.keep_ratio=0.25"]


def _init(cfg):
    model = models.build(cfg)
    dummy = [jnp.zeros(s.shape, s.dtype) for s in models.dummy_inputs(cfg)]
    return model, nn.unbox(model.init(jax.random.key(0), *dummy)["params"])


def test_the_decoder_sees_a_quarter_of_the_patches_drawn_per_image_and_step():
    cfg = tiny_config(*OV2, "image_size=64")  # 8 x 8 = 64 patches, 16 kept
    model, params = _init(cfg)
    batch = synthetic_batch(cfg, jax.random.key(1))
    images = normalize_images(batch["images"])
    inputs = teacher_forcing(batch)[0]
    tokens = model.apply({"params": params}, images, method=model.image_tokens)

    def kept_at(step):
        keys = token_masking.example_keys(cfg.seed, step, jnp.arange(images.shape[0]))
        _, state = model.apply({"params": params}, tokens, inputs, keys, method=model.decode,
                               mutable=["intermediates"])
        return np.asarray(state["intermediates"]["kept_indices"][0])

    idx = kept_at(3)
    assert cfg.derived.kept_patches == 16 and idx.shape == (8, 16)
    for row in idx:
        assert len(set(row.tolist())) == 16 and row.min() >= 0 and row.max() < 64
    assert len({tuple(r) for r in idx.tolist()}) == 8            # each image its own draw
    np.testing.assert_array_equal(kept_at(3), idx)                # the same seed and step: the same tokens
    assert not np.array_equal(kept_at(4), idx)                    # a fresh draw every step
    # What the decoder reads is those tokens: its output equals the unmasked decoder's on the gathered tokens.
    keys = token_masking.example_keys(cfg.seed, 3, jnp.arange(8))
    masked = model.apply({"params": params}, tokens, inputs, keys, method=model.decode)
    gathered = jnp.take_along_axis(tokens, jnp.asarray(idx)[..., None], axis=1)
    np.testing.assert_allclose(model.apply({"params": params}, gathered, inputs, method=model.decode), masked,
                               rtol=1e-6, atol=1e-6)
    # The draw of an example does not depend on the rest of the batch (microbatches, other devices).
    np.testing.assert_array_equal(
        token_masking.kept_indices(token_masking.example_keys(cfg.seed, 3, jnp.arange(4, 8)), 64, 16), idx[4:])


def test_memorises_a_fixed_batch_and_a_2x2x2_mesh_gives_the_one_device_losses():
    args = [*OV2, "base_lr=0.256", "warmup_steps=10", "reuse_example_batch=true"]
    _, single = run_steps(tiny_config(*args), 200)
    print(f"openvision2 memorisation: loss {single[0]:.3f} -> {single[-1]:.3f}")
    assert single[-1] < 0.5 * single[0]
    _, meshed = run_steps(tiny_config(*args, *MESH_2x2x2, num_devices=8), 5)
    np.testing.assert_allclose(meshed, single[:5], rtol=1e-4)


def test_cross_attention_fusion_trains_and_is_sharding_invariant():
    args = ["objective=openvision2", "decoder.fusion=cross_attn", "decoder.depth=2", "decoder.keep_ratio=0.5",
            "base_lr=0.256", "warmup_steps=1", "reuse_example_batch=true"]
    _, single = run_steps(tiny_config(*args), 5)
    _, meshed = run_steps(tiny_config(*args, *MESH_2x2x2, num_devices=8), 5)
    np.testing.assert_allclose(meshed, single, rtol=1e-4)
    assert single[-1] < single[0]


def test_a_resumed_run_draws_the_same_tokens(tmp_path):
    """Three steps straight, against two steps, a checkpoint, a restore into a new step function, one step:
    the same loss to the bit (another draw of tokens would give another loss)."""
    cfg = tiny_config(*OV2, "image_size=64")
    with activate(cfg):
        state, step_fn, data = stepper(cfg)
        batches = [next(data) for _ in range(3)]
        for b in batches[:2]:
            state, _ = step_fn(state, b)
        with Checkpointer(tmp_path, max_to_keep=1, period=1) as ckpt:
            assert ckpt.maybe_save(2, state, {})
        _, straight = step_fn(state, batches[2])
        model, tx = models.build(cfg), optimizer.build(cfg)
        abstract = abstract_like(state)
        with Checkpointer(tmp_path, max_to_keep=1, period=1) as ckpt:
            restored, _ = ckpt.restore(2, abstract)
            again, _ = ckpt.restore(2, abstract)
        _, resumed = train_step.jit_train_step(model, tx, cfg, sharding.create_mesh(cfg))(restored, batches[2])
        # The same state and batch at another step draws other tokens, and gives another loss.
        _, other = step_fn(again.replace(step=again.step + 1), batches[2])
    assert float(resumed["loss"]) == float(straight["loss"])
    assert float(other["loss"]) != float(straight["loss"])


def test_gradient_accumulation_equals_the_full_batch():
    full = tiny_config(*OV2, "global_batch_size=16")
    accum = tiny_config(*OV2, "global_batch_size=16", "gradient_accumulation_steps=4")
    model, params = _init(full)
    batch = train_step.with_token_keys(full, synthetic_batch(full, jax.random.key(5)), jnp.asarray(7))
    (loss_full, _), g_full = jax.jit(jax.value_and_grad(functools.partial(train_step.loss_fn, model, full),
                                                        has_aux=True))(params, batch)
    (loss_acc, _), g_acc = jax.jit(functools.partial(train_step.accumulated_loss_and_grads, model, accum))(
        params, batch)
    np.testing.assert_allclose(loss_acc, loss_full, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_acc), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
