"""One stage of training: build the state (fresh, from parameters, or resumed), step, log, checkpoint."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jax

from openvision_max import data as data_lib
from openvision_max import models
from openvision_max.config.schema import Config
from openvision_max.evals.runner import EvalRunner
from openvision_max.training import fault_hooks as hooks
from openvision_max.mesh import distributed
from openvision_max.mesh.sharding import activate, create_mesh
from openvision_max.models import flops
from openvision_max.observe.observer import Observer
from openvision_max.training import checkpointing, objectives, optimizer
from openvision_max.training.metrics import MetricsWriter, Progress, say
from openvision_max.training.step import (TrainState, abstract_state, create_state, jit_train_step, shardings_of,
                                         state_from_params)


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the message says why."""


@dataclasses.dataclass
class StageResult:
    params: Any           # the stage's final parameters (None when preempted)
    preempted: bool


class StepTimer:
    """Throughput over the steps between two metric fetches (the first window includes compilation)."""

    def __init__(self, cfg: Config, peak_per_device: float, first_step: int):
        self.cfg = cfg
        self.flops_per_step = flops.flops_per_sample(cfg)["train_total"] * cfg.global_batch_size
        self.peak = peak_per_device
        self.last = (first_step, time.perf_counter())

    def measure(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        last_step, last_time = self.last
        self.last = (step, now)
        dt = (now - last_time) / max(step - last_step, 1)
        per_device = self.flops_per_step / dt / self.cfg.derived.num_devices
        return {"step_time_s": dt, "samples_per_s": self.cfg.global_batch_size / dt,
                "tflops_per_device": per_device / 1e12, "mfu": per_device / self.peak}


def _initial_state(cfg: Config, model, tx, mesh, ckpt: checkpointing.Checkpointer, params: Any,
                   params_path: str, resume, abstract: TrainState) -> tuple[TrainState, dict | None]:
    """(state, data iterator state or None) for the start of this stage: resumed from `resume`, else a fresh
    optimiser around `params` (the previous stage's) or the parameters at `params_path`, else a new init.
    `abstract` is the stage's `abstract_state`."""
    if resume is not None:
        state, meta = ckpt.restore(resume.step, abstract)
        # A checkpoint taken inside a run of bad steps holds the saturated counter, which would freeze every
        # update after the resume; whether to stop was decided (and said) when those steps were logged.
        state = state.replace(nonfinite_in_a_row=state.nonfinite_in_a_row * 0)
        _say_if_schedule_changed(cfg, meta.get("schedule"), int(state.step))
        return state, _own_data_state(meta, resume.step)
    if params is None and params_path:
        params = checkpointing.load_parameters(params_path, abstract.params)
    if params is None:
        return create_state(model, tx, cfg, mesh, jax.random.key(cfg.seed), shardings_of(abstract)), None
    return state_from_params(tx, shardings_of(abstract), params), None


def _own_data_state(meta: dict, step: int) -> dict | None:
    """This process's data iterator state in a checkpoint's meta (each process saved its own)."""
    by_process = meta.get("data_by_process")
    if by_process is None:  # written before states were kept per process: one process's
        if jax.process_count() > 1:
            raise checkpointing.CheckpointError(f"checkpoint {step} holds one data iterator state; this run has "
                                                f"{jax.process_count()} processes")
        return meta["data"]
    if len(by_process) != jax.process_count():
        raise checkpointing.CheckpointError(
            f"checkpoint {step} holds the data iterator states of {len(by_process)} processes, this run has "
            f"{jax.process_count()}: resume with {len(by_process)} (each host resumes its own position)")
    return json.loads(by_process[jax.process_index()])


def schedule_of(cfg: Config) -> dict[str, float]:
    """What fixes the learning-rate schedule of a stage (saved with each checkpoint, compared at resume)."""
    return {"steps": cfg.steps, "warmup_steps": cfg.warmup_steps,
            "peak_learning_rate": cfg.derived.peak_learning_rate}


def _say_if_schedule_changed(cfg: Config, saved: dict | None, step: int) -> None:
    """A resume with other steps / warmup / batch or base_lr moves the schedule under the run: say how."""
    now = schedule_of(cfg)
    if saved is None or saved == now:
        return
    changes = ", ".join(f"{k} {saved[k]:g} -> {now[k]:g}" for k in now if saved.get(k) != now[k])
    before = dataclasses.replace(cfg, steps=int(saved["steps"]), warmup_steps=int(saved["warmup_steps"]),
                                 derived=dataclasses.replace(cfg.derived,
                                                             peak_learning_rate=saved["peak_learning_rate"]))
    lr_then = float(optimizer.learning_rate_schedule(before)(step))
    lr_now = float(optimizer.learning_rate_schedule(cfg)(step))
    say(f"warning: the learning-rate schedule changed at resume ({changes}): at step {step + 1} of stage "
        f"{cfg.derived.stage_name} the learning rate is {lr_now:.4g}, the run as it began would have used "
        f"{lr_then:.4g}")


def run_stage(cfg: Config, ckpt: checkpointing.Checkpointer, guard: checkpointing.PreemptionGuard,
              writer: MetricsWriter, obs: Observer, peak: float, params: Any, params_path: str,
              resume) -> StageResult:
    name = cfg.derived.stage_name
    obs.stage_started(cfg)
    mesh = create_mesh(cfg)
    model, tx = models.build(cfg), optimizer.build(cfg)
    # Data and eval sets are opened before any compilation: a bad path fails in seconds.
    data = data_lib.create_iterator(cfg, mesh)
    evals = EvalRunner(cfg)
    say(f"stage {name}: {cfg.steps} steps of {cfg.global_batch_size} at {cfg.image_size}px, "
        f"mesh {dict(mesh.shape)}; loss = {objectives.get(cfg.objective).describe(cfg)}")
    if cfg.warmup_steps >= cfg.steps:
        say(f"warning: warmup_steps={cfg.warmup_steps} >= steps={cfg.steps} (stage {name}): the learning rate "
            "rises for the whole stage and never decays")
    try:
        with activate(cfg, mesh):
            return _steps(cfg, ckpt, guard, writer, obs, peak, params, params_path, resume, mesh, model, tx,
                          data, evals)
    finally:
        obs.stage_ended()
        data.close()


def _steps(cfg: Config, ckpt, guard, writer, obs: Observer, peak, params, params_path, resume, mesh, model, tx,
           data, evals: EvalRunner) -> StageResult:
    name, offset = cfg.derived.stage_name, cfg.derived.step_offset
    # The init traced once for the stage's shapes and shardings (each trace is a pass over the whole model).
    abstract = abstract_state(model, tx, cfg, mesh)
    state, data_state = _initial_state(cfg, model, tx, mesh, ckpt, params, params_path, resume, abstract)
    step_fn = jit_train_step(model, tx, cfg, mesh, shardings_of(abstract))
    if data_state is not None:
        data.set_state(data_state)
    start = int(state.step)
    data = hooks.log_keys(data, start)  # the iterator itself unless a fault test records the keys read
    data = hooks.hang(data, start)  # likewise unless a fault test makes a step hang
    timer = StepTimer(cfg, peak, start)
    pending = None  # (step, device metrics) of the previous step: fetched one step late
    for step in range(start + 1, cfg.steps + 1):
        obs.before_step(step)
        state, metrics = step_fn(state, next(data))
        obs.after_step(step, metrics)
        if pending is not None:
            _log(cfg, writer, timer, obs, *pending, data.metrics())
        pending = (step, metrics) if step % cfg.log_period == 0 or step in (start + 1, cfg.steps) else None
        preempted = guard.preempted(offset + step)  # the same answer on every process
        if preempted or step == cfg.steps or ckpt.due(offset + step):
            with obs.pause("checkpoint", offset + step):
                # Every process's iterator state, gathered only when saving (a collective, and host work).
                meta = {"stage_index": cfg.derived.stage_index, "stage_name": name, "stage_step": step,
                        "seed": cfg.seed, "schedule": schedule_of(cfg),
                        "data_by_process": distributed.gather(json.dumps(data.get_state()))}
                # Asynchronous: returns once the arrays are copied to host; the loop goes on stepping.
                ckpt.maybe_save(offset + step, state, meta, force=preempted or step == cfg.steps)
        if preempted:
            ckpt.wait()
            say(f"preempted: saved checkpoint at step {offset + step} (stage {name}, step {step}); exiting")
            return StageResult(params=None, preempted=True)
        if evals and (step == cfg.steps or (cfg.eval_period and step % cfg.eval_period == 0)):
            if pending is not None:
                _log(cfg, writer, timer, obs, *pending, data.metrics())
                pending = None
            with obs.pause("eval", offset + step):
                writer.write(offset + step, name, evals.run(state.params, mesh, offset + step))
            timer.last = (step, time.perf_counter())  # eval time is not training throughput
    if pending is not None:
        _log(cfg, writer, timer, obs, *pending, data.metrics())
    return StageResult(params=state.params, preempted=False)


def _log(cfg: Config, writer: MetricsWriter, timer: StepTimer, obs: Observer, step: int, metrics,
         data_metrics: dict[str, float]) -> None:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()} | distributed.sum_over_processes(data_metrics)
    throughput = timer.measure(step)
    progress = Progress(step, cfg.steps, (cfg.steps - step) * throughput["step_time_s"])
    writer.write(cfg.derived.step_offset + step, cfg.derived.stage_name,
                 {**values, **throughput, **obs.log_values(step)}, progress)
    if values["nonfinite_in_a_row"] >= cfg.max_nonfinite_steps:
        raise TrainingStopped(
            f"stopping: {int(values['nonfinite_in_a_row'])} steps in a row had a non-finite loss or gradient "
            f"(max_nonfinite_steps={cfg.max_nonfinite_steps}); their updates were skipped and the last "
            "complete checkpoint holds the last good state")
