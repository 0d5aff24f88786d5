"""OpenVision 2: the image tower and a caption decoder fed a random subset of its patch tokens; no text tower.

The only loss is the caption's next-token cross-entropy (training/objectives.py). The vision tower is
OpenVision's, built from the same keys, so its parameters (and exports) have the same layout.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from openvision_max.config.schema import Config
from openvision_max.models.caption_lm import CaptionLM
from openvision_max.models.layers import StackConfig
from openvision_max.models.openvision import l2_normalize, stack_config
from openvision_max.models.token_masking import keep_tokens
from openvision_max.models.vision import VisionTower


@dataclasses.dataclass(frozen=True)
class ModelSpec2:
    vision: StackConfig
    decoder: StackConfig
    patch_size: int
    embed_dim: int
    vocab_size: int
    fusion: str
    kept_patches: int


class OpenVision2(nn.Module):
    """Parameters: `vision` and `decoder`."""
    spec: ModelSpec2

    def setup(self):
        s = self.spec
        self.vision = VisionTower(s.vision, s.patch_size, s.embed_dim)
        self.decoder = CaptionLM(s.decoder, s.vocab_size, s.fusion)

    def encode_image(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] normalised -> L2-normalised pooled embeddings [B, E] fp32. (The pooled head is
        not trained by this objective: the patch tokens are what the decoder, and a downstream LLM, read.)"""
        return l2_normalize(self.vision(images)[0])

    def image_tokens(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] normalised -> patch tokens [B, N, D] (the last block's, before ln_post)."""
        return self.vision(images)[1]

    def decode(self, image_tokens: jax.Array, caption_inputs: jax.Array,
               token_keys: jax.Array | None = None, targets: jax.Array | None = None) -> jax.Array:
        """Patch tokens [B, N, D] and caption inputs [B, T] -> logits [B, T, V] fp32, or given targets [B, T]
        each position's NLL [B, T] fp32; with token_keys [B] the decoder reads the kept tokens only (their
        indices are sown as intermediates/kept_indices)."""
        image_tokens, kept = keep_tokens(image_tokens, token_keys, self.spec.kept_patches)
        if kept is not None:
            self.sow("intermediates", "kept_indices", kept)
        return self.decoder(image_tokens, caption_inputs, targets)

    def __call__(self, images: jax.Array, caption_inputs: jax.Array,
                 token_keys: jax.Array | None = None, targets: jax.Array | None = None) -> dict[str, jax.Array]:
        """images [B, H, W, 3] normalised, caption_inputs [B, T] int32 (`[bos] caption[:-1]`), token_keys
        [B] (visual token masking; none: every patch) -> {"caption_logits": [B, T, V] fp32}, or given the
        next tokens targets [B, T], {"caption_nll": [B, T] fp32}."""
        out = self.decode(self.image_tokens(images), caption_inputs, token_keys, targets)
        return {"caption_logits" if targets is None else "caption_nll": out}


def build(cfg: Config) -> OpenVision2:
    """The model a finalized config with objective=openvision2 describes."""
    return OpenVision2(ModelSpec2(
        vision=stack_config(cfg, "vision", gelu_tanh=False),
        decoder=stack_config(cfg, "decoder", gelu_tanh=True),
        patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, vocab_size=cfg.vocab_size,
        fusion=cfg.decoder.fusion, kept_patches=cfg.derived.kept_patches,
    ))


def caption_positions(cfg: Config) -> int:
    """Teacher-forced positions per caption: caption_length tokens ([bos] ... [eos], padded) predict
    caption_length - 1 next tokens."""
    return cfg.decoder.caption_length - 1


def dummy_inputs(cfg: Config, batch: int = 1) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """Abstract (images, caption_inputs) of a batch, the arguments of `init`."""
    return (jax.ShapeDtypeStruct((batch, cfg.image_size, cfg.image_size, 3), jnp.float32),
            jax.ShapeDtypeStruct((batch, caption_positions(cfg)), jnp.int32))
