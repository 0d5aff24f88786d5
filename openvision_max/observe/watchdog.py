"""`step_timeout_seconds`: a watchdog for a hung train step.

The loop stamps a monotonic time after every step (`beat`: one tuple assignment, no lock); a daemon thread
looks at it a few times per timeout. When no step has finished for `step_timeout_seconds`, it dumps the Python
stack of every thread (faulthandler, which reads the threads' frames without their help, so a main thread
stuck in a C call or a collective is seen too) to stderr and to `<run>/hang-<step>.txt`, once per step, and
goes on waiting: a slow step is not a crash. When the step finishes after all, it says after how long.

The stage's first step (compilation) is not watched, nor are the evals and checkpoint saves between steps
(`pause`).
"""

from __future__ import annotations

import faulthandler
import sys
import tempfile
import threading
import time
from typing import Callable

import jax
from etils import epath


def hang_file(run_dir: epath.Path, step: int) -> epath.Path:
    """`<run>/hang-<step>.txt`; processes other than 0 add `.process-<i>` (each host dumps its own)."""
    suffix = "" if jax.process_index() == 0 else f".process-{jax.process_index()}"
    return run_dir / f"hang-{step}{suffix}.txt"


def thread_stacks() -> str:
    """Every thread's Python stack, as faulthandler prints it (most recent call first)."""
    with tempfile.TemporaryFile("w+") as f:
        faulthandler.dump_traceback(f, all_threads=True)
        f.seek(0)
        return f.read()


class Watchdog:
    def __init__(self, timeout: float, run_dir: epath.Path, step_offset: int,
                 log: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)):
        self.timeout = timeout
        self.run_dir = run_dir
        self.step_offset = step_offset
        self.log = log
        self._last: tuple[int, float] | None = None  # (stage step, monotonic time) of the last finished step
        self._hung: tuple[int, float] | None = None  # (stage step, when the one before it finished) of a dump
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int) -> None:
        """Step `step` (of the stage) finished."""
        self._last = (step, time.monotonic())

    def pause(self) -> None:
        """Not stepping (an eval, a checkpoint save): nothing to watch until the next `beat`."""
        self._last = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._check()  # a step that finished just before the end is still reported

    def _watch(self) -> None:
        poll = min(0.5, self.timeout / 4)
        while not self._stop.wait(poll):
            self._check()

    def _check(self) -> None:
        last = self._last
        if last is None:
            return
        step, since = last
        if self._hung is not None and step >= self._hung[0]:
            self.log(f"watchdog: step {self.step_offset + self._hung[0]} finished, {since - self._hung[1]:.0f} s "
                     "after the step before it")
            self._hung = None
        waited = time.monotonic() - since
        if waited >= self.timeout and self._hung is None:
            self._hung = (step + 1, since)
            self._dump(self.step_offset + step + 1, waited)

    def _dump(self, step: int, waited: float) -> None:
        path = hang_file(self.run_dir, step)
        text = (f"watchdog: no train step finished for {waited:.0f} s (step_timeout_seconds={self.timeout:g}): "
                f"step {step} is still running; the stack of every thread follows (also in {path}); still "
                f"waiting\n{thread_stacks()}")
        try:
            path.write_text(text)
        except OSError as e:  # the dump still reaches the log
            text += f"watchdog: could not write {path}: {e}\n"
        self.log(text)
