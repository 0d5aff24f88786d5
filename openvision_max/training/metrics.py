"""Metric lines: one printed line and one JSON object in `<run_dir>/metrics.jsonl` per log period.

With several processes, process 0 is the one writer: it prints, writes metrics.jsonl and TensorBoard; the
others compute the same figures (the metrics are global) and keep quiet. On gs:// the lines are buffered
and appended every `GCS_FLUSH_SECONDS` (GCS takes about one update per second per object) and at close.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any, Optional

from openvision_max.config.paths import is_remote
from openvision_max.observe import timeline
from openvision_max.training import gcs

# Printed in this order when present; everything else follows alphabetically.
GCS_FLUSH_SECONDS = 10.0
_ORDER = ("loss", "contrastive_loss", "caption_loss", "learning_rate", "temperature", "grad_norm",
          "step_time_s", "samples_per_s", "tflops_per_device", "mfu")


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where a logged step is in its stage, for the printed line (not a metric: not in metrics.jsonl)."""
    stage_step: int
    stage_steps: int
    eta_s: float  # the stage's remaining steps at the measured step time

    def __str__(self) -> str:
        eta = round(self.eta_s)
        clock = f"{eta // 3600}h{eta % 3600 // 60:02d}m" if eta >= 3600 else f"{eta // 60}m{eta % 60:02d}s"
        return f"{self.stage_step}/{self.stage_steps}, eta {clock}"


def is_writer() -> bool:
    """Whether this process writes the run's files and prints its lines (process 0)."""
    import jax
    return jax.process_index() == 0


def say(message: str) -> None:
    """Prints a line of the run's log, once for the whole job (from process 0)."""
    if is_writer():
        print(message, flush=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def _tensorboardx_writer():
    """tensorboardX's SummaryWriter, imported here (only the trainer needs it) and without torch.

    tensorboardX imports torch whenever it is installed (the `export` extra installs it), only to recognise
    torch tensors, which the trainer never passes: 3-4 s of every start. A `None` entry in sys.modules makes
    that import fail as if torch were absent; it is removed again at once, so a later `import torch` works."""
    import sys
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Appends to metrics.jsonl, prints a line, and writes TensorBoard scalars under <run_dir>/tensorboard."""

    def __init__(self, run_dir: pathlib.Path):
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.last_evals: dict[str, float] = {}  # the latest value of every eval/<name>/<metric>
        self.enabled = is_writer()
        self.tensorboard = None
        self._pending: dict[str, list[str]] = {}  # gs:// lines not yet appended, per file of the run directory
        self._flushed = time.monotonic()
        if self.enabled:
            SummaryWriter = _tensorboardx_writer()
            if is_remote(run_dir):
                gcs.use_compose_for_tensorboard()
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), flush_secs=30)

    def close(self) -> None:
        self._flush()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def _flush(self) -> None:
        for name, lines in self._pending.items():
            if lines:
                gcs.append(str(self.run_dir / name), "".join(lines).encode())
                lines.clear()
        self._flushed = time.monotonic()

    def append_line(self, name: str, line: str) -> None:
        """Appends `line` to the run directory's file `name` (metrics.jsonl, timeline.jsonl, ...)."""
        path = self.run_dir / name
        if not is_remote(path):
            with path.open("a") as f:
                f.write(line)
            return
        self._pending.setdefault(name, []).append(line)
        if time.monotonic() - self._flushed >= GCS_FLUSH_SECONDS:
            self._flush()

    def event(self, kind: str, at: Optional[float] = None, **fields: Any) -> None:
        """One record of the run's timeline (`observe/timeline.py`), at `at` (Unix seconds; default: now)."""
        if self.enabled:
            record = {"event": kind, "time": round(time.time() if at is None else at, 3), **fields}
            self.append_line(timeline.TIMELINE, json.dumps(record) + "\n")

    def write(self, step: int, stage: str, values: dict[str, Any], progress: Optional[Progress] = None) -> None:
        record = {"step": step, "stage": stage, **{k: (float(v) if not isinstance(v, str) else v)
                                                    for k, v in values.items()}}
        self.last_evals.update({k: v for k, v in record.items() if k.startswith("eval/")})
        if not self.enabled:
            return
        self.append_line(self.path.name, json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step" and not isinstance(v, str):
                self.tensorboard.add_scalar(k, v, step)
        keys = [k for k in _ORDER if k in values] + sorted(k for k in values if k not in _ORDER)
        where = f"{stage} {progress}" if progress else stage
        print(f"step {step} [{where}] " + " ".join(f"{k}={_fmt(record[k])}" for k in keys), flush=True)
