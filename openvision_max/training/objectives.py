"""What each `objective` computes from a batch: the loss (with its parts for the metrics) and, for gradient
accumulation, the full batch's loss and gradient from microbatches.

A batch holds images uint8 [B, H, W, 3], texts int32 [2B, L] (the B alt-texts, then the B sub-captions),
caption_targets and caption_mask int32 [B, Q] (the recaption shifted left by one), and, when the decoder
drops patch tokens, token_keys [B] (training/step.with_token_keys).

- openvision: contrastive_weight x the two-caption contrastive loss + caption_weight x the caption loss.
- openvision2: caption_weight x the caption loss of the teacher-forced decoder; no contrastive part.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from openvision_max.config.schema import Config
from openvision_max.data.tokenizer import teacher_forcing
from openvision_max.models.inputs import normalize_images
from openvision_max.training import losses


@dataclasses.dataclass(frozen=True)
class Objective:
    loss: Callable[..., Any]          # (model, cfg, params, batch) -> (total, parts)
    accumulated: Callable[..., Any]   # (model, cfg, params, batch) -> ((total, parts), grads)
    describe: Callable[[Config], str]


def _microbatches(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
    """[B, ...] -> [n, B / n, ...]; texts [2B, L] -> [n, 2B / n, L] keeping alt-texts before sub-captions."""
    def split(x):
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])
    b = batch["images"].shape[0]
    texts = batch["texts"]
    out = {k: split(v) for k, v in batch.items() if k != "texts"}
    out["texts"] = jnp.concatenate([split(texts[:b]), split(texts[b:])], axis=1)
    return out


# --- openvision ------------------------------------------------------------------------------------------

def openvision_loss(model: nn.Module, cfg: Config, params: Any, batch: dict[str, jax.Array]):
    """Total = contrastive_weight x contrastive + caption_weight x caption; returns (total, parts)."""
    out = model.apply({"params": params}, normalize_images(batch["images"]), batch["texts"],
                      batch.get("token_keys"), batch["caption_targets"])
    contrastive = losses.contrastive(cfg.contrastive_loss, out["image_emb"], out["text_emb"],
                                     out["logit_scale"], out.get("logit_bias"))
    caption = losses.caption_loss(out["caption_nll"], batch["caption_mask"])
    total = cfg.contrastive_weight * contrastive + cfg.caption_weight * caption
    return total, {"contrastive_loss": contrastive, "caption_loss": caption, "temperature": out["logit_scale"]}


def openvision_accumulated(model: nn.Module, cfg: Config, params: Any, batch: dict[str, jax.Array]):
    """The full batch's loss and gradient from `gradient_accumulation_steps` microbatches, exactly.

    The contrastive loss couples every image with every text of the batch, so plain accumulation would change
    it. Gradient caching instead: (1) embed all microbatches without gradients; (2) take the loss and its
    gradient with respect to the embeddings (and t, b) over the whole batch; (3) per microbatch, back-propagate
    those embedding gradients plus the caption loss through the towers, summing parameter gradients in fp32.
    Costs one extra encoder forward.
    """
    n = cfg.gradient_accumulation_steps
    micro = _microbatches(batch, n)
    variables = {"params": params}

    def embed(_, mb):
        out = model.apply(variables, normalize_images(mb["images"]), mb["texts"], method="embed")
        return None, (out["image_emb"], out["text_emb"])

    _, (image_emb, text_emb) = jax.lax.scan(embed, None, micro)
    image_emb = jax.lax.stop_gradient(image_emb)  # [n, b, E]
    text_emb = jax.lax.stop_gradient(text_emb)    # [n, 2b, E]: per microbatch, b alt-texts then b sub-captions
    mb = image_emb.shape[1]
    flat_texts = jnp.concatenate([text_emb[:, :mb].reshape(-1, text_emb.shape[-1]),
                                  text_emb[:, mb:].reshape(-1, text_emb.shape[-1])])

    def contrastive_of(image_emb, flat_texts, logit_params):
        return losses.contrastive(cfg.contrastive_loss, image_emb.reshape(-1, image_emb.shape[-1]), flat_texts,
                                  logit_params["logit_scale"], logit_params.get("logit_bias"))

    logit_params, logit_vjp = jax.vjp(lambda p: model.apply({"params": p}, method="logit_params"), params)
    contrastive, (g_image, g_flat, g_logit) = jax.value_and_grad(contrastive_of, argnums=(0, 1, 2))(
        image_emb, flat_texts, logit_params)
    (grads,) = logit_vjp(jax.tree.map(lambda g: cfg.contrastive_weight * g, g_logit))
    g_text = jnp.concatenate([g_flat[:n * mb].reshape(n, mb, -1), g_flat[n * mb:].reshape(n, mb, -1)], axis=1)
    tokens = losses.caption_tokens(batch["caption_mask"])

    def surrogate(p, mb_batch, g_img, g_txt):
        out = model.apply({"params": p}, normalize_images(mb_batch["images"]), mb_batch["texts"],
                          mb_batch.get("token_keys"), mb_batch["caption_targets"])
        nll = losses.caption_nll_sum(out["caption_nll"], mb_batch["caption_mask"])
        linear = jnp.sum(out["image_emb"] * g_img) + jnp.sum(out["text_emb"] * g_txt)
        return cfg.contrastive_weight * linear + cfg.caption_weight * nll / tokens, nll

    def backward(acc, xs):
        grads, nll_sum = acc
        (_, nll), g = jax.value_and_grad(surrogate, has_aux=True)(params, *xs)
        return (jax.tree.map(jnp.add, grads, g), nll_sum + nll), None

    zeros = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    (grads, nll_sum), _ = jax.lax.scan(backward, (zeros, jnp.zeros((), jnp.float32)), (micro, g_image, g_text))
    caption = nll_sum / tokens
    total = cfg.contrastive_weight * contrastive + cfg.caption_weight * caption
    parts = {"contrastive_loss": contrastive, "caption_loss": caption, "temperature": logit_params["logit_scale"]}
    return (total, parts), grads


# --- openvision2 -----------------------------------------------------------------------------------------

def _caption_nll_sum(model: nn.Module, params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(sum of masked token NLLs, their mask) of a batch."""
    inputs, targets, mask = teacher_forcing(batch)
    out = model.apply({"params": params}, normalize_images(batch["images"]), inputs, batch.get("token_keys"),
                      targets)
    return losses.caption_nll_sum(out["caption_nll"], mask), mask


