"""Observability (README "Observability"): one run of the binary with every key on (profiler, a step made to
hang under the watchdog, cloud-tpu-diagnostics' stack traces, a fresh compilation cache, goodput recording)
checked from all sides, then a run of the same training config alone (the observability keys change no compiled
program) that finds its train step in that cache; the goodput arithmetic
on a timeline whose figures are known; the config errors. (Goodput of a run SIGKILLed and resumed:
tests/training/test_multihost.py.)"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from openvision_max.mesh.host_devices import xla_flags
from openvision_max.training import fault_hooks as hooks
from openvision_max.observe import goodput, timeline

from conftest import CONFIGS, ROOT, TINY, tiny_config

# The tiny model with one unscanned block per tower: half the compile time of TINY's two scanned ones.
PLAIN = [*TINY, "vision.depth=1", "text.depth=1", "scan_layers=false", "dataset_type=synthetic", "evals=[]",
         "steps=6", "log_period=1", "checkpoint_period=1000"]
# Steps 3-5 traced; the 6th batch sleeps 7 s in the data iterator: more than step_timeout_seconds (the watchdog
# looks every 0.5 s) and than three stack-trace intervals. None of these keys changes a compiled program.
# Goodput recording needs the `goodput` extra (not in `test`, see pyproject.toml): checked where it is installed.
RECORDING = importlib.util.find_spec("ml_goodput_measurement") is not None
OBSERVED = [*PLAIN, "profiler=xplane", "skip_first_n_steps_for_profiler=2", "profiler_steps=3",
            "step_timeout_seconds=5", "collect_stack_trace=true", "stack_trace_interval_seconds=2",
            *(["enable_goodput_recording=true"] if RECORDING else [])]
SNAPSHOT = "INFO: Not a crash. cloud-tpu-diagnostics emits a stack trace snapshot every 2 seconds."


def train(out, run_name, cache, args, **env):
    # No Google credentials here, also on a machine that has some: goodput events go to the run directory.
    env = {**os.environ, "XLA_FLAGS": xla_flags(os.environ.get("XLA_FLAGS"), 1),
           "GOOGLE_APPLICATION_CREDENTIALS": str(out / "no-credentials.json"), **env}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), str(CONFIGS / "base.yml"), *args,
                           f"base_output_directory={out}", f"run_name={run_name}", f"compilation_cache_dir={cache}"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_annotations(xplane):
    """(step_num of every `train` StepTraceAnnotation, whether each PjitFunction(train_step) call lies inside
    one) of an .xplane.pb, read with jaxlib's XSpace reader."""
    from jax.profiler import ProfileData
    events = [e for plane in ProfileData.from_file(str(xplane)).planes for line in plane.lines
              for e in line.events]
    steps = [e for e in events if e.name == "train"]
    calls = [e for e in events if e.name == "PjitFunction(train_step)"]
    inside = [any(s.start_ns <= c.start_ns <= s.start_ns + s.duration_ns for s in steps) for c in calls]
    return sorted(int(dict(s.stats)["step_num"]) for s in steps), inside


def test_a_run_with_every_key_on_then_a_run_from_the_cache(tmp_path):
    cache = tmp_path / "jax-cache"
    first = train(tmp_path, "first", cache, OBSERVED, **{hooks.ENV: json.dumps({"hang": [6, 7]})})
    written = [p.name for p in cache.iterdir()]
    second = train(tmp_path, "second", cache, PLAIN)
    run = tmp_path / "first"
    lines = metrics(run)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]  # the hung step finished, and the run

    # Profiler: one trace directory, one XSpace, whose step annotations are steps 3-5 with every train-step
    # call inside one; the metric line of step 5 names the directory.
    (trace_dir,) = (run / "profile" / "plugins" / "profile").iterdir()
    (xplane,) = trace_dir.glob("*.xplane.pb")
    steps, inside = step_annotations(xplane)
    assert steps == [3, 4, 5] and len(inside) >= 3 and all(inside), (steps, inside)
    assert [m.get("profile") for m in lines] == [None] * 4 + [str(trace_dir), None]

    # Watchdog: the dump of step 6 names the sleeping frame; the step then finished.
    dump = (run / "hang-6.txt").read_text()
    assert dump.startswith("watchdog: no train step finished for ") and "step 6 is still running" in dump
    assert "in sleep_in_data_iterator" in dump and "in __next__" in dump
    assert "in sleep_in_data_iterator" in first.stderr.split("watchdog: no train step")[1]
    finished = re.search(r"watchdog: step 6 finished, (\d+) s after the step before it", first.stderr)
    assert finished and int(finished.group(1)) >= 7, first.stderr[-3000:]
    assert [p.name for p in run.glob("hang-*")] == ["hang-6.txt"]

    # cloud-tpu-diagnostics on CPU: snapshots of the main thread on stderr, one of them in the hung step.
    snapshots = first.stderr.split(SNAPSHOT)[1:]
    assert len(snapshots) >= 3 and any("in sleep_in_data_iterator" in s for s in snapshots)

    # Memory: the CPU reports none, said once.
    assert first.stdout.count("memory: not reported by cpu device 0") == 1
    assert not [k for m in lines for k in m if k.startswith("memory/")]

    # Compilation cache: the first run filled it, the second loaded its train step from it.
    compile_s = [metrics(tmp_path / r)[0]["compile_time_s"] for r in ("first", "second")]
    print(f"compile_time_s: first run {compile_s[0]:.2f}, second run {compile_s[1]:.2f}")
    assert [n for n in written if n.startswith("jit_train_step-")], written
    assert f"(not in the persistent compilation cache, written to {cache})" in first.stdout
    assert f"train_step: loaded from the persistent compilation cache ({cache}) in " in second.stdout
    assert [m.get("compile_time_s") is not None for m in metrics(tmp_path / "second")] == [True] + [False] * 5

    # Goodput: the library's events (no Cloud Logging here), and the timeline's figures.
    if RECORDING:
        assert "goodput: Cloud Logging not reachable (DefaultCredentialsError); recording to " in first.stdout
        events = [json.loads(line) for line in (run / "goodput_events.jsonl").read_text().splitlines()]
        assert all(e["job_name"] == "first" for e in events)
        assert [e["step_count"] for e in events if "step_count" in e] == [1, 2, 3, 4, 5, 6]
        assert "job_start_time" in events[0] and "job_end_time" in events[-1]
        assert [e["custom_badput_event_type"] for e in events if "custom_badput_event_type" in e] == \
            ["checkpoint"] * 2
    records = timeline.read(run)
    # The last step's save comes before its (one step late) metric line.
    assert [r["event"] for r in records] == ["start", "stage", *["step"] * 5, "checkpoint", "step", "end"]
    report = goodput.compute(records)
    print(goodput.format_report(str(run), report))
    assert report["interruptions"] == [] and report["lost_s"]["checkpoint"] == records[-3]["seconds"]
    # The hung step is a training step: its 7 s are productive time.
    assert 7 < report["productive_s"] < report["total_s"]


