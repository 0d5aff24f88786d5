"""Multi-controller start-up: one process per host, joined by `jax.distributed` before anything asks JAX for
its devices (a config is resolved against the global device count, so this runs first).

- Explicit: `coordinator_address`, `num_processes`, `process_id` (config keys, else the environment variables
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID): GPU clusters, and several processes on one
  machine (`python -m openvision_max.launch local`, which sets the variables). CPU processes exchange
  collectives through gloo.
- Automatic: on a Cloud TPU VM or a GKE TPU pod, `jax.distributed.initialize()` with no arguments (JAX reads
  the TPU metadata or the JobSet's environment); one host is fine too.
- Neither: one process, nothing to start.

Once started, JAX's preemption service runs: a SIGTERM to any host makes every host reach the same sync
point, so all save the same step (training/checkpointing.py's PreemptionGuard asks it). At exit each process
waits at JAX's shutdown barrier for the others; `trace_a_slow_exit` makes one held up there say where.
"""

from __future__ import annotations

import collections
import faulthandler
import json
import os
import socket
import sys
import threading
import time

import numpy as np

from openvision_max.config import topology
from openvision_max.config.schema import Config


# Seconds a process of several may take from the end of its run to its exit before it prints every thread's
# Python stack (to stderr, once; it goes on waiting). A peer that is merely slower ends well within this.
EXIT_TRACES_S = 60


class DistributedError(RuntimeError):
    """The processes could not be joined (a missing or unreachable coordinator, bad process numbers)."""


def _setting(value, env: str, unset) -> str | int | None:
    """The config value, else the environment variable, else None."""
    if value != unset:
        return value
    return os.environ.get(env) or None


def explicit_settings(cfg: Config) -> tuple[str, int, int] | None:
    """(coordinator address, number of processes, this process's id) when any of them is given; None for
    none. Raises DistributedError when they are incomplete or inconsistent."""
    address = _setting(cfg.coordinator_address, "JAX_COORDINATOR_ADDRESS", "")
    count = _setting(cfg.num_processes, "JAX_NUM_PROCESSES", 0)
    index = _setting(cfg.process_id, "JAX_PROCESS_ID", -1)
    if address is None and count is None and index is None:
        return None
    if address is None or count is None or index is None:
        raise DistributedError(
            "coordinator_address, num_processes and process_id go together (config keys or JAX_COORDINATOR_ADDRESS, "
            f"JAX_NUM_PROCESSES, JAX_PROCESS_ID); got {address!r}, {count!r}, {index!r}")
    try:
        count, index = int(count), int(index)
    except ValueError:
        raise DistributedError(f"num_processes and process_id must be whole numbers, got {count!r}, "
                               f"{index!r}") from None
    if count < 1 or not 0 <= index < count:
        raise DistributedError(f"process_id={index} is not one of num_processes={count} processes")
    if ":" not in str(address):
        raise DistributedError(f"coordinator_address must be host:port, got {address!r}")
    return str(address), count, index


def initialize(cfg: Config) -> None:
    """Joins this process to the others, if there are any (see the module docstring)."""
    import jax

    if cfg.skip_jax_distributed_system:
        return
    explicit = explicit_settings(cfg)
    if explicit is None and not topology.host_may_have_tpu():  # a Cloud TPU VM or GKE TPU host
        return
    timeout = cfg.jax_distributed_initialization_timeout
    if explicit is None:
        jax.distributed.initialize(initialization_timeout=timeout)
        return
    address, count, index = explicit
    if index != 0:
        _wait_for(address, timeout)
    # JAX ends a process whose peers do not all join in time (a C++ fatal error, not an exception): say why
    # first, in one line.
    warning = threading.Timer(max(timeout - 1.0, 0.5), lambda: print(
        f"train.py: not all num_processes={count} processes joined coordinator {address} within "
        f"jax_distributed_initialization_timeout={timeout} s; JAX stops this process", file=sys.stderr,
        flush=True))
    warning.daemon = True
    warning.start()
    try:
        # CPU devices of different processes talk through gloo; the setting is ignored by GPU and TPU clients.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index,
                                   initialization_timeout=timeout)
    except Exception as e:  # e.g. a malformed address: XlaRuntimeError / ValueError with gRPC detail
        raise DistributedError(f"could not join coordinator {address}: {' '.join(str(e).split())[:300]}") from None
    finally:
        warning.cancel()


def trace_a_slow_exit() -> None:
    """Call when the run has ended: a process of several that is still alive EXIT_TRACES_S later prints every
    thread's stack, so that a hang at exit (a thread that never ends, a peer that never reaches the shutdown
    barrier) shows where each process is, before JAX's shutdown timeout ends them all."""
    import jax

    if jax.process_count() > 1:
        faulthandler.dump_traceback_later(EXIT_TRACES_S, exit=False)


def _wait_for(address: str, timeout: float) -> None:
    """Returns once something accepts connections at `address`; DistributedError after `timeout` seconds.
    A process that is not the coordinator checks first: JAX would end it with a fatal error instead."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except (OSError, ValueError) as e:
            if time.monotonic() >= deadline:
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                raise DistributedError(
                    f"no coordinator answered at {address} within jax_distributed_initialization_timeout="
                    f"{timeout:g} s ({reason}); is process 0 running there?") from None
            time.sleep(0.5)


AGREE_BYTES = 256


def agree(text: str) -> str:
    """Process 0's `text`, on every process (e.g. a run name from each host's own clock)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return text
    raw = text.encode()
    if len(raw) > AGREE_BYTES:  # a fixed size, so that no process needs another's length first
        raise ValueError(f"agree() takes at most {AGREE_BYTES} bytes, got {len(raw)}: {text[:60]!r}...")
    data = np.frombuffer(raw.ljust(AGREE_BYTES, b"\0"), np.uint8)
    agreed = multihost_utils.broadcast_one_to_all(data)
    return bytes(np.asarray(agreed)).rstrip(b"\0").decode()


def gather(text: str) -> list[str]:
    """Every process's `text`, in process order, on every process (e.g. each host's data iterator state)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return [text]
    raw = text.encode()
    length = int(np.max(multihost_utils.process_allgather(np.array([len(raw)], np.int32))))
    data = np.frombuffer(raw.ljust(length, b"\0"), np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(data))
    return [bytes(row).rstrip(b"\0").decode() for row in rows]


def sum_over_processes(values: dict[str, float]) -> dict[str, float]:
    """`values` summed over processes, key by key (a key one process lacks counts 0 there)."""
    import jax

    if jax.process_count() == 1:
        return values
    total: collections.Counter = collections.Counter()
    for text in gather(json.dumps(values)):
        total.update(json.loads(text))
    return dict(sorted(total.items()))
