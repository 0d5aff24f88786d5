"""The train state, created already sharded, and the pure train step jitted with explicit shardings."""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from openvision_max import losses, models, optimizer, sharding
from openvision_max.schema import Config

# ImageNet statistics: images travel as uint8 and are normalised on device.
IMAGE_MEAN = jnp.array([0.485, 0.456, 0.406], jnp.float32) * 255
IMAGE_STD = jnp.array([0.229, 0.224, 0.225], jnp.float32) * 255


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def normalize_images(images: jax.Array) -> jax.Array:
    """uint8 [B, H, W, 3] -> float32, ImageNet mean/std normalised."""
    return (images.astype(jnp.float32) - IMAGE_MEAN) / IMAGE_STD


def loss_fn(model: nn.Module, cfg: Config, params: Any, batch: dict[str, jax.Array]):
    """Total = contrastive_weight x contrastive + caption_weight x caption; returns (total, parts)."""
    out = model.apply({"params": params}, normalize_images(batch["images"]), batch["texts"])
    b = batch["images"].shape[0]
    image_emb, text_emb, scale = out["image_emb"], out["text_emb"], out["logit_scale"]
    # Images against alt-texts and against sub-captions, the two averaged.
    contrastive = 0.5 * (losses.softmax_contrastive(image_emb, text_emb[:b], scale)
                         + losses.softmax_contrastive(image_emb, text_emb[b:], scale))
    caption = losses.caption_loss(out["caption_logits"], batch["caption_targets"], batch["caption_mask"])
    total = cfg.contrastive_weight * contrastive + cfg.caption_weight * caption
    return total, {"contrastive_loss": contrastive, "caption_loss": caption, "temperature": scale}


def train_step(model: nn.Module, tx: optax.GradientTransformation, cfg: Config,
               state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, model, cfg), has_aux=True)
    (loss, parts), grads = grad_fn(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss, **parts,
        "grad_norm": optax.global_norm(grads),
        "learning_rate": optimizer.learning_rate_schedule(cfg)(state.step),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def _init_state_boxed(model: nn.Module, tx: optax.GradientTransformation, cfg: Config, rng: jax.Array):
    params = model.init(rng, *(jnp.zeros(s.shape, s.dtype) for s in models.dummy_inputs(cfg)))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, cfg: Config, mesh: Mesh) -> TrainState:
    """NamedShardings of every leaf of the train state, from the parameters' logical axis names."""
    with sharding.activate(cfg, mesh):
        abstract = jax.eval_shape(functools.partial(_init_state_boxed, model, tx, cfg), jax.random.key(0))
        return sharding.logical_to_shardings(cfg, mesh, nn.get_partition_spec(abstract))


def create_state(model: nn.Module, tx: optax.GradientTransformation, cfg: Config, mesh: Mesh,
                 rng: jax.Array) -> TrainState:
    """Parameters and optimiser state initialised directly into their sharded layout."""
    return sharding.init_sharded(cfg, mesh, functools.partial(_init_state_boxed, model, tx, cfg), rng)


def jit_train_step(model: nn.Module, tx: optax.GradientTransformation, cfg: Config, mesh: Mesh):
    """The step jitted with explicit in/out shardings; the state argument is donated."""
    state_sh = state_shardings(model, tx, cfg, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    return jax.jit(functools.partial(train_step, model, tx, cfg),
                   in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, sharding.replicated(mesh)),
                   donate_argnums=(0,))
