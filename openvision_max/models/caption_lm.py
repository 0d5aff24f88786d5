"""OpenVision 2's caption decoder: teacher-forced next-token prediction of the caption from image tokens.

Inputs are the (kept) patch tokens projected to the decoder width and the caption's token embeddings of
`[bos] caption[:-1]`. Fusion `concat`: one causal stack over [image tokens, caption tokens], whose caption
positions predict the next token. Fusion `cross_attn`: the caption alone runs through depth / 2 pairs of
causal self-attention and cross-attention (to the image tokens) blocks. Then a final LayerNorm and a
bias-free head to the vocabulary (models/vocab_head: fp32 logits, or the fused per-position NLL). No position
embedding of the caption: the causal mask orders it (as in the original), and the image tokens carry the
vision tower's 2-D positions.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from openvision_max.models.layers import BATCH_LEN_EMBED, Stack, StackConfig, constrain, layer_norm, logical
from openvision_max.models.vocab_head import VocabHead


class CaptionLM(nn.Module):
    stack: StackConfig
    vocab_size: int
    fusion: str                  # "concat" or "cross_attn"

    @nn.compact
    def __call__(self, image_tokens: jax.Array, caption_inputs: jax.Array, targets: jax.Array | None = None
                 ) -> jax.Array:
        """image_tokens [B, K, Dv], caption_inputs [B, T] int32 -> next-token logits [B, T, V] fp32; with
        targets [B, T], each position's NLL [B, T] fp32 instead (vocab_head)."""
        dtype, width = self.stack.compute_dtype, self.stack.width
        image = nn.Dense(width, use_bias=False, dtype=dtype, name="image_proj",
                         kernel_init=logical(nn.initializers.normal(image_tokens.shape[-1] ** -0.5),
                                             ("embed_in", "embed")))(image_tokens)
        text = nn.Embed(self.vocab_size, width, dtype=jnp.float32, name="embedding",
                        embedding_init=logical(nn.initializers.normal(0.02), ("vocab", "embed")))(caption_inputs)
        text = constrain(text.astype(dtype), BATCH_LEN_EMBED)
        causal = dataclasses.replace(self.stack, prefix_len=0)  # a prefix of 0: causal everywhere
        if self.fusion == "concat":
            x = constrain(jnp.concatenate([image, text], axis=1), BATCH_LEN_EMBED)
            x = Stack(causal, name="transformer")(x)[:, image.shape[1]:]
        else:
            x = Stack(causal, name="transformer")(text, constrain(image, BATCH_LEN_EMBED))
        x = layer_norm("ln_final")(x.astype(jnp.float32))
        return VocabHead(self.vocab_size, dtype, kernel_init=nn.initializers.normal(width ** -0.5),
                         name="head")(x, targets)
