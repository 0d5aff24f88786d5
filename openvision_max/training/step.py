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

from openvision_max import models
from openvision_max.config.schema import Config
from openvision_max.training import fault_hooks as hooks
from openvision_max.mesh import sharding
from openvision_max.models import token_masking
from openvision_max.training import objectives, optimizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array               # optimiser steps taken in this stage
    params: Any
    opt_state: Any
    nonfinite_in_a_row: jax.Array  # consecutive steps skipped for a non-finite loss or gradient


def loss_fn(model: nn.Module, cfg: Config, params: Any, batch: dict[str, jax.Array]):
    """The objective's loss of a batch: (total, parts). `batch["token_keys"]`, where present, drives visual
    token masking."""
    return objectives.get(cfg.objective).loss(model, cfg, params, batch)


def accumulated_loss_and_grads(model: nn.Module, cfg: Config, params: Any, batch: dict[str, jax.Array]):
    """((total, parts), grads) of the full batch from `gradient_accumulation_steps` microbatches, exactly."""
    return objectives.get(cfg.objective).accumulated(model, cfg, params, batch)


def with_token_keys(cfg: Config, batch: dict[str, jax.Array], step: jax.Array) -> dict[str, jax.Array]:
    """`batch` plus a key per example for visual token masking (only when the decoder drops tokens): from the
    seed and the step counted across stages, so a resumed run draws the same tokens."""
    if cfg.derived.kept_patches >= cfg.derived.num_patches:
        return batch
    b = batch["images"].shape[0]
    keys = token_masking.example_keys(cfg.seed, cfg.derived.step_offset + step, jnp.arange(b))
    return {**batch, "token_keys": keys}


def schedule_moves_on(kept: Any, updated: Any) -> Any:
    """`kept` (the optimiser state of a skipped step) with the learning-rate schedule's count of `updated`: a
    skipped step is still a step of the schedule, so its count stays equal to `state.step`, the logged learning
    rate is the applied one and the schedule still ends at zero. Adam's moments (and their count, which
    drives the bias correction of the moments themselves) stay as they were."""
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    return jax.tree.map(lambda k, u: u if is_schedule(k) else k, kept, updated, is_leaf=is_schedule)


def train_step(model: nn.Module, tx: optax.GradientTransformation, cfg: Config,
               state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    batch = with_token_keys(cfg, batch, state.step)
    if cfg.gradient_accumulation_steps > 1:
        (loss, parts), grads = accumulated_loss_and_grads(model, cfg, state.params, batch)
    else:
        grad_fn = jax.value_and_grad(functools.partial(loss_fn, model, cfg), has_aux=True)
        (loss, parts), grads = grad_fn(state.params, batch)
    grads = hooks.poison_gradients(grads, state.step)  # the identity unless a fault test asks for NaN
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss or gradient skips the update (params and optimiser state stay as they were).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # Once max_nonfinite_steps bad steps came in a row, the counter stays there and nothing is applied any
    # more: the host reads the counter only on logged steps (no sync per step), so a run of bad steps
    # between two logs is still seen at the next one, with the state as it was before them.
    stopped = state.nonfinite_in_a_row >= cfg.max_nonfinite_steps
    apply = finite & ~stopped
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(apply, new, old))
    new_state = TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=schedule_moves_on(keep(opt_state, state.opt_state), opt_state),
        nonfinite_in_a_row=jnp.where(stopped, state.nonfinite_in_a_row,
                                     jnp.where(finite, 0, state.nonfinite_in_a_row + 1)),
    )
    metrics = {
        "loss": loss, **parts,
        "grad_norm": grad_norm,
        "learning_rate": optimizer.learning_rate_schedule(cfg)(state.step),
        "nonfinite_in_a_row": new_state.nonfinite_in_a_row,
    }
    return new_state, metrics


def _init_state_boxed(model: nn.Module, tx: optax.GradientTransformation, cfg: Config, rng: jax.Array):
    params = model.init(rng, *(jnp.zeros(s.shape, s.dtype) for s in models.dummy_inputs(cfg)))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      nonfinite_in_a_row=jnp.zeros((), jnp.int32))


def _boxed_shapes(model: nn.Module, tx: optax.GradientTransformation, cfg: Config, mesh: Mesh) -> TrainState:
    """The train state's shapes, each leaf still boxed with its logical axis names (one trace of the init)."""
    # An abstract key, made outside the mesh: a concrete array cannot be placed on compile-only AOT devices.
    rng = jax.eval_shape(jax.random.key, 0)
    with sharding.activate(cfg, mesh):
        return jax.eval_shape(functools.partial(_init_state_boxed, model, tx, cfg), rng)


def _shardings_of(cfg: Config, mesh: Mesh, boxed: TrainState) -> TrainState:
    with sharding.activate(cfg, mesh):
        return sharding.logical_to_shardings(cfg, mesh, nn.get_partition_spec(boxed))


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, cfg: Config, mesh: Mesh) -> TrainState:
    """NamedShardings of every leaf of the train state, from the parameters' logical axis names."""
    return _shardings_of(cfg, mesh, _boxed_shapes(model, tx, cfg, mesh))


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, cfg: Config, mesh: Mesh) -> TrainState:
    """The train state as ShapeDtypeStructs carrying their shardings (for restoring and AOT compilation)."""
    boxed = _boxed_shapes(model, tx, cfg, mesh)
    # Unbox without the sharding constraint LogicallyPartitioned.unbox applies: these are shapes, not arrays.
    shapes = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.LogicallyPartitioned) else x,
                          boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, _shardings_of(cfg, mesh, boxed))


def shardings_of(abstract: TrainState) -> TrainState:
    """The NamedShardings an `abstract_state` carries (so a caller that has one traces the init no more)."""
    return jax.tree.map(lambda a: a.sharding, abstract)


def create_state(model: nn.Module, tx: optax.GradientTransformation, cfg: Config, mesh: Mesh,
                 rng: jax.Array, shardings: TrainState | None = None) -> TrainState:
    """Parameters and optimiser state initialised directly into their sharded layout (`shardings`, when the
    caller has them, else derived here)."""
    return sharding.init_sharded(cfg, mesh, functools.partial(_init_state_boxed, model, tx, cfg), rng,
                                 shardings=shardings)


def state_from_params(tx: optax.GradientTransformation, state_sh: TrainState, params: Any) -> TrainState:
    """A fresh state (step 0, new optimiser state) around existing parameters, laid out as `state_sh`."""
    def fresh(p):
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                          nonfinite_in_a_row=jnp.zeros((), jnp.int32))
    return jax.jit(fresh, in_shardings=(state_sh.params,), out_shardings=state_sh)(params)


def jit_train_step(model: nn.Module, tx: optax.GradientTransformation, cfg: Config, mesh: Mesh,
                   state_sh: TrainState | None = None):
    """The step jitted with explicit in/out shardings (the state's `state_sh`, when the caller has them, else
    derived here); the state argument is donated."""
    state_sh = state_sh if state_sh is not None else state_shardings(model, tx, cfg, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    return jax.jit(functools.partial(train_step, model, tx, cfg),
                   in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, sharding.replicated(mesh)),
                   donate_argnums=(0,))
