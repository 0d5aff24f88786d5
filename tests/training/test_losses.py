"""The contrastive losses against their definitions, and the softmax loss under a bfloat16 logits einsum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openvision_max.training import losses


def embeddings(b=64, e=64, seed=0, noise=0.5):
    """Matched pairs (image i close to text i) of L2-normalised vectors."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(b, e))
    texts = images + noise * rng.normal(size=(b, e))
    unit = lambda x: jnp.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True), jnp.float32)  # noqa: E731
    return unit(images), unit(texts)


def reference_softmax(images, texts, scale):
    logits = scale * np.asarray(images, np.float64) @ np.asarray(texts, np.float64).T
    lse_rows = np.log(np.exp(logits).sum(1))
    lse_cols = np.log(np.exp(logits).sum(0))
    diag = np.diag(logits)
    return 0.5 * (np.mean(lse_rows - diag) + np.mean(lse_cols - diag))


def test_softmax_loss_is_clips():
    images, texts = embeddings()
    got = float(losses.softmax_contrastive(images, texts, jnp.float32(10.0)))
    assert got == pytest.approx(reference_softmax(images, texts, 10.0), rel=1e-5)


def test_softmax_loss_under_tpu_default_precision_stays_within_1e_3(monkeypatch):
    """What a TPU does to an fp32 einsum at default precision (one bfloat16 pass: inputs rounded, fp32
    accumulation; HIGHEST is fp32-exact), imitated on CPU: at logit scale 100 and a loss of about 4 the loss
    stays within 1e-3 of the fp32 one (with default-precision logits it moved by 2e-3 to 6e-3)."""
    images, texts = embeddings(noise=3.0)  # a loss of about 4: the negatives count
    exact = float(losses.softmax_contrastive(images, texts, jnp.float32(100.0)))
    plain = jnp.einsum

    def tpu_einsum(spec, a, b, precision=None, **kwargs):
        if precision != jax.lax.Precision.HIGHEST:
            a, b, kwargs = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), {"preferred_element_type": jnp.float32}
        return plain(spec, a, b, precision=precision, **kwargs)
    monkeypatch.setattr(losses.jnp, "einsum", tpu_einsum)
    rounded = float(jax.jit(losses.softmax_contrastive)(images, texts, jnp.float32(100.0)))
    print(f"scale 100: fp32 {exact:.6f}, TPU default precision {rounded:.6f}, difference {abs(rounded - exact):.2e}")
    assert exact > 1 and abs(rounded - exact) < 1e-3


def test_sigmoid_loss_is_siglips():
    images, texts = embeddings(b=16)
    scale, bias = 10.0, -10.0
    logits = scale * np.asarray(images, np.float64) @ np.asarray(texts, np.float64).T + bias
    labels = 2 * np.eye(16) - 1
    expected = np.sum(np.log1p(np.exp(-labels * logits))) / 16
    got = float(losses.sigmoid_contrastive(images, texts, jnp.float32(scale), jnp.float32(bias)))
    assert got == pytest.approx(expected, rel=1e-5)