def openvision2_loss(model: nn.Module, cfg: Config, params: Any, batch: dict[str, jax.Array]):
    """Total = caption_weight x the mean token cross-entropy over the global batch."""
    nll, mask = _caption_nll_sum(model, params, batch)
    caption = nll / losses.caption_tokens(mask)
    return cfg.caption_weight * caption, {"caption_loss": caption}


def openvision2_accumulated(model: nn.Module, cfg: Config, params: Any, batch: dict[str, jax.Array]):
    """Plain accumulation is exact here: the loss is a sum over tokens divided by the batch's token count,
    so each microbatch adds its sum's gradient, divided by the whole batch's count."""
    tokens = losses.caption_tokens(teacher_forcing(batch)[2])

    def surrogate(p, mb):
        nll = _caption_nll_sum(model, p, mb)[0]
        return cfg.caption_weight * nll / tokens, nll

    def backward(acc, mb):
        grads, nll_sum = acc
        (_, nll), g = jax.value_and_grad(surrogate, has_aux=True)(params, mb)
        return (jax.tree.map(jnp.add, grads, g), nll_sum + nll), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (grads, nll_sum), _ = jax.lax.scan(backward, (zeros, jnp.zeros((), jnp.float32)),
                                       _microbatches(batch, cfg.gradient_accumulation_steps))
    caption = nll_sum / tokens
    return (cfg.caption_weight * caption, {"caption_loss": caption}), grads


OBJECTIVES = {
    "openvision": Objective(
        openvision_loss, openvision_accumulated,
        lambda cfg: f"{cfg.contrastive_weight:g} x contrastive_loss + {cfg.caption_weight:g} x caption_loss"),
    "openvision2": Objective(
        openvision2_loss, openvision2_accumulated,
        lambda cfg: f"{cfg.caption_weight:g} x caption_loss (teacher-forced, decoder reads "
                    f"{cfg.derived.kept_patches} of {cfg.derived.num_patches} patch tokens)"),
}


def get(name: str) -> Objective:
    return OBJECTIVES[name]
