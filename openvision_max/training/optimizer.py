"""OpenVision's optimiser: Adam (b2 0.95, bf16 first moment) + decoupled weight decay on kernels, warmup-cosine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from openvision_max.config.schema import Config


def learning_rate_schedule(cfg: Config) -> optax.Schedule:
    """Linear warmup from 0 to the peak LR (base_lr x batch / 256), then cosine decay to 0 at `steps`."""
    peak = cfg.derived.peak_learning_rate
    warmup = min(cfg.warmup_steps, cfg.steps)
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(cfg.steps, warmup + 1), end_value=0.0)


def decay_mask(params):
    """True for dense and convolution kernels (a `kernel` key on the path); not embeddings, norms, biases, t."""
    def is_kernel(path, _):
        return any(getattr(k, "key", None) == "kernel" for k in path)
    return jax.tree_util.tree_map_with_path(is_kernel, params)


def build(cfg: Config) -> optax.GradientTransformation:
    clip = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm > 0 else []
    return optax.chain(
        *clip,
        optax.scale_by_adam(b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps, mu_dtype=jnp.bfloat16),
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(learning_rate_schedule(cfg)),
    )
