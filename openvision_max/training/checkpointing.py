"""Asynchronous, sharded checkpoints of the train state (Orbax on TensorStore), and preemption handling.

Layout: `<run>/checkpoints/<step>/` holds `state/` (the train state pytree; every host writes the shards it owns
into one OCDBT TensorStore) and `meta/` (a small JSON dict: RNG, stage, data iterator state). A step directory
gets its final name only once every host has finished writing (Orbax writes `<step>.orbax-checkpoint-tmp` and
renames it; on GCS a `commit_success.txt` marks it), so a save killed mid-write is never taken for a checkpoint.

Saves are asynchronous: `maybe_save` returns once the arrays are copied to host memory, so the caller may donate
them to the next step at once, and the files are written by a background thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import sys
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from openvision_max.training import fault_hooks as hooks
from openvision_max.mesh import distributed

# The store behind Orbax's default jax.Array handler (array write shapes, random-key types); no public name in 0.12.
from orbax.checkpoint._src.metadata import array_metadata_store

CHECKPOINTS = "checkpoints"  # the sub-directory of a run directory that holds its checkpoints
# Replicated arrays are split among their replicas for writing only when each part is at least this big: every
# split is a slice compiled per shape and device on the first save (12 s of blocking for the tiny 2x2x2 test
# model on CPU), which only pays for itself on big arrays.
MIN_REPLICA_SLICE_BYTES = 1 << 20


class CheckpointError(ValueError):
    """No usable checkpoint where one was expected, or one that does not fit the model."""


class UnusableCheckpoint(RuntimeError):
    """A complete checkpoint that cannot be read back (a truncated array file, a deleted item): the caller sets
    it aside and resumes from an older one."""

    def __init__(self, step: int, reason: str, details: str = ""):
        super().__init__(f"checkpoint {step} is unusable: {reason}")
        self.step, self.reason, self.details = step, reason, details


class SaveFailed(RuntimeError):
    """A checkpoint could not be written (a full disk, a lost bucket): the run stops; older ones are intact."""


UNUSABLE = ".unusable"  # suffix of a step directory set aside as unreadable (kept for inspection)
def _unreadable(error: Exception) -> bool:
    """Whether a restore failed on the checkpoint's bytes: TensorStore's ValueErrors (and Orbax's bare Exception
    around them), JSON errors, a KeyError for a missing item, file errors. Not a device out of memory, and not
    CheckpointError (a checkpoint that does not fit the model: a config problem, never a reason to fall back)."""
    return not isinstance(error, CheckpointError) and "out of memory" not in str(error).lower()


def _drop_closed_loop_noise(unraisable, previous=sys.unraisablehook) -> None:
    """Python's hook for exceptions nobody can catch, less one: when a TensorStore read fails, the reads still in
    flight complete into Orbax's closed event loop and each reports 'Event loop is closed' (one traceback per
    array, after the failure itself was raised and reported)."""
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return
    previous(unraisable)


sys.unraisablehook = _drop_closed_loop_noise


class _OrbaxUnretrievedErrors(logging.Filter):
    """Drops asyncio's "<class> exception was never retrieved" for Orbax's own write tasks and the gathers around
    them: when one write of a save fails, the save's error reaches the trainer (which says it once), and the
    sibling writes and gathers that failed too are reported again with a traceback each when they are collected,
    at any time, often before the trainer has seen the first (so the filter is in place from import on)."""
    # asyncio names the future's class first: Task, Future, _GatheringFuture (a failed `gather`), or a subclass.
    UNRETRIEVED = re.compile(r"\w+ exception was never retrieved\b")

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.UNRETRIEVED.match(record.getMessage()) or not record.exc_info:
            return True
        tb = record.exc_info[2]
        while tb is not None:
            if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
                return False
            tb = tb.tb_next
        return True


logging.getLogger("asyncio").addFilter(_OrbaxUnretrievedErrors())


def _out_of_space(error: BaseException | None) -> bool:
    """Whether `error` or one it was raised from is a full disk (ENOSPC; TensorStore says os_error_code 28)."""
    while error is not None:
        text = str(error)
        if getattr(error, "errno", None) == 28 or re.search(r"os_error_code='?28\b|No space left on device", text):
            return True
        error = error.__cause__ or error.__context__
    return False


def _short(error: BaseException) -> str:
    """The part of a TensorStore/Orbax error a person needs (their messages carry whole JSON specs)."""
    text = str(error).split(" [tensorstore_spec=")[0]
    if _out_of_space(error):
        return "no space left on device (" + text[:200] + ")"
    return text[:300]


class _QuietOrbax(logging.Filter):
    """Drops Orbax's own log records (dozens of lines per save at INFO; benign warnings; and, for a failed save,
    the same traceback from each of its threads: the failure itself reaches the trainer, which says it once).

    Orbax logs through absl's logger, which other libraries share, so records are told apart by their source file.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.CRITICAL or f"{os.sep}orbax{os.sep}" not in record.pathname


