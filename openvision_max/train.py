"""The training loop: `python train.py CONFIG [key=value ...]` (see the root train.py)."""

from __future__ import annotations

import pathlib
import sys
import time

import jax
import yaml

from openvision_max import flops, models, mfu, optimizer
from openvision_max.config import cli_config, config_to_dict
from openvision_max.data.synthetic import SyntheticIterator
from openvision_max.metrics import MetricsWriter
from openvision_max.schema import Config
from openvision_max.sharding import activate, create_mesh
from openvision_max.train_step import create_state, jit_train_step


def run_directory(cfg: Config) -> pathlib.Path:
    run_dir = pathlib.Path(cfg.base_output_directory) / cfg.derived.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return run_dir


class StepTimer:
    """Throughput over the steps between two metric fetches (the first window includes compilation)."""

    def __init__(self, cfg: Config, peak_per_device: float):
        self.cfg = cfg
        self.flops_per_step = flops.flops_per_sample(cfg)["train_total"] * cfg.global_batch_size
        self.peak = peak_per_device
        self.last = (0, time.perf_counter())

    def measure(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        last_step, last_time = self.last
        self.last = (step, now)
        dt = (now - last_time) / max(step - last_step, 1)
        per_device = self.flops_per_step / dt / self.cfg.derived.num_devices
        return {"step_time_s": dt, "samples_per_s": self.cfg.global_batch_size / dt,
                "tflops_per_device": per_device / 1e12, "mfu": per_device / self.peak}


def train(cfg: Config) -> pathlib.Path:
    run_dir = run_directory(cfg)
    print(f"run directory: {run_dir}", flush=True)
    mesh = create_mesh(cfg)
    model, tx = models.build(cfg), optimizer.build(cfg)
    peak, peak_source = mfu.peak_flops_per_device(cfg.dtype)
    print(f"mesh {dict(mesh.shape)}; peak {peak / 1e12:.3g} TFLOP/s per device from {peak_source}", flush=True)
    writer = MetricsWriter(run_dir)
    with activate(cfg, mesh):
        state = create_state(model, tx, cfg, mesh, jax.random.key(cfg.seed))
        step_fn = jit_train_step(model, tx, cfg, mesh)
        data = SyntheticIterator(cfg, mesh)
        timer = StepTimer(cfg, peak)
        pending = None  # (step, device metrics) of the previous step, fetched one step late
        for step in range(int(state.step), cfg.steps):
            state, metrics = step_fn(state, next(data))
            if pending is not None:
                _log(writer, timer, *pending)
            pending = (step + 1, metrics) if _should_log(cfg, step + 1) else None
        if pending is not None:
            _log(writer, timer, *pending)
    return run_dir


def _should_log(cfg: Config, step: int) -> bool:
    return step % cfg.log_period == 0 or step == cfg.steps or step == 1


def _log(writer: MetricsWriter, timer: StepTimer, step: int, metrics) -> None:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    writer.write(step, "main", {**values, **timer.measure(step)})


def main(argv: list[str]) -> None:
    cfg = cli_config(argv, "train.py")
    train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
