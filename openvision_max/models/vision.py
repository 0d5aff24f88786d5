"""The ViT image tower: patch embedding -> CLS + 2-D sin-cos positions -> pre-LN blocks -> mean pool -> head."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from openvision_max.models.layers import (
    BATCH_LEN_EMBED,
    Stack,
    StackConfig,
    constrain,
    layer_norm,
    logical,
    posemb_sincos_2d,
)


class VisionTower(nn.Module):
    stack: StackConfig
    patch_size: int
    embed_dim: int

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [B, H, W, 3] normalised float -> (embedding [B, E] fp32, patch tokens [B, N, D]).

        The patch tokens are the last block's output before the final LayerNorm (the decoder's input).
        """
        width, p = self.stack.width, self.patch_size
        # Patch embedding in fp32 (a stride-p convolution without bias), as in the original.
        x = nn.Conv(width, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=jnp.float32,
                    name="embedding",
                    # The kernel's patch and channel dims are small and never sharded.
                    kernel_init=logical(nn.initializers.lecun_normal(), (None, None, None, "embed")))(
                        images.astype(jnp.float32))
        b, gh, gw, _ = x.shape
        x = x.reshape(b, gh * gw, width) + posemb_sincos_2d(gh, gw, width)[None]
        # A learned CLS token at position 0; its position-embedding slot is zero. It is excluded from pooling.
        cls = self.param("cls", logical(nn.initializers.normal(1e-6), (None, None, "embed")), (1, 1, width))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, width)), x], axis=1)
        x = constrain(x.astype(self.stack.compute_dtype), BATCH_LEN_EMBED)
        x = Stack(self.stack, name="transformer")(x)
        tokens = x[:, 1:]
        pooled = layer_norm("ln_post")(jnp.mean(tokens.astype(jnp.float32), axis=1))
        emb = nn.Dense(self.embed_dim, use_bias=False, dtype=jnp.float32, name="head",
                       kernel_init=logical(nn.initializers.lecun_normal(), ("embed", "proj")))(pooled)
        return emb, tokens
