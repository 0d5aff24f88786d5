"""The text tower: token + learned position embeddings -> bidirectional pre-LN blocks -> LN -> last token -> head."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from openvision_max.models.layers import BATCH_LEN_EMBED, Stack, StackConfig, constrain, layer_norm, logical


class TextTower(nn.Module):
    stack: StackConfig
    vocab_size: int
    context_length: int
    embed_dim: int

    @nn.compact
    def __call__(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """ids [B, L] int32 -> (embedding [B, E] fp32, tokens [B, L - 1, D] for the decoder).

        Pooling takes the last position, where the tokenizer puts [CLS]. Pads are attended, as in the
        original (no padding mask). The decoder's tokens are the last block's output before the final LN.
        """
        width = self.stack.width
        x = nn.Embed(self.vocab_size, width, dtype=jnp.float32, name="embedding",
                     embedding_init=logical(nn.initializers.normal(0.02), ("vocab", "embed")))(ids)
        pos = self.param("pos_embedding", logical(nn.initializers.normal(0.01), (None, "position", "embed")),
                         (1, self.context_length, width))
        x = constrain((x + pos).astype(self.stack.compute_dtype), BATCH_LEN_EMBED)
        x = Stack(self.stack, name="transformer")(x)
        tokens = x[:, :-1]
        pooled = layer_norm("ln_final")(x[:, -1].astype(jnp.float32))
        emb = nn.Dense(self.embed_dim, use_bias=False, dtype=jnp.float32, name="head",
                       kernel_init=logical(nn.initializers.lecun_normal(), ("embed", "proj")))(pooled)
        return emb, tokens
