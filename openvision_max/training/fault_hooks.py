"""Test-only fault hooks, switched on by the environment variable OPENVISION_FAULTS (a JSON object); without
it every hook is the identity and the trainer's programs are the ones it always compiles.

    nan_gradients: [first_step, count]  the gradients of steps first_step .. first_step+count-1 (1-based, as
                                        logged) are NaN: the step's non-finite guard must skip them
    slow_save_s: seconds                every checkpoint's meta item is written that long after its save
                                        started (in Orbax's commit thread), so a kill can land inside a save
    key_log: path                       each train batch's record keys are appended to `path` as JSON lines
                                        {"pid", "step", "keys"} (the loss accounting of benchmarks/faults.py)
    hang: [step, seconds]               the data iterator sleeps `seconds` (in `sleep_in_data_iterator`) before
                                        it hands out step `step`'s batch (1-based, as logged): a hung step for
                                        the watchdog and the stack traces (tests/observe)

Not a user feature: none of this is in the config, and the hooks are read when the trainer builds its step,
checkpointer and data iterator.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

ENV = "OPENVISION_FAULTS"


def active() -> dict[str, Any]:
    """The faults asked for in OPENVISION_FAULTS ({} when unset)."""
    text = os.environ.get(ENV, "")
    return json.loads(text) if text else {}


def poison_gradients(grads: Any, step: Any) -> Any:
    """`grads` with NaN in every leaf at the steps `nan_gradients` names; `step` is the state's step before the
    update (0-based), traced. Without the fault, `grads` itself (nothing enters the compiled step)."""
    window = active().get("nan_gradients")
    if not window:
        return grads
    import jax
    import jax.numpy as jnp
    first, count = int(window[0]), int(window[1])
    bad = (step + 1 >= first) & (step + 1 < first + count)
    return jax.tree.map(lambda g: jnp.where(bad, jnp.nan, g), grads)


def meta_handler():
    """Orbax's JSON handler for a checkpoint's `meta` item; with `slow_save_s`, one that waits before writing."""
    import orbax.checkpoint as ocp
    delay = float(active().get("slow_save_s", 0))
    if not delay:
        return ocp.JsonCheckpointHandler()

    # Orbax picks a handler for JsonSaveArgs by its exact class, so the instance's writer is wrapped instead.
    handler = ocp.JsonCheckpointHandler()
    write = handler._save_fn

    async def slow_write(x, directory):
        time.sleep(delay)  # in the commit thread: the train loop goes on meanwhile, as with a slow store
        await write(x, directory)

    handler._save_fn = slow_write
    return handler


class _KeyLog:
    """A data iterator that appends the record keys of each batch it hands out to a JSON-lines file."""

    def __init__(self, inner, path: str, first_step: int):
        self._inner, self._path, self._step = inner, path, first_step

    def __next__(self):
        batch = next(self._inner)
        self._step += 1
        with open(self._path, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "step": self._step, "keys": self._inner.last_keys}) + "\n")
        return batch

    def __iter__(self):
        return self

    def __getattr__(self, name):
        return getattr(self._inner, name)


def log_keys(data, start_step: int):
    """`data`, or with `key_log` a wrapper recording the keys of steps start_step+1, start_step+2, ..."""
    path = active().get("key_log")
    if not path or not hasattr(data, "last_keys"):
        return data
    return _KeyLog(data, path, start_step)


def sleep_in_data_iterator(seconds: float) -> None:
    """The frame a stack dump of the hung step shows."""
    time.sleep(seconds)


class _Hang:
    """A data iterator that takes `seconds` longer to hand out the batch of step `at`."""

    def __init__(self, inner, at: int, seconds: float, first_step: int):
        self._inner, self._at, self._seconds, self._step = inner, at, seconds, first_step

    def __next__(self):
        self._step += 1
        if self._step == self._at:
            sleep_in_data_iterator(self._seconds)
        return next(self._inner)

    def __iter__(self):
        return self

    def __getattr__(self, name):
        return getattr(self._inner, name)


def hang(data, start_step: int):
    """`data`, or with `hang` a wrapper that sleeps before one step's batch (steps start_step+1, ...)."""
    spec = active().get("hang")
    if not spec:
        return data
    return _Hang(data, int(spec[0]), float(spec[1]), start_step)
