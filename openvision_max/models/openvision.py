"""OpenVision: image tower + text tower + caption decoder + learned temperature, built from the run config."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from openvision_max.config.schema import Config
from openvision_max.models import attention
from openvision_max.models.decoder import CaptionDecoder
from openvision_max.models.layers import StackConfig, logical
from openvision_max.models.token_masking import keep_tokens
from openvision_max.models.text import TextTower
from openvision_max.models.vision import VisionTower

# Initial t (logit scale = exp(t)) and, for the sigmoid loss, logit bias: CLIP's and SigLIP's values.
LOGIT_SCALE_INIT = {"softmax": 1 / 0.07, "sigmoid": 10.0}
SIGMOID_BIAS_INIT = -10.0


def l2_normalize(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything the module needs, hashable (the run config holds lists, so it is not passed itself)."""
    vision: StackConfig
    text: StackConfig
    decoder: StackConfig
    patch_size: int
    embed_dim: int
    vocab_size: int
    context_length: int
    caption_length: int
    contrastive_loss: str        # "sigmoid" adds the learned logit bias `b`
    logit_scale_init: float      # exp(t) at initialisation
    kept_patches: int            # patch tokens the decoder reads (visual token masking)


class OpenVision(nn.Module):
    """Parameters: `vision`, `text`, `decoder`, and the temperature `t` (logit scale = exp(t))."""
    spec: ModelSpec

    def setup(self):
        s = self.spec
        self.vision = VisionTower(s.vision, s.patch_size, s.embed_dim)
        self.text = TextTower(s.text, s.vocab_size, s.context_length, s.embed_dim)
        self.decoder = CaptionDecoder(s.decoder, s.vocab_size, s.caption_length)
        self.t = self.param("t", logical(nn.initializers.constant(math.log(s.logit_scale_init)), ()), ())
        if s.contrastive_loss == "sigmoid":
            self.b = self.param("b", logical(nn.initializers.constant(SIGMOID_BIAS_INIT), ()), ())

    def encode_image(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] normalised -> L2-normalised embeddings [B, E] fp32."""
        return l2_normalize(self.vision(images)[0])

    def encode_text(self, ids: jax.Array) -> jax.Array:
        """ids [B, L] int32 -> L2-normalised embeddings [B, E] fp32."""
        return l2_normalize(self.text(ids)[0])

    def logit_params(self) -> dict[str, jax.Array]:
        """logit_scale = exp(t), and logit_bias for the sigmoid loss."""
        out = {"logit_scale": jnp.exp(self.t)}
        if self.spec.contrastive_loss == "sigmoid":
            out["logit_bias"] = self.b
        return out

    def embed(self, images: jax.Array, texts: jax.Array) -> dict[str, jax.Array]:
        """The contrastive embeddings only (no decoder): image_emb [B, E], text_emb [k * B, E]."""
        return {"image_emb": self.encode_image(images), "text_emb": self.encode_text(texts)}

    def __call__(self, images: jax.Array, texts: jax.Array, token_keys: jax.Array | None = None,
                 caption_targets: jax.Array | None = None) -> dict[str, jax.Array]:
        """images [B, H, W, 3]; texts [k * B, L] with the B alt-texts first (the decoder reads those);
        token_keys [B], one key per image for visual token masking (none: the decoder reads every patch);
        caption_targets [B, caption_length] int32, the recaption the decoder is scored on.

        Returns image_emb [B, E] and text_emb [k * B, E] (L2-normalised, fp32), logit_scale = exp(t) and,
        for the sigmoid loss, logit_bias; and caption_logits [B, caption_length, V] fp32 or, given
        caption_targets, caption_nll [B, caption_length] fp32 (each position's NLL, without the logits).
        """
        b = images.shape[0]
        image_emb, image_tokens = self.vision(images)
        text_emb, text_tokens = self.text(texts)
        image_tokens, kept = keep_tokens(image_tokens, token_keys, self.spec.kept_patches)
        if kept is not None:
            self.sow("intermediates", "kept_indices", kept)
        caption = self.decoder(image_tokens, text_tokens[:b], caption_targets)
        return {
            "image_emb": l2_normalize(image_emb),
            "text_emb": l2_normalize(text_emb),
            "caption_logits" if caption_targets is None else "caption_nll": caption,
            **self.logit_params(),
        }


def stack_config(cfg: Config, name: str, *, gelu_tanh: bool) -> StackConfig:
    """The StackConfig of tower `name` (vision, text or decoder); decoders set their own mask."""
    tower = getattr(cfg, name)
    kind = getattr(cfg.derived, f"{name}_attention")
    return StackConfig(
        width=tower.width, depth=tower.depth, mlp_dim=tower.mlp_dim, num_heads=tower.num_heads,
        remat_policy=getattr(cfg.derived, f"{name}_remat_policy"), scan_layers=cfg.scan_layers,
        attention=kind, dtype=cfg.dtype, gelu_tanh=gelu_tanh, attention_options=attention.options(cfg, kind),
        cpu_dense=cfg.derived.platform == "cpu")


def build(cfg: Config) -> OpenVision:
    """The model a finalized config with objective=openvision describes."""
    return OpenVision(ModelSpec(
        vision=stack_config(cfg, "vision", gelu_tanh=False),
        text=stack_config(cfg, "text", gelu_tanh=True),
        decoder=stack_config(cfg, "decoder", gelu_tanh=True),
        patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, vocab_size=cfg.vocab_size,
        context_length=cfg.text.context_length, caption_length=cfg.decoder.caption_length,
        contrastive_loss=cfg.contrastive_loss,
        logit_scale_init=cfg.logit_scale_init or LOGIT_SCALE_INIT[cfg.contrastive_loss],
        kept_patches=cfg.derived.kept_patches,
    ))


def dummy_inputs(cfg: Config, batch: int = 1) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """Abstract (images, texts) of a batch, the arguments of `init`: two texts per image (alt-text and a
    sub-caption)."""
    return (jax.ShapeDtypeStruct((batch, cfg.image_size, cfg.image_size, 3), jnp.float32),
            jax.ShapeDtypeStruct((2 * batch, cfg.text.context_length), jnp.int32))