logging.getLogger("absl").addFilter(_QuietOrbax())


def _manager(directory: epath.Path, *, read_only: bool, max_to_keep: int | None = None,
             period: int = 1) -> ocp.CheckpointManager:
    """Orbax's manager for `<run>/checkpoints`: items `state` (a pytree of jax Arrays) and `meta` (JSON)."""
    array_handler = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
                                                   array_metadata_store=array_metadata_store.Store())
    registry = ocp.type_handlers.create_type_handler_registry((jax.Array, array_handler))
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        read_only=read_only, create=not read_only, enable_async_checkpointing=True,
        # Every `period` steps (Orbax's default would also save at the first step of every fresh run). The
        # step all hosts agree on after a preemption notice is PreemptionGuard's to find: that save is forced.
        save_decision_policy=policies.FixedIntervalPolicy(period),
        preservation_policy=None if read_only else policies.LatestN(max_to_keep),
        cleanup_tmp_directories=not read_only)  # what saves killed mid-write left behind
    return ocp.CheckpointManager(
        directory, options=options,
        item_handlers={"state": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
                       "meta": hooks.meta_handler()})  # Orbax's JSON handler, unless a fault test slows it


def abstract_like(tree: Any) -> Any:
    """The ShapeDtypeStructs (with shardings) of a tree of jax Arrays: a restore target shaped like `tree`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{'params/vision/cls': shape} for arrays, ShapeDtypeStructs or Orbax metadata (which keeps tuples as lists,
    namedtuples and dataclasses as dicts, so keys are compared by name)."""
    def name(key) -> str:
        return str(next((getattr(key, a) for a in ("key", "name", "idx") if hasattr(key, a)), key))
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(map(name, path)): tuple(leaf.shape) for path, leaf in flat if hasattr(leaf, "shape")}


def _check_fits(saved: Any, abstract: Any, where: str) -> None:
    """Raises CheckpointError naming `where` unless `saved` has exactly the arrays and shapes of `abstract`."""
    have, want = _shapes(saved), _shapes(abstract)
    problems = [f"{k} missing" for k in want if k not in have]
    problems += [f"{k} not in the model" for k in have if k not in want]
    problems += [f"{k} is {have[k]}, the model has {want[k]}" for k in want if k in have and have[k] != want[k]]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"checkpoint {where} does not fit the model: {'; '.join(problems[:3])}{more}")


