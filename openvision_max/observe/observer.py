"""The one object the binary and the stage loop report to; it drives the profiler, the memory figures, the
watchdog, the stack traces, the compile report, the timeline and the goodput recorder.

    obs = Observer(cfg, run_dir, writer, say)       # main: once per process
    obs.job_started(launched); obs.run_started(resume_step)
    obs.stage_started(stage_cfg)                     # loop: per stage
    obs.before_step(step); ...; obs.after_step(step, metrics)
    values |= obs.log_values(step)                   # on logged steps (already one step late)
    with obs.pause("checkpoint" | "eval", step): ...
    obs.stage_ended(); obs.job_ended(reason)

A step that is not traced costs a few attribute tests and, with the watchdog, a monotonic time stamp; no host
sync (the goodput recorder, when on, adds its own record per step, as the library wants).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.util
import time
from typing import Any, Callable, Iterator

import jax
from etils import epath

from openvision_max.config.schema import Config, ConfigError
from openvision_max.observe.compile_cache import CompileWatch
from openvision_max.observe.memory import DeviceMemory, start_jax_smi
from openvision_max.observe.profiler import Profiler
from openvision_max.observe.watchdog import Watchdog

# Keys -> (module, pip distribution, extra that installs it).
_PACKAGES = {
    "enable_goodput_recording": ("ml_goodput_measurement", "ml-goodput-measurement", "goodput"),
    "collect_stack_trace": ("cloud_tpu_diagnostics", "cloud-tpu-diagnostics", None),
    "jax_smi": ("jax_smi", "jax-smi", None),
}


def check_packages(cfg: Config) -> None:
    """Raises ConfigError when a key is on whose package is not installed (before any work starts)."""
    for key, (module, dist, extra) in _PACKAGES.items():
        if getattr(cfg, key) and importlib.util.find_spec(module) is None:
            how = f'pip install -e ".[{extra}]"' if extra else f"pip install {dist}"
            raise ConfigError(f"{key}=true needs the package {dist}, which is not installed ({how})")


@dataclasses.dataclass
class _Stage:
    cfg: Config
    profiler: Profiler
    watchdog: Watchdog | None
    first: int | None = None            # the stage's first step in this process
    compile_watch: CompileWatch | None = None
    compiled: CompileWatch | None = None  # the first step's compile, until the first metric line takes it
    profile: tuple[int, str] | None = None  # (last traced step, directory) until that step's metric line
    step: int = 0                        # the last step dispatched


class Observer:
    def __init__(self, cfg: Config, run_dir: epath.Path, writer, say: Callable[[str], None]):
        self.cfg = cfg
        self.run_dir = run_dir
        self.writer = writer  # the MetricsWriter: timeline events and the goodput fallback file
        self.say = say
        self.stage: _Stage | None = None
        self.launched = 0.0
        self.last_step = 0  # the last logged global step (the checkpoint resumed, before any)
        self.memory: DeviceMemory | None = None
        self.goodput = None
        self.stack_traces = None
        self._prepared = False

    # --- the job ---------------------------------------------------------------------------------------
    def job_started(self, launched: float) -> None:
        """The process is about to train the run; `launched`: when the process started (Unix seconds)."""
        cfg = self.cfg
        self.launched = launched
        if cfg.jax_smi and self.writer.enabled:
            start_jax_smi(self.run_dir, self.say)
        if cfg.collect_stack_trace:
            from openvision_max.observe.stack_traces import StackTraces
            self.stack_traces = StackTraces(cfg)
            where = "/tmp/debugging/" if cfg.stack_trace_to_cloud else "stderr"
            self.say(f"collect_stack_trace: cloud-tpu-diagnostics stack traces every "
                     f"{cfg.stack_trace_interval_seconds} s to {where}")
        if cfg.enable_goodput_recording and self.writer.enabled:  # process 0 records for the job, as MaxText
            from openvision_max.observe.goodput_recorder import make_recorder
            self.goodput = make_recorder(cfg.run_name, self.writer.append_line, self.run_dir, self.say)
            utc = datetime.timezone.utc
            self.goodput.record_job_start_time(datetime.datetime.fromtimestamp(launched, utc))
            self.goodput.record_training_preparation_start_time(datetime.datetime.fromtimestamp(launched, utc))

    def run_started(self, resume_step: int) -> None:
        """Training starts from checkpoint `resume_step` (0: from the start); again if that checkpoint turned out
        unreadable and an older one is used."""
        self.last_step = resume_step
        self.writer.event("start", launched=round(self.launched, 3), step=resume_step,
                          processes=jax.process_count())

    def job_ended(self, reason: str) -> None:
        """`reason`: done, preempted or error."""
        self.writer.event("end", step=self.last_step, reason=reason)
        if self.goodput is not None:
            self.goodput.record_job_end_time()
            self.goodput.flush()
        if self.stack_traces is not None:
            self.stack_traces.close()

    # --- a stage ---------------------------------------------------------------------------------------
    def stage_started(self, cfg: Config) -> None:
        self.writer.event("stage", stage=cfg.derived.stage_name)
        watchdog = (Watchdog(cfg.step_timeout_seconds, self.run_dir, cfg.derived.step_offset)
                    if cfg.step_timeout_seconds > 0 else None)
        self.stage = _Stage(cfg, Profiler(cfg, self.run_dir), watchdog)
        if cfg.memory_metrics and self.memory is None:
            self.memory = DeviceMemory(self.say)  # one per job: a backend without figures is said once

    def stage_ended(self) -> None:
        st, self.stage = self.stage, None
        if st is None:
            return
        if st.compile_watch is not None:
            st.compile_watch.__exit__(None, None, None)
        path = st.profiler.close()
        if path:
            self.say(f"profiler: the stage ended before its last traced step; trace in {path}")
        elif st.profiler.enabled and st.profiler.first is not None:  # asked for, never started
            self.say(f"profiler: nothing traced in stage {st.cfg.derived.stage_name}: it ended at step {st.step}, "
                     f"before step {st.profiler.first} (skip_first_n_steps_for_profiler="
                     f"{st.cfg.skip_first_n_steps_for_profiler})")
        if st.watchdog is not None:
            st.watchdog.close()

    def before_step(self, step: int) -> None:
        st = self.stage
        st.step = step
        if st.first is None:
            st.first = step
            st.compile_watch = CompileWatch("train_step").__enter__()
            if self.goodput is not None and not self._prepared:
                self.goodput.record_training_preparation_end_time()
                self._prepared = True
        st.profiler.before_step(step)
        if self.goodput is not None:
            self.goodput.record_step_start_time(st.cfg.derived.step_offset + step)

    def after_step(self, step: int, outputs: Any) -> None:
        """Step `step` was dispatched and `outputs` are its (possibly not yet computed) results."""
        st = self.stage
        trace = st.profiler.after_step(step, outputs)
        if trace:
            st.profile = (step, trace)
        if st.compile_watch is not None:
            st.compile_watch.__exit__(None, None, None)
            st.compiled, st.compile_watch = st.compile_watch, None
            self.say(st.compiled.describe())
        if st.watchdog is not None:
            st.watchdog.beat(step)

    def log_values(self, step: int) -> dict[str, Any]:
        """What the metric line of `step` adds: device memory, the compile time (first line), a trace written."""
        st = self.stage
        values: dict[str, Any] = self.memory.values() if st.cfg.memory_metrics else {}
        if st.compiled is not None:
            values["compile_time_s"] = st.compiled.seconds
            st.compiled = None
        if st.profile is not None and step >= st.profile[0]:  # the line of the trace's last step
            values["profile"] = st.profile[1]
            st.profile = None
        self.last_step = st.cfg.derived.step_offset + step
        self.writer.event("step", step=self.last_step)
        return values

    @contextlib.contextmanager
    def pause(self, kind: str, step: int) -> Iterator[None]:
        """Not a train step (kind: checkpoint or eval, after global step `step`): the watchdog looks away, the
        time goes to the timeline (and to the goodput recorder, as a custom badput event)."""
        st = self.stage
        if st is not None and st.watchdog is not None:
            st.watchdog.pause()
        if self.goodput is not None:
            if kind == "checkpoint":
                self.goodput.record_checkpoint_progress(step, datetime.datetime.now(datetime.timezone.utc))
            self.goodput.record_custom_badput_event_start_time(custom_badput_event_type=kind)
        began, clock = time.time(), time.perf_counter()
        try:
            yield
        finally:
            self.writer.event(kind, at=began, step=step, seconds=round(time.perf_counter() - clock, 3))
            if self.goodput is not None:
                self.goodput.record_custom_badput_event_end_time(custom_badput_event_type=kind)
            if st is not None and st.watchdog is not None:
                st.watchdog.beat(st.step)