def test_goodput_of_a_timeline_with_a_kill_and_a_restart():
    """A run killed after step 25 with checkpoint 20, restarted from it: every bucket, in seconds."""
    killed = [{"event": "start", "time": 100, "launched": 95, "step": 0}, {"event": "stage", "time": 101,
                                                                         "stage": "main"}]
    killed += [{"event": "step", "time": 109 + k, "step": k} for k in range(1, 26)]
    killed.insert(22, {"event": "checkpoint", "time": 129.5, "step": 20, "seconds": 0.2})  # after step 20's record
    resumed = [{"event": "start", "time": 150, "launched": 140, "step": 20}, {"event": "stage", "time": 151,
                                                                             "stage": "main"}]
    resumed += [{"event": "step", "time": 139 + k, "step": k} for k in range(21, 31)]
    resumed += [{"event": "eval", "time": 169.5, "step": 30, "seconds": 2.0},
                {"event": "end", "time": 172, "step": 30, "reason": "done"}]
    report = goodput.compute(killed + resumed)
    # Typical step 1 s. Killed run: step 1 took 15 s from launch (14 startup), steps 2-20 19 s kept, 21-25
    # (0.8 + 4 s) trained again; 6 s from its last record (134) to the relaunch. Resumed run: 20 s to step 21
    # (19 startup), steps 22-30 9 s, a 2 s eval, 1 s to the end.
    assert report["total_s"] == pytest.approx(77)
    assert report["productive_s"] == pytest.approx(30)
    assert report["lost_s"] == pytest.approx({"startup": 33, "checkpoint": 0.2, "eval": 2, "progress_lost": 4.8,
                                              "restart": 6, "idle": 0, "other": 1})
    assert report["interruptions"] == [{"run": 1, "ended": "killed", "resumed_from": 20, "lost_steps": [21, 25],
                                        "progress_lost_s": pytest.approx(4.8), "restart_s": pytest.approx(6),
                                        "checkpoint_to_restart_s": pytest.approx(10.5)}]
    # A continuation of a finished run (steps raised) loses nothing: the gap is idle.
    done = killed[:22] + [{"event": "end", "time": 130, "step": 20, "reason": "done"}]
    later = goodput.compute(done + resumed)
    assert later["interruptions"] == [] and later["lost_s"]["idle"] == pytest.approx(10)
    assert later["lost_s"]["progress_lost"] == 0


def test_goodput_command_without_a_timeline_is_one_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        goodput.main([str(tmp_path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (f"goodput: {tmp_path} has no timeline.jsonl (not a run directory, "
                                               "or written before runs kept a timeline)")


@pytest.mark.parametrize("args, message", [
    (["profiler=xplane", "profiler_steps=0"], "profiler=xplane traces profiler_steps steps, which must be positive"),
    (["profiler=nsys"], "config key 'profiler' expects one of '', 'xplane', got 'nsys'"),
    (["skip_first_n_steps_for_profiler=-1"], "skip_first_n_steps_for_profiler must be >= 0"),
    (["collect_stack_trace=true", "stack_trace_interval_seconds=0"], "needs a positive stack_trace_interval_seconds"),
    (["step_timeout_seconds=-5"], "step_timeout_seconds must be >= 0 (0 = no watchdog), got -5"),
    (["stages=[{name: a, compilation_cache_dir: /tmp/c}]"], "'compilation_cache_dir' cannot be set per stage"),
])
def test_bad_observability_keys_are_config_errors(args, message):
    from openvision_max.config.schema import ConfigError
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(*args)


def test_a_missing_package_exits_2_with_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    from openvision_max.observe import observer
    from openvision_max.training import main
    monkeypatch.setitem(observer._PACKAGES, "enable_goodput_recording",
                        ("no_such_module", "ml-goodput-measurement", "goodput"))
    with pytest.raises(SystemExit) as exit_:
        main.main([str(CONFIGS / "base.yml"), *TINY, "enable_goodput_recording=true",
                   f"base_output_directory={tmp_path}"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == ('train.py: config error: enable_goodput_recording=true needs the '
                                               'package ml-goodput-measurement, which is not installed '
                                               '(pip install -e ".[goodput]")')
    assert not any(tmp_path.iterdir())
    assert tiny_config().compilation_cache_dir == ""  # off by default: the suite's own cache setting stays
