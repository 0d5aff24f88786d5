"""TPU topology names (`compile_topology=v5p-256`) for ahead-of-time compilation from a CPU host.

A name is either an accelerator type, `v5p-256` (v4 and v5p count TensorCores, two per chip; v5e and v6e
count chips), or an explicit chip grid, `v5p:4x4x8` (3-D for v4/v5p, 2-D for v5e/v6e). `spec(name)` resolves
either to a `TopologySpec` (chips, grid, HBM, and the TPU VM hosts of a slice with their chips per host, which
the GKE launcher turns into pods); `devices(name, num_slices)` asks libtpu for compile-only devices of that shape.
Nothing here imports jax or libtpu until `devices` is called, so config loading stays cheap.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import os
import pathlib
import re

from openvision_max.config.schema import ConfigError

# Accelerator names count TensorCores for v4 and v5p (two per chip) and chips for v5e and v6e.
CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v5litepod": 1, "v6e": 1}
# Chip grid dimensions: v4 and v5p are 3-D tori, v5e and v6e 2-D.
GRID_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}
GIB = 1024 ** 3
# HBM per chip, vendor datasheets. JAX shows one device per chip on all four (v4/v5p as "megacore").
HBM_BYTES = {"v4": 32 * GIB, "v5p": 95 * GIB, "v5e": 16 * GIB, "v6e": 32 * GIB}
# libtpu's default host is 2x2x1 chips; smaller grids need their own host bounds.
_HOST_BOUNDS = (2, 2, 1)
# Chips of one TPU VM host in a multi-host slice (v4/v5p: 2x2x1; v5e/v6e: 2x2). A v5e/v6e slice of up to 8
# chips (1x1, 2x2, 2x4) is one host holding all of them (the 1t/4t/8t machine types).
CHIPS_PER_HOST = {"v4": 4, "v5p": 4, "v5e": 4, "v6e": 4}
SINGLE_HOST_MAX_CHIPS = {"v4": 4, "v5p": 4, "v5e": 8, "v6e": 8}

_NAME = re.compile(r"^(v4|v5p|v5e|v5litepod|v6e)-(\d+)$")
_GRID = re.compile(r"^(v4|v5p|v5e|v5litepod|v6e):(\d+(?:x\d+)+)$")


@dataclasses.dataclass(frozen=True)
class TopologySpec:
    """One slice of a TPU topology."""
    name: str                  # as given: v5p-256 or v5p:4x4x8
    kind: str                  # v4, v5p, v5e or v6e
    grid: tuple[int, ...]      # chips along each torus axis, e.g. (4, 4, 8)
    hbm_bytes: int             # HBM of one chip (= one JAX device)

    @property
    def chips(self) -> int:
        return math.prod(self.grid)

    @property
    def chips_per_host(self) -> int:
        """Chips attached to one TPU VM host (one pod on GKE) of this slice."""
        if self.chips <= SINGLE_HOST_MAX_CHIPS[self.kind]:
            return self.chips
        return CHIPS_PER_HOST[self.kind]

    @property
    def hosts(self) -> int:
        """TPU VM hosts (processes) of one slice; a grid that splits into no whole hosts raises ConfigError."""
        if self.chips % self.chips_per_host:
            raise ConfigError(f"{self.name} ({self.grid_name}): {self.chips} chips are not whole hosts of "
                              f"{self.chips_per_host}")
        return self.chips // self.chips_per_host

    @property
    def grid_name(self) -> str:
        """libtpu's topology name, e.g. `v5p:4x4x8`."""
        return f"{self.kind}:{'x'.join(map(str, self.grid))}"


def _bad_name(name: str) -> ConfigError:
    return ConfigError(
        f"compile_topology={name!r} is not a TPU topology name like v4-8, v5p-256, v5e-16, v6e-256 or v5p:4x4x8")


