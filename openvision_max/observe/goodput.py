"""Goodput from a run's own records: productive training time against the time lost, over every run of one run
directory, restarts included. `python -m openvision_max.goodput RUN_DIR [--json]` prints it; nothing here needs
JAX or the network, so it works on a copy of a run directory anywhere.

The source is `<run>/timeline.jsonl` (see `timeline.py`: starts with the checkpoint they resumed, logged steps,
checkpoint saves, evals, ends). The buckets are ml-goodput-measurement's, which a GKE user reads from Cloud
Logging when `enable_goodput_recording` is on:

    productive     steps kept in the final progress, at their measured step time (PRODUCTIVE)
    startup        each start and stage until its first logged step, less that step's work: imports,
                   jax.distributed, state init or restore, compilation (TPU_INITIALIZATION, TRAINING_PREP,
                   PROGRAM_STARTUP)
    checkpoint     the blocking part of checkpoint saves (UNPRODUCTIVE_CHECKPOINT_SAVE_TIME)
    eval           evals between steps (a custom badput event there)
    progress_lost  steps after the last checkpoint of an interrupted run, trained again after the restart
                   (WASTED_PROGRESS_FROM_DISRUPTION)
    restart        from an interrupted run's last record to the next start (INFRASTRUCTURE_RECOVERY_FROM_DISRUPTION)
    idle           from a run that ended normally to a later continuation of it (`steps` raised, say)
    other          the rest: the end of each run (final checkpoint writes), logging (OTHER)

The timeline is written at logged steps, so a window of `log_period` steps is split between kept and lost steps
pro rata, and startup leaves the first window's steps their typical (median) step time.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import json
import math
import statistics
import sys
from typing import Any

from etils import epath

from openvision_max.observe import goodput_recorder, timeline

BUCKETS = ("startup", "checkpoint", "eval", "progress_lost", "restart", "idle", "other")
_EXPLAINED = {
    "productive": "training steps kept in the final progress",
    "startup": "each start and stage until its first step: init, restore, compile",
    "checkpoint": "blocking part of the checkpoint saves",
    "eval": "evals between steps",
    "progress_lost": "steps after the last checkpoint of an interrupted run, trained again",
    "restart": "from an interrupted run's last record to the next start",
    "idle": "from a run that ended to a later continuation of it",
    "other": "the rest: the end of each run (final checkpoint writes), logging",
}


@dataclasses.dataclass
class _Window:
    """Logged steps `first..last` of a stage, and the wall seconds they took (pauses taken out)."""
    stage: str
    first: int
    last: int
    seconds: float
    opens: bool  # the stage's (or start's) first window: its seconds include the startup


def _attempts(records: list[dict]) -> list[list[dict]]:
    """The records split at each `start` (one list per process start of the run)."""
    attempts: list[list[dict]] = []
    for r in records:
        if r.get("event") == "start":
            attempts.append([r])
        elif attempts:
            attempts[-1].append(r)
    return attempts


def _windows(attempt: list[dict], buckets: dict[str, float]) -> tuple[list[_Window], float]:
    """The step windows of one attempt, and the time of its last record; pauses and tails go to `buckets`."""
    start = attempt[0]
    windows: list[_Window] = []
    stage, done = "", int(start.get("step", 0))
    mark, anchor, paused = float(start.get("launched", start["time"])), None, 0.0
    last_time = float(start["time"])
    for r in attempt[1:]:
        kind, now = r.get("event"), float(r["time"])
        if kind == "stage":
            if anchor is not None:  # after a stage: its last eval and save, then this record; a new startup
                buckets["other"] += max(0.0, now - anchor - paused)
                mark, anchor, paused = now, None, 0.0
            stage = r.get("stage", "")
        elif kind == "step":
            step = int(r["step"])
            if step > done:
                begun = mark if anchor is None else anchor
                windows.append(_Window(stage, done + 1, step, max(0.0, now - begun - paused), anchor is None))
                done = step
            anchor, paused = now, 0.0
        elif kind in ("checkpoint", "eval"):
            seconds = float(r.get("seconds", 0.0))
            buckets[kind] += seconds
            paused += seconds
            now += seconds
        elif kind == "end":
            buckets["other"] += max(0.0, now - (mark if anchor is None else anchor) - paused)
        last_time = max(last_time, now)
    return windows, last_time


def compute(records: list[dict]) -> dict[str, Any]:
    """Productive and lost seconds of the timeline `records` (all runs of one run directory); see the module
    docstring for the buckets. Raises ValueError when there is no start record."""
    attempts = _attempts(records)
    if not attempts:
        raise ValueError("the timeline has no start record")
    buckets = collections.defaultdict(float)
    per_attempt = [_windows(a, buckets) for a in attempts]
    # A stage's typical step time: the median over its steady windows, across every attempt.
    per_step = collections.defaultdict(list)
    for windows, _ in per_attempt:
        for w in windows:
            if not w.opens:
                per_step[w.stage].append(w.seconds / (w.last - w.first + 1))
    typical = {stage: statistics.median(v) for stage, v in per_step.items()}

    productive = 0.0
    interruptions = []
    for i, (attempt, (windows, last_time)) in enumerate(zip(attempts, per_attempt)):
        # Steps up to the checkpoint the next attempt resumed from were kept; the ones after were trained again.
        kept_up_to = int(attempts[i + 1][0].get("step", 0)) if i + 1 < len(attempts) else math.inf
        lost, lost_steps = 0.0, []
        for w in windows:
            n = w.last - w.first + 1
            work = min(w.seconds, n * typical.get(w.stage, 0.0)) if w.opens else w.seconds
            buckets["startup"] += w.seconds - work
            n_lost = max(0, w.last - max(w.first - 1, kept_up_to))
            productive += work * (n - n_lost) / n
            lost += work * n_lost / n
            if n_lost:
                lost_steps.append((w.last - n_lost + 1, w.last))
        buckets["progress_lost"] += lost
        if i + 1 == len(attempts):
            continue
        ends = [r for r in attempt if r.get("event") == "end"]
        ended = ends[-1].get("reason", "done") if ends else "killed"
        nxt = attempts[i + 1][0]
        gap = max(0.0, float(nxt.get("launched", nxt["time"])) - last_time)
        buckets["idle" if ended == "done" else "restart"] += gap
        if ended != "done":
            saves = [float(r["time"]) for r in attempt
                     if r.get("event") == "checkpoint" and r.get("step") == kept_up_to]
            interruptions.append({
                "run": i + 1, "ended": ended, "resumed_from": kept_up_to,
                "lost_steps": [lost_steps[0][0], lost_steps[-1][1]] if lost_steps else None,
                "progress_lost_s": lost, "restart_s": gap,
                # From the start of the save the next run resumed to its launch: the whole interruption.
                "checkpoint_to_restart_s": float(nxt.get("launched", nxt["time"])) - saves[-1] if saves else None})
    first = attempts[0][0]
    total = max(t for _, t in per_attempt) - float(first.get("launched", first["time"]))
    buckets["other"] += max(0.0, total - productive - sum(buckets.values()))
    last_steps = [w.last for windows, _ in per_attempt for w in windows]
    return {"runs": len(attempts), "interruptions": interruptions, "last_step": max(last_steps, default=0),
            "total_s": total, "productive_s": productive, "goodput": productive / total if total > 0 else 0.0,
            "lost_s": {k: buckets[k] for k in BUCKETS}}


def format_report(run_dir: str, report: dict[str, Any]) -> str:
    total = report["total_s"]
    runs = report["runs"]
    lines = [f"goodput of {run_dir}: {runs} run{'s' if runs > 1 else ''} of the directory "
             f"({len(report['interruptions'])} interrupted), {report['last_step']} steps",
             f"  {'total':<14}{total:>10.1f} s"]
    for name, seconds in [("productive", report["productive_s"]), *report["lost_s"].items()]:
        share = f"{100 * seconds / total:5.1f} %" if total > 0 else "      "
        lines.append(f"  {name.replace('_', ' '):<14}{seconds:>10.1f} s {share}  {_EXPLAINED[name]}")
    for item in report["interruptions"]:
        again = (f"steps {item['lost_steps'][0]}-{item['lost_steps'][1]} trained again "
                 f"({item['progress_lost_s']:.1f} s)" if item["lost_steps"] else "no step trained again")
        since = item["checkpoint_to_restart_s"]
        since = f"; {since:.1f} s from that save to the restart" if since is not None else ""
        lines.append(f"interruption: run {item['run']} {item['ended']}, the next resumed from checkpoint "
                     f"{item['resumed_from']}: {again}, restart {item['restart_s']:.1f} s{since}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m openvision_max.goodput", description=(
        "Productive and lost time of a run directory (every run of it, restarts included), from its "
        "timeline.jsonl; no network needed."))
    parser.add_argument("run_dir", help="a run directory (local or gs://)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    # With enable_goodput_recording off Google Cloud, the library's own figures of the same run follow.
    args = parser.parse_args(argv)
    try:
        report = compute(timeline.read(args.run_dir))
    except FileNotFoundError:
        print(f"goodput: {args.run_dir} has no {timeline.TIMELINE} (not a run directory, or written before "
              "runs kept a timeline)", file=sys.stderr)
        sys.exit(2)
    except ValueError as e:
        print(f"goodput: {args.run_dir}/{timeline.TIMELINE}: {e}", file=sys.stderr)
        sys.exit(2)
    library = _library_figures(args.run_dir)
    if args.json:
        print(json.dumps({**report, "ml_goodput_measurement": library}))
        return
    print(format_report(args.run_dir, report))
    if library:
        badput = ", ".join(f"{k} {v:.1f} %" for k, v in library["badput_percent"].items() if v >= 0.05)
        print(f"ml-goodput-measurement, from {goodput_recorder.EVENTS} (what Cloud Logging would hold): goodput "
              f"{library['goodput_percent']:.1f} %; badput {badput or 'none'}")


def _library_figures(run_dir: str) -> dict[str, Any] | None:
    """The library's own figures when the run recorded its goodput events locally (enable_goodput_recording
    without Cloud Logging) and the library is installed; else None."""
    events = epath.Path(run_dir) / goodput_recorder.EVENTS
    if not events.exists() or importlib.util.find_spec("ml_goodput_measurement") is None:
        return None
    first = json.loads(events.read_text().splitlines()[0])
    return goodput_recorder.library_figures(run_dir, first["job_name"])
