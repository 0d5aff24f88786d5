"""Running a few train steps of a config on its mesh: shared by the train-step and attention tests."""

import jax

from openvision_max import models
from openvision_max.data.synthetic import SyntheticIterator
from openvision_max.mesh import sharding
from openvision_max.training import optimizer
from openvision_max.training.step import create_state, jit_train_step

MESH_2x2x2 = ["ici_data_parallelism=2", "ici_fsdp_parallelism=2", "ici_tensor_parallelism=2"]


def stepper(cfg, iterator=SyntheticIterator):
    """(initial state, jitted step, data iterator) of a config, on its mesh; call inside `activate(cfg)`."""
    mesh = sharding.create_mesh(cfg)
    model, tx = models.build(cfg), optimizer.build(cfg)
    return (create_state(model, tx, cfg, mesh, jax.random.key(cfg.seed)), jit_train_step(model, tx, cfg, mesh),
            iterator(cfg, mesh))


def activate(cfg):
    return sharding.activate(cfg, sharding.create_mesh(cfg))


def run_steps(cfg, steps, iterator=SyntheticIterator):
    """Trains `steps` steps; returns (final state, per-step losses)."""
    with activate(cfg):
        state, step_fn, data = stepper(cfg, iterator)
        losses = []
        for _ in range(steps):
            state, metrics = step_fn(state, next(data))
            losses.append(float(metrics["loss"]))
    return state, losses
