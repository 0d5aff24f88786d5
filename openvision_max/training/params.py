"""Model parameters on one device, outside training: abstract shapes, a fresh init, loading a checkpoint.

Export, import and `load_model` work on a single device (inference and file conversion need no mesh); the
train loop creates its state sharded instead (train_step.create_state).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from openvision_max import models
from openvision_max.config.schema import Config
from openvision_max.training import checkpointing


def _init_boxed(cfg: Config, rng: jax.Array) -> Any:
    model = models.build(cfg)
    return model.init(rng, *(jnp.zeros(s.shape, s.dtype) for s in models.dummy_inputs(cfg)))["params"]


def _unbox(tree: Any) -> Any:
    # Without the sharding constraint LogicallyPartitioned.unbox would apply: there is no mesh here.
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.LogicallyPartitioned) else x,
                        tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def abstract_params(cfg: Config) -> Any:
    """ShapeDtypeStructs of the model's parameters, placed on the first device."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = _unbox(jax.eval_shape(lambda r: _init_boxed(cfg, r), jax.eval_shape(jax.random.key, 0)))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)


def init_params(cfg: Config, seed: int) -> Any:
    """A fresh initialisation (the one a run with `seed` starts from, up to sharding), on one device."""
    model = models.build(cfg)
    inputs = tuple((s.shape, s.dtype) for s in models.dummy_inputs(cfg))
    return _jitted_init(type(model), model.spec, inputs)(jax.random.key(seed))


@functools.lru_cache(maxsize=4)
def _jitted_init(module: type, spec: Any, inputs: tuple[tuple[tuple[int, ...], Any], ...]):
    # Compiled once per architecture (a few seconds on CPU): init runs the whole forward pass.
    model = module(spec)
    return jax.jit(lambda r: _unbox(model.init(r, *(jnp.zeros(shape, dtype) for shape, dtype in inputs))["params"]))


def load_params(cfg: Config, path: str) -> Any:
    """The parameters of the checkpoint at `path` (run, checkpoints/ or step directory) on one device.
    Raises checkpointing.CheckpointError when nothing usable is there or it does not fit `cfg`."""
    return checkpointing.load_parameters(path, abstract_params(cfg))
