"""`profiler: xplane`: a jax.profiler trace of chosen train steps, for XProf or TensorBoard's profile plugin.

The steps after the first `skip_first_n_steps_for_profiler` of a stage (as this process runs it: a resumed stage
counts from where it resumed) are traced, `profiler_steps` of them, each inside a `StepTraceAnnotation("train",
step_num=<global step>)`, which XProf's step views group by. The trace starts before the first traced step's
batch is drawn and stops once the last traced step has finished on the device (the one wait this adds, at that
step only); other steps run exactly as without a profiler. JAX writes
`<run>/profile/plugins/profile/<time>/<host>.xplane.pb` (processes other than 0, with `profile_all_hosts`,
under `<run>/profile/process-<i>/`).
"""

from __future__ import annotations

import jax
from etils import epath

from openvision_max.config.schema import Config

PROFILE = "profile"


def profile_root(run_dir: epath.Path) -> epath.Path:
    """The directory this process traces into: `<run>/profile`, or `<run>/profile/process-<i>` for i > 0."""
    root = run_dir / PROFILE
    return root if jax.process_index() == 0 else root / f"process-{jax.process_index()}"


class Profiler:
    """Traces stage steps `first..last` (1-based stage step numbers, fixed at the stage's first step)."""

    def __init__(self, cfg: Config, run_dir: epath.Path):
        self.cfg = cfg
        self.enabled = cfg.profiler == "xplane" and (cfg.profile_all_hosts or jax.process_index() == 0)
        self.root = profile_root(run_dir)
        self.first = self.last = None
        self.tracing = False
        self._annotation = None
        self._before: set[str] = set()

    def _traces(self) -> set[str]:
        runs = self.root / "plugins" / "profile"
        return {p.name for p in runs.iterdir()} if runs.exists() else set()

    def before_step(self, step: int) -> None:
        if not self.enabled:
            return
        if self.first is None:  # the stage's first step in this process
            self.first = step + self.cfg.skip_first_n_steps_for_profiler
            self.last = min(self.first + self.cfg.profiler_steps - 1, self.cfg.steps)
        if step == self.first:
            self._before = self._traces()
            jax.profiler.start_trace(str(self.root))
            self.tracing = True
        if self.tracing:
            self._annotation = jax.profiler.StepTraceAnnotation(
                "train", step_num=self.cfg.derived.step_offset + step)
            self._annotation.__enter__()

    def after_step(self, step: int, outputs) -> str | None:
        """Ends the step's annotation; after the last traced step, waits for `outputs` (that step's results),
        stops the trace and returns the directory it went to."""
        self._end_annotation()
        if not self.tracing or step != self.last:
            return None
        jax.block_until_ready(outputs)
        return self._stop()

    def close(self) -> str | None:
        """Stops a trace the stage left running (it ended early: preempted, stopped, failed); its directory."""
        self._end_annotation()
        return self._stop() if self.tracing else None

    def _end_annotation(self) -> None:
        if self._annotation is not None:
            self._annotation.__exit__(None, None, None)
            self._annotation = None

    def _stop(self) -> str:
        jax.profiler.stop_trace()
        self.tracing = self.enabled = False  # one trace per stage
        new = sorted(self._traces() - self._before)
        return str(self.root / "plugins" / "profile" / new[-1]) if new else str(self.root)
