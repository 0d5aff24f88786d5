"""OpenVision's training losses: symmetric softmax contrastive loss and the masked caption loss.

Logits are constrained to (batch, unsharded): each device holds its own rows against every column of the
global batch, O(local x global) memory, and the gradient flows through the gather of the other side.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def softmax_contrastive(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """CLIP loss, ½ (image->text + text->image). image_emb, text_emb [B, E] L2-normalised, fp32."""
    logits = logit_scale * jnp.einsum("ie,te->it", image_emb, text_emb)
    logits = nn.with_logical_constraint(logits, ("activation_batch", None))
    positives = logit_scale * jnp.sum(image_emb * text_emb, axis=-1)
    image_to_text = jax.nn.logsumexp(logits, axis=1) - positives
    text_to_image = jax.nn.logsumexp(logits, axis=0) - positives
    return 0.5 * (jnp.mean(image_to_text) + jnp.mean(text_to_image))


def caption_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean token cross-entropy over the global batch: sum(nll * mask) / sum(mask).

    logits [B, Q, V] fp32, targets [B, Q] int32, mask [B, Q] (1 where the target is a real token).
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)
