"""The caption decoder (CLIPS-style "concat" fusion): a prefix-LM over [image tokens, alt-text tokens, queries].

The image and alt-text tokens are projected to the decoder width and form a bidirectional prefix; the learned
queries attend to the whole prefix and causally among themselves, and each query position predicts one token
of the (shifted) recaption directly: no teacher forcing, no position embedding of its own. With visual token
masking (decoder.keep_ratio < 1) the image part of the prefix is the kept tokens only.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from openvision_max.models.layers import BATCH_LEN_EMBED, Stack, StackConfig, constrain, layer_norm, logical
from openvision_max.models.vocab_head import VocabHead


class CaptionDecoder(nn.Module):
    stack: StackConfig           # its prefix_len is set here, from the image and text token counts
    vocab_size: int
    caption_length: int

    @nn.compact
    def __call__(self, image_tokens: jax.Array, text_tokens: jax.Array, targets: jax.Array | None = None
                 ) -> jax.Array:
        """image_tokens [B, N, Dv], text_tokens [B, L, Dt] -> logits [B, caption_length, V] fp32; with
        targets [B, caption_length], each position's NLL [B, caption_length] fp32 instead (vocab_head)."""
        dtype = self.stack.compute_dtype
        width = self.stack.width

        def project(name: str, x: jax.Array) -> jax.Array:
            return nn.Dense(width, use_bias=False, dtype=dtype, name=name,
                            kernel_init=logical(nn.initializers.lecun_normal(), ("embed_in", "embed")))(x)

        b = image_tokens.shape[0]
        queries = self.param("queries", logical(nn.initializers.normal(1.0), (None, "position", "embed")),
                             (1, self.caption_length, width))
        x = jnp.concatenate([
            project("image_proj", image_tokens),
            project("text_proj", text_tokens),
            jnp.broadcast_to(queries, (b, self.caption_length, width)).astype(dtype),
        ], axis=1)
        x = constrain(x, BATCH_LEN_EMBED)
        prefix = dataclasses.replace(self.stack, prefix_len=image_tokens.shape[1] + text_tokens.shape[1])
        x = Stack(prefix, name="transformer")(x)
        x = layer_norm("ln_final")(x[:, -self.caption_length:].astype(jnp.float32))
        return VocabHead(self.vocab_size, dtype, name="head")(x, targets)