class Checkpointer:
    """Saves the train state every `period` steps into `directory` (`<run>/checkpoints`), keeping the newest
    `max_to_keep`; restores it onto the current mesh. Saves run in the background; `close()` waits for them."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None, period: int):
        if period <= 0:
            raise ValueError(f"checkpoint period must be positive, got {period}")
        self.directory = epath.Path(directory)
        self._manager = _manager(self.directory, read_only=False, max_to_keep=max_to_keep, period=period)
        self._writing: int | None = None  # the step of the save last started (it may still be in flight)
        self._failed = False

    def latest_step(self) -> int | None:
        """The newest checkpoint's step: at start-up, of complete checkpoints only (None if there are none)."""
        return self._manager.latest_step()

    def due(self, step: int) -> bool:
        """Whether `maybe_save` would save at `step` without `force` (every `period` steps); no collective."""
        return self._manager.should_save(step)

    def maybe_save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Starts saving `state` and the JSON-able `meta` as checkpoint `step` if it is due (every `period`
        steps, or `force`: the end of a stage, a preemption); returns whether a save started.

        Blocks only to copy the arrays to host memory and, if the previous save is still being written, to finish
        it. Call it on every host for the same steps: the save is collective.
        """
        if force and step in self._manager.all_steps():
            return False  # already saved (say by the periodic save of the last step)
        json.dumps(meta)  # a TypeError here, rather than in the background thread
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta))
        with self._reporting_failures(step):  # or the previous save's failure, which comes out here
            started = self._manager.save(step, args=args, force=force)
        if started:
            self._writing = step
        return started

    @contextlib.contextmanager
    def _reporting_failures(self, step: int | None = None):
        """Turns an error from Orbax's writer into SaveFailed naming the failed step (the one in flight, else
        `step`, the one starting) and the last complete one."""
        try:
            yield
        except Exception as e:
            if isinstance(e, SaveFailed):
                raise
            self._failed = True
            complete = [s for s in self._manager.all_steps() if s != self._writing]
            failed = self._writing if self._writing is not None and self._writing not in complete else step
            last = f"step {max(complete)}" if complete else "none"
            raise SaveFailed(f"checkpoint {failed} could not be written to {self.directory}: {_short(e)}; "
                             f"the last complete checkpoint ({last}) is intact and a restart resumes from it") from e

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Checkpoint `step` as (state, meta); the state takes the structure, dtypes and shardings of
        `abstract_state` (ShapeDtypeStructs with `.sharding`), so it lands sharded on the current mesh."""
        if step not in self._manager.all_steps():
            raise CheckpointError(f"no complete checkpoint at {self.directory / str(step)}")
        try:
            saved = self._manager.item_metadata(step)["state"].tree
        except Exception as e:
            if not _unreadable(e):
                raise
            raise UnusableCheckpoint(step, _short(e), repr(e)) from e
        _check_fits(saved, abstract_state, str(self.directory / str(step)))
        restored, error = None, None
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
                meta=ocp.args.JsonRestore()))
        except Exception as e:
            if not _unreadable(e):
                raise
            error = e
        # Hosts read different shards: if any could not, all fall back together.
        if distributed.sum_over_processes({"unreadable": float(error is not None)})["unreadable"]:
            raise UnusableCheckpoint(step, _short(error) if error else "another host could not read it",
                                     repr(error))
        return restored.state, restored.meta

    def restore_meta(self, step: int) -> dict[str, Any]:
        """Only the JSON `meta` of checkpoint `step` (which stage it belongs to), without reading arrays."""
        if step not in self._manager.all_steps():
            raise CheckpointError(f"no complete checkpoint at {self.directory / str(step)}")
        try:
            return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:
            if not _unreadable(e):
                raise
            raise UnusableCheckpoint(step, _short(e), repr(e)) from e

    def set_aside(self, step: int, details: str = "") -> epath.Path:
        """Renames unusable checkpoint `step` to `<step>.unusable` (kept, out of Orbax's way: a new save of that
        step must not collide with it), with `details` of the failure in its restore-error.txt; returns the new
        path. Collective on several hosts."""
        target = self.directory / f"{step}{UNUSABLE}"
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(target)
            if details:
                (target / "restore-error.txt").write_text(details)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self._manager.reload()
        return target

    def set_aside_steps(self) -> list[str]:
        """The names of the step directories set aside as unusable, by this run or an earlier one."""
        if not self.directory.exists():
            return []
        return sorted(p.name for p in self.directory.iterdir() if p.name.endswith(UNUSABLE))

    def wait(self) -> None:
        """Blocks until the save in progress (if any) is complete on disk; raises its error if it failed."""
        with self._reporting_failures():
            self._manager.wait_until_finished()
            self._manager.check_for_errors()

    def close(self) -> None:
        """Waits for the save in progress, then releases Orbax's threads. Call it before the process exits."""
        try:
            if not self._failed:  # a failed save was reported once; waiting would raise it again
                self.wait()
        finally:
            try:
                self._manager.close()
            except Exception:
                if not self._failed:
                    raise

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _locate(path: epath.Path) -> tuple[epath.Path, int | None]:
    """(checkpoints directory, step or None for the newest) for a run, checkpoints or step directory."""
    if (path / CHECKPOINTS).is_dir():
        return path / CHECKPOINTS, None
    if path.name.isdigit() and (path / "state").is_dir():
        return path.parent, int(path.name)
    return path, None


def load_parameters(path: str | os.PathLike, abstract_params: Any) -> Any:
    """Only the parameters of another run's checkpoint, placed as `abstract_params` says (shapes, dtypes,
    shardings): to start a new run from them. `path` is a run directory, its `checkpoints/` directory (newest
    complete step of either) or one step directory. Raises CheckpointError when nothing usable is there."""
    if not epath.Path(path).exists():
        raise CheckpointError(f"{path} does not exist")
    directory, step = _locate(epath.Path(path))
    manager = _manager(directory, read_only=True)
    try:
        steps = manager.all_steps()  # complete checkpoints only
        step = max(steps, default=None) if step is None else step
        if step not in steps:
            raise CheckpointError(f"no complete checkpoint at {path} (a run, checkpoints/ or step directory)")
        metadata = manager.item_metadata(step)
        if "state" not in metadata.keys():
            raise CheckpointError(f"{directory / str(step)} is not a checkpoint of this trainer (no state/)")
        _check_fits(metadata["state"].tree.get("params", {}), abstract_params, f"{directory / str(step)} (parameters)")
        target = {"params": abstract_params}
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
        return restored.state["params"]
    finally:
        manager.close()


class PreemptionGuard:
    """Turns a preemption notice (SIGTERM) into a step at which every host saves and stops.

    One process: a handler installed here (from the main thread) sets a flag that `preempted` returns.
    Several processes (jax.distributed): JAX's preemption service already catches SIGTERM (in C++) and agrees on a
    step across hosts. A Python handler would replace JAX's, and hosts would stop at different steps and hang in
    the collective save, so none is installed and `preempted` asks JAX's sync point; every host must call it at
    every step. Use as a context manager to restore the previous handlers.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self._notice = threading.Event()
        self._previous: dict[int, Any] = {}
        if jax.process_count() == 1:
            for sig in signals:
                self._previous[sig] = signal.signal(sig, lambda signum, frame: self._notice.set())

    def preempted(self, step: int) -> bool:
        """Whether to save and stop after `step`."""
        if jax.process_count() == 1:
            return self._notice.is_set()
        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # the preemption service is off (jax_enable_preemption_service=False)
            return False

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> PreemptionGuard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
