"""OpenVision's training losses: the contrastive loss (softmax, or SigLIP's sigmoid) and the masked caption loss.

Logits are constrained to (batch, unsharded): each device holds its own rows against every column of the
global batch, O(local x global) memory, and the gradient flows through the gather of the other side.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


HIGHEST = jax.lax.Precision.HIGHEST


def similarities(image_emb: jax.Array, text_emb: jax.Array) -> jax.Array:
    """Cosine similarities [B, B] at full fp32 precision. At default precision a TPU computes an fp32 einsum
    in one bfloat16 pass: times a logit scale near 100, the rounding moves the loss by several 1e-3 (more than
    its resolution late in training). This matmul is a negligible share of the step's FLOPs."""
    return jnp.einsum("ie,te->it", image_emb, text_emb, precision=HIGHEST)


def softmax_contrastive(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """CLIP loss, ½ (image->text + text->image). image_emb, text_emb [B, E] L2-normalised, fp32.

    The positives are computed at the logits' precision, so they and the logsumexp's terms are the same
    numbers. (Not as `jnp.diagonal(logits)`: on a row-sharded logits matrix that aborted XLA's CPU runtime.)"""
    logits = logit_scale * similarities(image_emb, text_emb)
    logits = nn.with_logical_constraint(logits, ("activation_batch", None))
    positives = logit_scale * jnp.einsum("ie,ie->i", image_emb, text_emb, precision=HIGHEST)
    image_to_text = jax.nn.logsumexp(logits, axis=1) - positives
    text_to_image = jax.nn.logsumexp(logits, axis=0) - positives
    return 0.5 * (jnp.mean(image_to_text) + jnp.mean(text_to_image))


def sigmoid_contrastive(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                        logit_bias: jax.Array) -> jax.Array:
    """SigLIP loss: every (image, text) pair is a binary problem; summed over texts, averaged over images."""
    logits = logit_scale * similarities(image_emb, text_emb) + logit_bias
    logits = nn.with_logical_constraint(logits, ("activation_batch", None))
    n = image_emb.shape[0]
    labels = jnp.where(jnp.arange(n)[:, None] == jnp.arange(n)[None, :], 1.0, -1.0)
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / n


def contrastive(kind: str, image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                logit_bias: jax.Array | None = None) -> jax.Array:
    """OpenVision's two-caption contrastive loss: images against the alt-texts (the first B rows of text_emb)
    and against the sub-captions (the next B), averaged. kind: "softmax" or "sigmoid"."""
    b = image_emb.shape[0]
    if kind == "softmax":
        one = lambda t: softmax_contrastive(image_emb, t, logit_scale)  # noqa: E731
    else:
        one = lambda t: sigmoid_contrastive(image_emb, t, logit_scale, logit_bias)  # noqa: E731
    return 0.5 * (one(text_emb[:b]) + one(text_emb[b:]))


def caption_nll_sum(token_nll: jax.Array, mask: jax.Array) -> jax.Array:
    """sum(nll * mask) of per-position NLLs [B, Q] (models/vocab_head): the caption loss's numerator
    (microbatches add these up)."""
    return jnp.sum(token_nll * mask.astype(jnp.float32))


def caption_loss(token_nll: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean token cross-entropy over the global batch: sum(nll * mask) / sum(mask).

    token_nll [B, Q] fp32, mask [B, Q] (1 where the target is a real token).
    """
    return caption_nll_sum(token_nll, mask) / caption_tokens(mask)


def caption_tokens(mask: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
