"""How many CPU devices a JAX process shows: XLA's host-platform device count, set through XLA_FLAGS.

The launchers and the fault harness start `train.py` processes with a device count of their choosing; the
rest of the caller's XLA_FLAGS travel with it.
"""

from __future__ import annotations

import re
from typing import Optional

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def xla_flags(existing: Optional[str], devices: int) -> str:
    """`existing` XLA_FLAGS with the host device count set to `devices` (any earlier count removed)."""
    kept = [f for f in (existing or "").split() if not re.fullmatch(rf"{DEVICE_COUNT_FLAG}(=.*)?", f)]
    return " ".join([*kept, f"{DEVICE_COUNT_FLAG}={devices}"])
