"""Device memory in the metric lines (`memory_metrics`), and jax-smi's live memory profile (`jax_smi`)."""

from __future__ import annotations

from typing import Callable

import jax
from etils import epath

from openvision_max.config.paths import is_remote

# The allocator's figures, as TPU and GPU backends report them in `Device.memory_stats()`.
STATS = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")


class DeviceMemory:
    """`memory/<stat>` of this process's first device, read when a metric line is written (a host call: no
    sync with the device). A backend without figures (CPU) is said once, and then nothing is added."""

    def __init__(self, say: Callable[[str], None]):
        self.device = jax.local_devices()[0]
        self.say = say
        self.reported = True

    def values(self) -> dict[str, float]:
        if not self.reported:
            return {}
        stats = self.device.memory_stats() or {}
        values = {f"memory/{k}": float(stats[k]) for k in STATS if k in stats}
        if not values:
            self.reported = False
            self.say(f"memory: not reported by {self.device.platform} device {self.device.id} "
                     "(no memory/* metrics)")
        return values


def start_jax_smi(run_dir: epath.Path, say: Callable[[str], None]) -> None:
    """jax-smi's tracking thread: the device memory profile rewritten every second, for `jax-smi` to show
    live. It writes with plain file calls, so a gs:// run directory keeps it in /dev/shm (jax-smi's default)."""
    import jax_smi

    where = "/dev/shm" if is_remote(run_dir) else str(run_dir)
    jax_smi.initialise_tracking(dir_prefix=where)
    say(f"jax_smi: device memory profile in {where}/memory.prof, every second (watch: jax-smi --dir_prefix {where})")
