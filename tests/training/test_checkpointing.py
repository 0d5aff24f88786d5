"""Checkpoints: bit-exact sharded round trips, retention, complete-only resume, parameter loading, async saves."""

import asyncio
import os
import shutil
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openvision_max import models
from openvision_max.mesh import sharding
from openvision_max.training import optimizer
from openvision_max.training import step as train_step
from openvision_max.training.checkpointing import (
    Checkpointer,
    CheckpointError,
    PreemptionGuard,
    abstract_like,
    load_parameters,
)

from conftest import tiny_config

MESH_2x2x2 = ["ici_data_parallelism=2", "ici_fsdp_parallelism=2", "ici_tensor_parallelism=2"]
META = {"rng": {"seed": 0, "key_data": [0, 4294967295]}, "stage": "main", "stage_index": 1, "data": {"step": 6}}


def _real_state(cfg, devices, seed=0):
    """A real TrainState of the tiny model on `devices`, every leaf refilled with random values (a fresh
    optimiser state is all zeros, which a broken round trip could also produce)."""
    mesh = sharding.create_mesh(cfg, devices)
    state = train_step.create_state(models.build(cfg), optimizer.build(cfg), cfg, mesh, jax.random.key(0))
    return _refilled(state, seed)


def _refilled(tree, seed):
    rng = np.random.default_rng(seed)

    def fill(x):
        values = (rng.standard_normal(x.shape) * 3 if jnp.issubdtype(x.dtype, jnp.floating)
                  else rng.integers(-1000, 1000, x.shape))
        return jax.device_put(np.asarray(values).astype(x.dtype), x.sharding)
    return jax.tree.map(fill, tree)


@pytest.fixture(scope="module")
def state():
    return _real_state(tiny_config(), jax.devices()[:1])


def assert_restored(restored, abstract, values):
    """Same structure; every leaf a jax.Array with the abstract dtype and sharding and exactly the same bits."""
    assert jax.tree.structure(restored) == jax.tree.structure(abstract)
    flat = jax.tree_util.tree_flatten_with_path(restored)[0]
    for (path, got), want, value in zip(flat, jax.tree.leaves(abstract), jax.tree.leaves(values)):
        name = jax.tree_util.keystr(path)
        assert isinstance(got, jax.Array), name
        assert (got.shape, got.dtype) == (want.shape, want.dtype), name
        assert got.sharding == want.sharding, name
        assert np.asarray(got).tobytes() == np.asarray(value).tobytes(), name


def _save(directory, step, state, **kwargs):
    with Checkpointer(directory, max_to_keep=kwargs.pop("max_to_keep", 3), period=1) as ckpt:
        assert ckpt.maybe_save(step, state, META, **kwargs)


def test_round_trip_is_bit_exact_on_one_device(state, tmp_path):
    _save(tmp_path / "checkpoints", 6, state)
    with Checkpointer(tmp_path / "checkpoints", max_to_keep=3, period=1) as ckpt:  # a restarted run
        assert ckpt.latest_step() == 6
        assert ckpt.restore_meta(6) == META  # what stage a run resumes in, before any array is read
        restored, meta = ckpt.restore(6, abstract_like(state))
    assert type(restored) is type(state)
    assert_restored(restored, abstract_like(state), jax.device_get(state))
    assert meta == META


def test_round_trip_on_a_2x2x2_mesh_and_parameters_onto_another_mesh(state, tmp_path):
    cfg = tiny_config(*MESH_2x2x2, num_devices=8)
    state8 = _real_state(cfg, jax.devices(), seed=1)
    fc1 = state8.params["vision"]["transformer"]["blocks"]["mlp"]["fc1"]["kernel"]
    assert fc1.addressable_shards[0].data.size * 4 == fc1.size  # really split over fsdp x tensor
    _save(tmp_path / "checkpoints", 3, state8)
    with Checkpointer(tmp_path / "checkpoints", max_to_keep=3, period=1) as ckpt:
        restored, meta = ckpt.restore(3, abstract_like(state8))
    assert_restored(restored, abstract_like(state8), jax.device_get(state8))
    assert meta == META
    # The same parameters, resharded onto the single-device layout of another run.
    params = load_parameters(tmp_path, abstract_like(state.params))
    assert_restored(params, abstract_like(state.params), jax.device_get(state8.params))


