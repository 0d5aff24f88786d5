"""The model family: shapes, resolution independence, the decoder's prefix-LM mask, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np

from openvision_max import models
from openvision_max.models.attention import dot_product, prefix_lm_mask
from openvision_max.models.layers import posemb_sincos_2d

from conftest import tiny_config


def init(cfg, batch=2, seed=0):
    model = models.build(cfg)
    images, texts = (jnp.zeros(s.shape, s.dtype) for s in models.dummy_inputs(cfg, batch))
    return model, model.init(jax.random.key(seed), images, texts)


def random_inputs(cfg, batch=2, seed=1, image_size=None):
    k1, k2 = jax.random.split(jax.random.key(seed))
    size = image_size or cfg.image_size
    images = jax.random.normal(k1, (batch, size, size, 3))
    texts = jax.random.randint(k2, (2 * batch, cfg.text.context_length), 0, cfg.vocab_size)
    return images, texts


def test_output_shapes_and_normalisation():
    cfg = tiny_config()
    model, params = init(cfg)
    out = jax.jit(model.apply)(params, *random_inputs(cfg))
    assert out["image_emb"].shape == (2, cfg.embed_dim) and out["text_emb"].shape == (4, cfg.embed_dim)
    assert out["caption_logits"].shape == (2, cfg.decoder.caption_length, cfg.vocab_size)
    assert out["caption_logits"].dtype == jnp.float32
    np.testing.assert_allclose(jnp.linalg.norm(out["image_emb"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-5)
    for leaf in jax.tree.leaves(params):
        assert leaf.dtype == jnp.float32  # parameters stay fp32 whatever the compute dtype


def test_bfloat16_compute_keeps_fp32_params_and_logits():
    cfg = tiny_config("dtype=bfloat16")
    model, params = init(cfg)
    out = jax.jit(model.apply)(params, *random_inputs(cfg))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    assert out["caption_logits"].dtype == jnp.float32 and out["image_emb"].dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out["caption_logits"])))


def test_any_resolution_uses_the_same_parameters():
    """Sin-cos positions are recomputed from the grid, so a 48 px image runs with 32 px parameters."""
    cfg = tiny_config()
    model, params = init(cfg)
    images, _ = random_inputs(cfg, image_size=48)
    emb = model.apply(params, images, method=models.OpenVision.encode_image)
    assert emb.shape == (2, cfg.embed_dim) and bool(jnp.all(jnp.isfinite(emb)))


def test_posemb_sincos_2d_layout():
    pe = posemb_sincos_2d(3, 4, 16)
    assert pe.shape == (12, 16)
    # First quarter: sin(x * omega) with omega[0] = 1, x the column index.
    np.testing.assert_allclose(pe[:, 0], np.sin(np.tile(np.arange(4), 3)), atol=1e-6)
    np.testing.assert_allclose(pe[:, 8], np.sin(np.repeat(np.arange(3), 4)), atol=1e-6)


def test_prefix_lm_mask():
    mask = np.asarray(prefix_lm_mask(6, 6, 3))
    expected = np.array([
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
    ], bool)
    np.testing.assert_array_equal(mask, expected)


def test_masked_attention_ignores_later_queries():
    q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 7, 2, 8))
    out = dot_product(q, k, v, prefix_len=4)
    v2 = v.at[:, 5:].set(100.0)  # change the last two (query) positions
    out2 = dot_product(q, k, v2, prefix_len=4)
    np.testing.assert_allclose(out[:, :5], out2[:, :5], atol=1e-6)  # prefix and query 4 cannot see them
    assert not np.allclose(out[:, 5:], out2[:, 5:])


def test_text_pooling_reads_the_last_token():
    cfg = tiny_config()
    model, params = init(cfg)
    _, texts = random_inputs(cfg)
    emb = model.apply(params, texts, method=models.OpenVision.encode_text)
    # Bidirectional: changing an early token changes the pooled embedding too.
    emb2 = model.apply(params, texts.at[:, 0].set(7), method=models.OpenVision.encode_text)
    assert emb.shape == (4, cfg.embed_dim) and not np.allclose(emb, emb2)
