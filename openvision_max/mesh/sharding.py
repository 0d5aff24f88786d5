"""The device mesh (data, fsdp, tensor) and the mapping of logical axis names onto it.

Layers name logical axes only; `cfg.logical_axis_rules` maps them to mesh axes here. State is created
already sharded: abstract shapes -> logical specs -> mesh shardings -> a jitted init with out_shardings.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from openvision_max.config.schema import MESH_AXES, Config

BATCH_AXES = ("data", "fsdp")


def axis_rules(cfg: Config) -> tuple[tuple[str, Any], ...]:
    """`logical_axis_rules` in the form flax expects (mesh-axis lists become tuples)."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in cfg.logical_axis_rules)


def create_mesh(cfg: Config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh; hybrid ICI x DCN when the config spans several slices."""
    # The config was resolved for jax.device_count() devices unless a caller (a test) chose fewer.
    devices = list(devices if devices is not None else jax.devices()[:cfg.derived.num_devices])
    ici, dcn = cfg.derived.ici_mesh_shape, cfg.derived.dcn_mesh_shape
    if len(devices) != cfg.derived.num_devices:
        raise ValueError(f"the config was resolved for {cfg.derived.num_devices} devices, got {len(devices)}")
    if np.prod(dcn) > 1:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    elif devices[0].platform == "tpu":
        grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    else:
        grid = np.asarray(devices).reshape(ici)
    return Mesh(grid, MESH_AXES)


@contextlib.contextmanager
def activate(cfg: Config, mesh: Mesh):
    """Context for tracing model code: the mesh and the logical axis rules."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules(cfg)):
        yield


def logical_to_shardings(cfg: Config, mesh: Mesh, logical_specs: Any) -> Any:
    """A tree of logical PartitionSpecs -> a tree of NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, axis_rules(cfg))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data and fsdp; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def init_sharded(cfg: Config, mesh: Mesh, init_fn: Callable[[jax.Array], Any], rng: jax.Array,
                 shardings: Any = None) -> Any:
    """Runs `init_fn(rng)` (returning a tree of `nn.Partitioned` boxes) straight into its sharded layout:
    `shardings` (the unboxed tree's), else those its logical axis names give (one more trace of `init_fn`).

    Returns the unboxed tree; nothing is ever materialised replicated on one device.
    """
    with activate(cfg, mesh):
        if shardings is None:
            abstract = jax.eval_shape(init_fn, rng)
            shardings = logical_to_shardings(cfg, mesh, nn.get_partition_spec(abstract))
        return jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(rng)
