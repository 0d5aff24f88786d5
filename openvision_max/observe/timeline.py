"""The run's timeline: `<run>/timeline.jsonl`, one JSON object per thing that happened, with its wall time.

Process 0 appends it (through the MetricsWriter, so gs:// run directories buffer it like metrics.jsonl), on every
run of the same run directory: it is what `python -m openvision_max.goodput` reads. Records (`time`: Unix seconds):

    {"event": "start", "time", "launched", "step", "processes"}  a process started the run; `launched`: when the
                                                                 binary started, `step`: the checkpoint resumed (0)
    {"event": "stage", "time", "stage"}                          a stage begins (its setup and compile follow)
    {"event": "step", "time", "step"}                            a logged step finished (global step numbers)
    {"event": "checkpoint" | "eval", "time", "step", "seconds"}  the blocking part of a save, an eval; time = start
    {"event": "end", "time", "step", "reason"}                   done, preempted or error; absent after a SIGKILL
"""

from __future__ import annotations

import json
import os
import time

from etils import epath

TIMELINE = "timeline.jsonl"


def read(run_dir: str | os.PathLike) -> list[dict]:
    """The records of `<run_dir>/timeline.jsonl` in the order written; a torn last line (a kill mid-write) is
    dropped."""
    path = epath.Path(run_dir) / TIMELINE
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def process_start_time() -> float:
    """When this process started (Unix seconds), from Linux's /proc; elsewhere, now."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks since boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()
