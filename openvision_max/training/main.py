"""`python train.py CONFIG [key=value ...]`: run every stage of a config, resuming where a run left off.

Run directory `<base_output_directory>/<run_name>/`: config.yml (resolved), checkpoints/, metrics.jsonl,
tensorboard/, timeline.jsonl (observe/timeline.py), and what the observability keys add (README
"Observability"). Restarting with the same run_name resumes from the latest complete checkpoint, inside the
right stage. Each stage starts from the previous stage's parameters with a fresh optimiser.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import jax
import yaml
from etils import epath

from openvision_max import models
from openvision_max.config import ConfigError, cli_config, config_to_dict
from openvision_max.config.loading import default_run_name, read_run_keys
from openvision_max.config.schema import Config
from openvision_max.data.locate import DataError, resolve
from openvision_max.evals.runner import EvalRunner
from openvision_max.mesh import distributed, peak_flops
from openvision_max.mesh.sharding import activate, create_mesh
from openvision_max.observe import compile_cache, timeline
from openvision_max.observe.observer import Observer, check_packages
from openvision_max.training import checkpointing, optimizer
from openvision_max.training.loop import StageResult, TrainingStopped, run_stage
from openvision_max.training.metrics import MetricsWriter, is_writer, say
from openvision_max.training.step import abstract_state


def run_directory(stages: list[Config]) -> epath.Path:
    """`<base_output_directory>/<run_name>`, a local path or gs://; process 0 writes the resolved config.yml."""
    cfg = stages[0]
    # The config made local paths absolute (orbax refuses relative ones; the printed path works from anywhere).
    run_dir = epath.Path(cfg.base_output_directory) / cfg.run_name
    if is_writer():
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = config_to_dict(cfg) if len(stages) == 1 else {
            "stages_resolved": [config_to_dict(c) for c in stages]}
        (run_dir / "config.yml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    return run_dir


@dataclasses.dataclass
class Resume:
    """Where the latest complete checkpoint left the run."""
    step: int
    stage_index: int
    stage_step: int


def find_resume(ckpt: checkpointing.Checkpointer) -> Resume | None:
    """The newest complete checkpoint whose meta reads back (unreadable ones are set aside, newest first);
    None for a new run. A run whose every checkpoint was set aside is refused rather than started over."""
    while (step := ckpt.latest_step()) is not None:
        try:
            meta = ckpt.restore_meta(step)
        except checkpointing.UnusableCheckpoint as e:
            set_aside(ckpt, e)
            continue
        return Resume(step=step, stage_index=int(meta["stage_index"]), stage_step=int(meta["stage_step"]))
    unusable = ckpt.set_aside_steps()
    if unusable:
        raise checkpointing.CheckpointError(
            f"no usable checkpoint in {ckpt.directory}: {', '.join(unusable)} could not be read back; not "
            "starting the run over on top of them (move that directory away, or pick another run_name, to start "
            "a new run)")
    return None


def set_aside(ckpt: checkpointing.Checkpointer, e: checkpointing.UnusableCheckpoint) -> None:
    moved = ckpt.set_aside(e.step, e.details)
    say(f"warning: {e}; set aside as {moved}, falling back to the previous complete checkpoint")


def preflight(stages: list[Config]) -> None:
    """Open every stage's training shards and eval sets now: a bad path costs seconds, not a stage."""
    for cfg in stages:
        if cfg.load_parameters_path and not epath.Path(cfg.load_parameters_path).exists():
            raise checkpointing.CheckpointError(f"load_parameters_path: {cfg.load_parameters_path} does not exist")
        if cfg.dataset_type == "grain" and not cfg.eval_only:
            resolve(cfg.train_data, cfg.data_cache_dir)
        EvalRunner(cfg)


def evaluate_only(cfg: Config) -> epath.Path:
    """`eval_only=true`: the configured evals on `load_parameters_path`, written to the run's metrics."""
    if not cfg.load_parameters_path:
        raise checkpointing.CheckpointError("eval_only=true needs load_parameters_path (a run directory or a "
                                            "checkpoint)")
    preflight([cfg])
    runner = EvalRunner(cfg)
    run_dir = run_directory([cfg])
    say(f"run directory: {run_dir}")
    mesh = create_mesh(cfg)
    with activate(cfg, mesh):
        abstract = abstract_state(models.build(cfg), optimizer.build(cfg), cfg, mesh)
        params = checkpointing.load_parameters(cfg.load_parameters_path, abstract.params)
        writer = MetricsWriter(run_dir)
        try:
            writer.write(0, "eval_only", runner.run(params, mesh, 0))
            print_summary(run_dir, writer.last_evals)
        finally:
            writer.close()
    return run_dir


def train(stages: list[Config]) -> epath.Path:
    first = stages[0]
    preflight(stages)
    run_dir = run_directory(stages)
    say(f"run directory: {run_dir}")
    peak, peak_source = peak_flops.peak_flops_per_device(first.dtype)
    say(f"peak {peak / 1e12:.3g} TFLOP/s per device ({peak_source}); {jax.device_count()} devices in "
        f"{jax.process_count()} process(es)")
    writer = MetricsWriter(run_dir)
    ckpt = checkpointing.Checkpointer(run_dir / "checkpoints", max_to_keep=first.max_checkpoints_to_keep,
                                      period=first.checkpoint_period)
    guard = checkpointing.PreemptionGuard()
    obs = Observer(first, run_dir, writer, say)
    obs.job_started(timeline.process_start_time())
    ended, last_step = "error", stages[-1].derived.step_offset + stages[-1].steps  # for the timeline's end
    try:
        while True:
            try:
                run_stages(stages, run_dir, ckpt, guard, writer, obs, peak, find_resume(ckpt))
                ended = "done" if obs.last_step >= last_step else "preempted"
                return run_dir
            except checkpointing.UnusableCheckpoint as e:  # found only when its arrays were read
                set_aside(ckpt, e)
    finally:
        try:
            ckpt.close()
            guard.close()
        finally:
            obs.job_ended(ended)
            writer.close()


def run_stages(stages: list[Config], run_dir: epath.Path, ckpt: checkpointing.Checkpointer,
               guard: checkpointing.PreemptionGuard, writer: MetricsWriter, obs: Observer, peak: float,
               resume: Resume | None) -> epath.Path:
    """Every stage of the run from `resume` (None: from the start)."""
    if resume:
        say(f"resuming from checkpoint step {resume.step} (stage {resume.stage_index}, "
            f"step {resume.stage_step} of it)")
    obs.run_started(resume.step if resume else 0)
    params: Any = None  # the previous stage's parameters
    for cfg in stages:
        stage_resume = resume if resume and resume.stage_index == cfg.derived.stage_index else None
        if resume and (cfg.derived.stage_index < resume.stage_index
                       or (stage_resume and stage_resume.stage_step >= cfg.steps)):
            say(f"stage {cfg.derived.stage_name}: already complete")
            continue
        # A stage starts from the previous stage's parameters: in memory, or in the checkpoint that
        # finished it when the run restarted in between; the first stage from load_parameters_path.
        params_path = cfg.load_parameters_path
        if params is None and resume and resume.stage_index < cfg.derived.stage_index:
            params_path = str(ckpt.directory / str(resume.step))
        result: StageResult = run_stage(cfg, ckpt, guard, writer, obs, peak, params, params_path, stage_resume)
        if result.preempted:
            return run_dir
        params = result.params
    print_summary(run_dir, writer.last_evals)
    return run_dir


def print_summary(run_dir: epath.Path, evals: dict[str, float]) -> None:
    """The last line a user reads: where the run is and its latest eval figures (top-1 and R@1 first)."""
    say(f"run directory: {run_dir}")
    headline = [k for k in evals if k.endswith(("/top1", "_r1"))]
    for key in headline + sorted(k for k in evals if k not in headline and not k.endswith(("/seconds",
                                                                                          "/examples"))):
        say(f"{key}: {evals[key]:.4f}")


def start_processes(argv: list[str]) -> list[str]:
    """Joins the other processes of the job, if any, before the config is resolved against the devices;
    returns `argv` with the run name every process agrees on (process 0's) when none was given."""
    try:
        keys = read_run_keys(argv)
    except ConfigError:
        return argv  # cli_config reports it, the same way for one process and for many
    if keys.compile_topology:
        return argv  # AOT compilation runs in one process
    try:
        distributed.initialize(keys)
    except distributed.DistributedError as e:
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(2)
    if not keys.run_name and jax.process_count() > 1:
        argv = [*argv, f"run_name={distributed.agree(default_run_name())}"]
    return argv


def main(argv: list[str]) -> None:
    if argv and argv[0] not in ("-h", "--help"):
        argv = start_processes(argv)
    stages = cli_config(argv, "train.py")
    try:
        check_packages(stages[0])
    except ConfigError as e:
        print(f"train.py: config error: {e}", file=sys.stderr)
        sys.exit(2)
    compile_cache.configure(stages[0])  # before anything compiles
    if stages[0].compile_topology:
        from openvision_max.training import aot  # needs libtpu
        if len(stages) > 1:
            say(f"compiling stage {stages[0].derived.stage_name}, the first of {len(stages)} (stage=NAME picks "
                f"another: {', '.join(c.derived.stage_name for c in stages)})")
        aot.main(stages[0])
        return
    try:
        if stages[0].eval_only:
            evaluate_only(stages[0])
        else:
            train(stages)
    except DataError as e:  # a data path matching nothing, an unreadable shard: bad input, exit 2
        print(f"train.py: data error: {e}", file=sys.stderr)
        sys.exit(2)
    except checkpointing.CheckpointError as e:  # e.g. a wrong load_parameters_path: bad input, exit 2
        print(f"train.py: checkpoint error: {e}", file=sys.stderr)
        sys.exit(2)
    except (TrainingStopped, checkpointing.SaveFailed) as e:  # the run cannot go on; its checkpoints can
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        distributed.trace_a_slow_exit()


if __name__ == "__main__":
    main(sys.argv[1:])