def _grid_for(kind: str, count: int, name: str) -> tuple[int, ...]:
    """The usual slice shape for `count` chips: powers of two grow the smallest axis (2x2x1, 2x2x2, 2x2x4,
    ..., 4x8x8; 2x2, 2x4, ..., 16x16); other 3-D counts take the most cube-like grid of multiples of 4."""
    dims = GRID_DIMS[kind]
    if count & (count - 1) == 0:
        grid = [1] * dims
        while math.prod(grid) < count:
            grid[grid.index(min(grid))] *= 2
        return tuple(sorted(grid)) if dims == 2 or count >= 8 else tuple(grid)
    if dims == 3 and count % 64 == 0:
        n = count // 64  # 4a x 4b x 4c with a <= b <= c, a * b * c = n
        shapes = [(a, b, n // (a * b)) for a in range(1, n + 1) for b in range(a, n + 1)
                  if n % (a * b) == 0 and n // (a * b) >= b]
        return tuple(4 * d for d in min(shapes, key=lambda s: (s[2], -s[0])))
    raise ConfigError(f"compile_topology={name!r}: no standard {kind} slice of {count} chips; give the grid "
                      f"explicitly, e.g. {kind}:{'x'.join(['4'] * dims)}")


def spec(name: str) -> TopologySpec:
    """`v5p-256` -> TopologySpec(kind v5p, grid (4, 4, 8)); `v5e:4x8` -> grid (4, 8)."""
    if m := _GRID.match(name):
        kind = "v5e" if m.group(1) == "v5litepod" else m.group(1)
        grid = tuple(int(d) for d in m.group(2).split("x"))
        if len(grid) != GRID_DIMS[kind] or min(grid) < 1:
            raise ConfigError(f"compile_topology={name!r}: a {kind} grid has {GRID_DIMS[kind]} positive axes")
        return TopologySpec(name, kind, grid, HBM_BYTES[kind])
    m = _NAME.match(name)
    if not m:
        raise _bad_name(name)
    kind, count = m.group(1), int(m.group(2))
    per_chip = CORES_PER_CHIP[kind]
    if count % per_chip or count < per_chip:
        raise ConfigError(f"compile_topology={name!r}: {kind} names count {per_chip} cores per chip")
    kind = "v5e" if kind == "v5litepod" else kind
    count //= per_chip
    if GRID_DIMS[kind] == 3 and count < 4:
        raise ConfigError(f"compile_topology={name!r}: the smallest {kind} slice is {kind}-8 (4 chips)")
    return TopologySpec(name, kind, _grid_for(kind, count, name), HBM_BYTES[kind])


def chips(name: str) -> tuple[str, int]:
    """`v5p-256` -> ("v5p", 128 chips)."""
    s = spec(name)
    return s.kind, s.chips


def device_count(name: str, num_slices: int) -> int:
    if num_slices < 1:
        raise ConfigError(f"compile_topology_num_slices must be at least 1, got {num_slices}")
    return chips(name)[1] * num_slices


def host_may_have_tpu() -> bool:
    """True if this host shows a Google PCI device (TPU chips are vendor 0x1ae0) or a TPU device file.
    Deliberately loose: a false True (e.g. a gVNIC NIC) only leaves libtpu's warnings on."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if pathlib.Path(vendor).read_text().strip() == "0x1ae0":
                return True
        except OSError:
            continue
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def libtpu_env_for_cpu_host() -> None:
    """Defaults that let libtpu serve compile-only topologies quietly on a host without TPU chips.

    - libtpu asks the GCE metadata server for the accelerator type and worker hostnames, fails, and logs six
      lines of errors to stderr (whenever JAX initialises its backends, too); one local worker with
      one-chip host bounds avoids the query.
    - libtpu takes /tmp/libtpu_lockfile, so a second process (a subprocess, a pytest-xdist worker) fails
      with "Internal error when accessing libtpu multi-process lockfile"; nothing here owns a chip to guard.
    Call before JAX initialises. Only sets unset variables, and nothing on a host that may have TPUs: there
    the real values matter (TPU_HOST_BOUNDS=1,1,1 would break a multi-host slice).
    """
    if host_may_have_tpu():
        return
    os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def devices(name: str, num_slices: int = 1) -> list:
    """Compile-only TPU devices (one per chip) of `num_slices` slices of topology `name`, from libtpu.

    Multi-slice devices carry `slice_index`, which `mesh_utils.create_hybrid_device_mesh` reads.
    """
    s = spec(name)
    if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
        raise ConfigError(f"compile_topology={name!r} needs libtpu, which is not installed (see pyproject.toml)")
    libtpu_env_for_cpu_host()
    from jax.experimental import topologies  # loads libtpu's PJRT plugin (compile only; touches no chip)

    kwargs: dict = {"num_slices": num_slices} if num_slices > 1 else {}
    if s.kind in ("v4", "v5p"):
        kwargs["chip_config_name"] = "megacore"  # one device per chip, as JAX shows these chips
    padded = (*s.grid, 1)[:3]
    if any(g % h for g, h in zip(padded, _HOST_BOUNDS)):
        kwargs["chips_per_host_bounds"] = padded  # e.g. v5e:1x1: smaller than one default host
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=s.grid_name, **kwargs)
    except RuntimeError as e:  # JaxRuntimeError (a bad grid) and "JAX TPU support not installed"
        raise ConfigError(f"compile_topology={name!r} ({s.grid_name}): {str(e).splitlines()[0]}") from None
    return list(desc.devices)
