"""`enable_goodput_recording`: the job's goodput events through ml-goodput-measurement (the `goodput` extra).

Process 0 records, as MaxText does: the job's start and end, every step's start (the library finds a restart
where a step number comes again), checkpoint progress, and the blocking part of checkpoint saves and evals as
custom badput events. The events go to Cloud Logging (log `goodput_<run_name>`, job `<run_name>`), where the
library's GoodputCalculator reads them (and its GoodputMonitor, which feeds Cloud Monitoring). Where Cloud
Logging cannot be reached (no credentials: off Google Cloud), they go to `<run>/goodput_events.jsonl` instead,
one entry per line as the library wrote it, and `library_figures` computes the library's own figures from it.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from typing import Any, Callable

from etils import epath

EVENTS = "goodput_events.jsonl"
PACKAGE = "ml-goodput-measurement"


def logger_name(run_name: str) -> str:
    return f"goodput_{run_name}"


class LocalLogger:
    """Stands in for the library's Cloud Logging writer (and reader): entries as JSON lines of one file."""

    def __init__(self, append: Callable[[str], None], path: epath.Path | None = None):
        self.append = append
        self.path = path

    def write_cloud_logging_entry(self, entry: dict[str, Any] | None) -> None:
        if entry is not None:
            self.append(json.dumps(entry) + "\n")

    def flush(self) -> None:
        pass

    def read_cloud_logging_entries(self, start_time=None, end_time=None, last_entry_info=None):
        entries = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        return entries, (datetime.datetime.now(datetime.timezone.utc), str(len(entries)))


def make_recorder(run_name: str, append_line: Callable[[str, str], None], run_dir: epath.Path,
                  say: Callable[[str], None]):
    """The library's GoodputRecorder for this run (call it on process 0 only): writing to Cloud Logging when
    the credentials are there, else through `append_line` to `<run>/goodput_events.jsonl`."""
    from ml_goodput_measurement import goodput

    try:
        recorder = goodput.GoodputRecorder(job_name=run_name, logger_name=logger_name(run_name), logging_enabled=True)
        say(f"goodput: recording to Cloud Logging, log {logger_name(run_name)}, job {run_name}")
    except Exception as e:  # noqa: BLE001 - google.auth raises several kinds when there are no credentials
        local = LocalLogger(lambda line: append_line(EVENTS, line))
        recorder = goodput.GoodputRecorder(job_name=run_name, logger_name=logger_name(run_name),
                                           logging_enabled=True, cloud_logger=local)
        say(f"goodput: Cloud Logging not reachable ({type(e).__name__}); recording to {run_dir / EVENTS}")
    return recorder


def library_figures(run_dir: str | os.PathLike, run_name: str) -> dict[str, Any]:
    """ml-goodput-measurement's own goodput (%) and badput breakdown (% of the job's time) of the events in
    `<run>/goodput_events.jsonl`: what its GoodputCalculator reports from Cloud Logging for the same events."""
    from ml_goodput_measurement import goodput

    local = LocalLogger(lambda line: None, epath.Path(run_dir) / EVENTS)
    with tempfile.TemporaryDirectory() as cache:  # the calculator keeps a cache file of what it read
        calculator = goodput.GoodputCalculator(job_name=run_name, logger_name=logger_name(run_name),
                                               cloud_logger=local, cache_dir=cache)
        percent, badput, last_step = calculator.get_job_goodput(include_badput_breakdown=True)
    flat = {}
    for kind, value in badput.items():
        name = getattr(kind, "name", str(kind))
        if isinstance(value, dict):
            flat.update({f"{name}/{k}": v for k, v in value.items()})
        else:
            flat[name] = value
    return {"goodput_percent": percent, "badput_percent": flat, "last_productive_step": last_step}
