"""TPU topology names (`compile_topology=v5p-256`) for ahead-of-time compilation from a CPU host."""

from __future__ import annotations

import re

from openvision_max.schema import ConfigError

# Accelerator names count TensorCores for v4 and v5p (two per chip) and chips for v5e and v6e.
CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v5litepod": 1, "v6e": 1}
_NAME = re.compile(r"^(v4|v5p|v5e|v5litepod|v6e)-(\d+)$")


def chips(name: str) -> tuple[str, int]:
    """`v5p-256` -> ("v5p", 128 chips)."""
    m = _NAME.match(name)
    if not m:
        raise ConfigError(
            f"compile_topology={name!r} is not a TPU topology name like v4-8, v5p-256, v5e-16 or v6e-256")
    kind, count = m.group(1), int(m.group(2))
    per_chip = CORES_PER_CHIP[kind]
    if count % per_chip or count < per_chip:
        raise ConfigError(f"compile_topology={name!r}: {kind} names count {per_chip} cores per chip")
    return ("v5e" if kind == "v5litepod" else kind), count // per_chip


def device_count(name: str, num_slices: int) -> int:
    if num_slices < 1:
        raise ConfigError(f"compile_topology_num_slices must be at least 1, got {num_slices}")
    return chips(name)[1] * num_slices
