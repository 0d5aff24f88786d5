"""Observability of a run: the profiler, device-memory figures, the hung-step watchdog, periodic stack traces,
the persistent compilation cache, the run's timeline and goodput (recorded, and computed from the run's records).

The training loop reports to one `observer.Observer`; each concern is a module of its own. Nothing here is
imported at package import time, so `python -m openvision_max.goodput` reads a run without starting JAX.
"""