def test_saves_every_period_and_keeps_the_newest(state, tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2, period=2) as ckpt:
        assert [ckpt.maybe_save(step, state, {"step": step}) for step in range(1, 8)] == [
            False, True, False, True, False, True, False]
        assert ckpt.maybe_save(7, state, {"step": 7}, force=True)  # e.g. the end of a stage
        assert not ckpt.maybe_save(7, state, {"step": 7}, force=True)  # already saved
        with pytest.raises(TypeError):
            ckpt.maybe_save(8, state, {"key": jax.random.key(0)})  # meta must be JSON-able
    assert sorted(os.listdir(tmp_path)) == ["6", "7"]
    with Checkpointer(tmp_path, max_to_keep=2, period=2) as ckpt:
        assert ckpt.latest_step() == 7
        assert ckpt.restore(6, abstract_like(state))[1] == {"step": 6}


def test_a_save_killed_mid_write_is_ignored(state, tmp_path):
    _save(tmp_path / "checkpoints", 2, state)
    # What a process killed while writing step 4 leaves behind: the files under Orbax's temporary name.
    shutil.copytree(tmp_path / "checkpoints" / "2", tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp")
    with pytest.raises(CheckpointError, match="4.orbax-checkpoint-tmp"):
        load_parameters(tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp", abstract_like(state.params))
    assert_restored(load_parameters(tmp_path, abstract_like(state.params)), abstract_like(state.params),
                    jax.device_get(state.params))
    with Checkpointer(tmp_path / "checkpoints", max_to_keep=3, period=1) as ckpt:
        assert ckpt.latest_step() == 2
        assert ckpt.maybe_save(4, state, META)  # the restarted run writes step 4 again
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]


def test_load_parameters_from_a_run_its_checkpoints_or_one_step(state, tmp_path):
    newer = _refilled(state, seed=2)
    _save(tmp_path / "checkpoints", 2, state)
    _save(tmp_path / "checkpoints", 4, newer)
    abstract = abstract_like(state.params)
    for path, expected in [(tmp_path, newer), (tmp_path / "checkpoints", newer),
                           (tmp_path / "checkpoints" / "2", state), (str(tmp_path / "checkpoints" / "4"), newer)]:
        assert_restored(load_parameters(path, abstract), abstract, jax.device_get(expected.params))


def test_clear_errors(state, tmp_path):
    with pytest.raises(CheckpointError, match=f"no complete checkpoint at {tmp_path} "):
        load_parameters(tmp_path, abstract_like(state.params))
    (tmp_path / "other" / "checkpoints" / "5" / "x").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="5 is not a checkpoint of this trainer"):
        load_parameters(tmp_path / "other", abstract_like(state.params))
    _save(tmp_path / "checkpoints", 2, state)
    abstract = abstract_like(state.params)
    cls = abstract["vision"]["cls"]
    abstract["vision"]["cls"] = jax.ShapeDtypeStruct((1, 1, 64), cls.dtype, sharding=cls.sharding)
    del abstract["text"]["head"]
    with pytest.raises(CheckpointError) as error:
        load_parameters(tmp_path, abstract)
    message = str(error.value)
    assert str(tmp_path / "checkpoints" / "2") in message
    assert "vision/cls is (1, 1, 32), the model has (1, 1, 64)" in message
    assert "text/head/kernel not in the model" in message
    # Resuming with a changed model: the same check on the whole state.
    wrong = abstract_like(state).replace(params=abstract)
    with Checkpointer(tmp_path / "checkpoints", max_to_keep=3, period=1) as ckpt:
        with pytest.raises(CheckpointError, match="params/vision/cls is"):
            ckpt.restore(2, wrong)
        with pytest.raises(CheckpointError, match="no complete checkpoint"):
            ckpt.restore(3, abstract_like(state))


