"""JAX's persistent compilation cache (`compilation_cache_dir`), and what the first train step's compile cost.

"" leaves JAX's own settings as they are: the JAX_COMPILATION_CACHE_DIR family of environment variables (the
test suite keeps its cache that way), else no cache. A path, local or gs://, turns the cache on for the process,
for programs of any compile time and size (JAX's defaults skip programs compiled in under a second). It must be
set before the process compiles anything: `configure` runs first thing in the binary.

`CompileWatch` reads JAX's monitoring events while the first step runs: tracing, lowering and the XLA compile (or
the cache read that replaces it) of the train step, and whether the cache answered.
"""

from __future__ import annotations

import jax
from jax import monitoring

from openvision_max.config.schema import Config

_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_BACKEND = "/jax/core/compile/backend_compile_duration"  # an XLA compile, or its persistent-cache read
_USES_CACHE = "/jax/compilation_cache/compile_requests_use_cache"
_HIT = "/jax/compilation_cache/cache_hits"
_MISS = "/jax/compilation_cache/cache_misses"  # compiled, and written to the cache


def configure(cfg: Config) -> None:
    if not cfg.compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", cfg.compilation_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


class CompileWatch:
    """The compile of the jitted function named `name` (e.g. train_step) while the watch is active."""

    _active: CompileWatch | None = None
    _listening = False

    def __init__(self, name: str):
        self.name = name
        self.trace_s = self.lower_s = self.backend_s = 0.0
        self.cache = "off"  # off, hit, miss (compiled, written), skipped (compiled, not written)
        self._pending = "off"

    def __enter__(self) -> CompileWatch:
        if not CompileWatch._listening:  # JAX has no way to unregister; one listener pair per process
            monitoring.register_event_listener(CompileWatch._on_event)
            monitoring.register_event_duration_secs_listener(CompileWatch._on_duration)
            CompileWatch._listening = True
        CompileWatch._active = self
        return self

    def __exit__(self, *exc) -> None:
        CompileWatch._active = None

    @property
    def seconds(self) -> float:
        return self.trace_s + self.lower_s + self.backend_s

    @staticmethod
    def _on_event(event: str, **kwargs) -> None:
        watch = CompileWatch._active
        if watch is not None and event in (_USES_CACHE, _HIT, _MISS):
            # Each comes inside the backend compile it belongs to, just before its duration event.
            watch._pending = {_USES_CACHE: "skipped", _HIT: "hit", _MISS: "miss"}[event]

    @staticmethod
    def _on_duration(event: str, duration: float, fun_name: str = "", **kwargs) -> None:
        watch = CompileWatch._active
        if watch is None:
            return
        ours = fun_name in (watch.name, f"jit({watch.name})")
        if event == _BACKEND:
            if ours:
                watch.backend_s += duration
                watch.cache = watch._pending
            watch._pending = "off"
        elif ours and event == _TRACE:
            watch.trace_s += duration
        elif ours and event == _LOWER:
            watch.lower_s += duration

    def describe(self) -> str:
        """One log line: how long, and whether the persistent cache answered."""
        where = jax.config.jax_compilation_cache_dir
        front = f"{self.trace_s + self.lower_s:.1f} s tracing and lowering"
        state = self.cache if where else "off"  # JAX asks its cache even when it has no directory
        if state == "hit":
            return (f"{self.name}: loaded from the persistent compilation cache ({where}) in {self.backend_s:.1f} s "
                    f"+ {front}: compile_time_s={self.seconds:.2f}")
        cache = {"miss": f"not in the persistent compilation cache, written to {where}",
                 "skipped": f"not in the persistent compilation cache ({where}), not written (below JAX's "
                            "minimum compile time or size)",
                 "off": "no persistent compilation cache: compilation_cache_dir is not set"}[state]
        return f"{self.name}: compiled in {self.backend_s:.1f} s + {front} ({cache}): compile_time_s={self.seconds:.2f}"
