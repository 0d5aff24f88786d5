"""`collect_stack_trace`: the job runs under cloud-tpu-diagnostics' stack-trace collection.

The package installs faulthandler for fatal signals (SIGSEGV, SIGABRT, ...) and a SIGUSR1 handler that prints
"Not a crash" and the main thread's Python stack, to stderr, or with `stack_trace_to_cloud` to
/tmp/debugging/stack_trace_<time>.txt, the folder Cloud TPU VMs (and the GKE sidecar of the TPU docs) ship to
Cloud Logging. It is Python's handler, so it runs once the main thread runs Python again; `step_timeout_seconds`'
watchdog sees a main thread stuck in C too.

The signal comes every `stack_trace_interval_seconds` from a thread of ours rather than the package's
`diagnose()`: that thread sleeps a whole interval (10 minutes by default) before it can be joined, which would hold
up the end of every run; ours stops at once.
"""

from __future__ import annotations

import signal
import threading

from openvision_max.config.schema import Config


class StackTraces:
    """Installs the package's handlers (call from the main thread) and signals the main thread periodically."""

    def __init__(self, cfg: Config):
        from cloud_tpu_diagnostics.src import stack_trace
        from cloud_tpu_diagnostics.src.config import stack_trace_configuration

        self._stack_trace = stack_trace
        self.config = stack_trace_configuration.StackTraceConfig(
            collect_stack_trace=True, stack_trace_to_cloud=cfg.stack_trace_to_cloud,
            stack_trace_interval_seconds=cfg.stack_trace_interval_seconds)
        stack_trace.enable_stack_trace_dumping(self.config)
        self._main = threading.main_thread().ident
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._signal, name="stack-traces", daemon=True)
        self._thread.start()

    def _signal(self) -> None:
        while not self._stop.wait(self.config.stack_trace_interval_seconds):
            signal.pthread_kill(self._main, signal.SIGUSR1)

    def close(self) -> None:
        """Stops the signals first: once the handlers are gone, a SIGUSR1 would end the process."""
        self._stop.set()
        self._thread.join()
        self._stack_trace.disable_stack_trace_dumping(self.config)