@pytest.fixture
def held_commit(monkeypatch):
    """Holds back every checkpoint's last act, the rename to its final name, until the test sets the event."""
    from orbax.checkpoint._src.path import atomicity
    release, finalize = threading.Event(), atomicity.AtomicRenameTemporaryPath.finalize

    async def held(self, *args, **kwargs):
        await asyncio.to_thread(release.wait, 30)  # a synchronous save would sit out the 30 s, then fail below
        return await finalize(self, *args, **kwargs)
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", held)
    yield release
    release.set()


def test_maybe_save_returns_before_the_write_is_complete(state, tmp_path, held_commit):
    values, abstract = jax.device_get(state), abstract_like(state)
    mine = jax.tree.map(lambda x: x.copy(), state)  # the fixture's arrays stay alive for the other tests
    ckpt = Checkpointer(tmp_path / "checkpoints", max_to_keep=3, period=5)
    try:
        assert ckpt.maybe_save(5, mine, META)
        # Returned while the checkpoint is unfinished: not under its final name, invisible to a reader.
        assert os.listdir(tmp_path / "checkpoints") == ["5.orbax-checkpoint-tmp"]
        with pytest.raises(CheckpointError):
            load_parameters(tmp_path, abstract.params)
        # The loop goes on: the next step is donated the state's buffers and overwrites them.
        mine = jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t), donate_argnums=0)(mine)
        jax.block_until_ready(mine)
        held_commit.set()
        ckpt.wait()
        assert os.listdir(tmp_path / "checkpoints") == ["5"]
        restored, _ = ckpt.restore(5, abstract)
    finally:
        held_commit.set()
        ckpt.close()
    assert_restored(restored, abstract, values)  # the values as of the save, not the donated ones


def test_preemption_guard_turns_sigterm_into_a_flag():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.preempted(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.preempted(2)
    assert signal.getsignal(signal.SIGTERM) is before


def test_asyncio_repeats_of_orbax_write_errors_are_dropped_and_no_other():
    """A failed save's sibling write tasks and gathers come back from asyncio as "Task exception was never
    retrieved" / "_GatheringFuture exception was never retrieved" with a traceback each (the records here are
    asyncio's own); the checkpointing module drops those for Orbax's frames only."""
    import gc
    import logging

    from openvision_max.training import checkpointing

    def write_in(filename):
        namespace = {}
        exec(compile("def write():\n    raise OSError(28, 'No space left on device')\n", filename, "exec"), namespace)
        return namespace["write"]

    log = logging.getLogger("asyncio")
    ours = [f for f in log.filters if isinstance(f, checkpointing._OrbaxUnretrievedErrors)]
    assert ours

    def unretrieved(write):
        """What asyncio logs for a failed task and a failed gather that nobody awaited, with no filter on."""
        records = []
        keep = logging.Handler()
        keep.emit = records.append
        for f in ours:
            log.removeFilter(f)
        log.addHandler(keep)
        try:
            async def fail():
                write()

            async def main():
                task, gathered = asyncio.ensure_future(fail()), asyncio.gather(fail())
                for _ in range(3):
                    await asyncio.sleep(0)
                assert task.done() and gathered.done()

            loop = asyncio.new_event_loop()
            loop.run_until_complete(main())
            loop.close()
            gc.collect()
        finally:
            log.removeHandler(keep)
            for f in ours:
                log.addFilter(f)
        return records

    orbax = unretrieved(write_in(os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "serialization.py")))
    assert sorted(r.getMessage().split()[0] for r in orbax) == ["Task", "_GatheringFuture"]
    assert not any(log.filter(r) for r in orbax)
    own = unretrieved(write_in(os.path.join(os.sep, "site-packages", "mine", "writer.py")))
    assert len(own) == 2 and all(log.filter(r) for r in own)
    other = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "Exception in callback write()", None,
                              orbax[0].exc_info)
    assert log.filter(other)
