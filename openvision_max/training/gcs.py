"""Appending to objects on GCS, for the run's logs: metrics.jsonl and TensorBoard event files.

GCS objects are immutable, and gcsfs turns `open("a")` into a rewrite (the earlier lines are lost), so an
append uploads only the new bytes as an object of their own and composes [object, new] onto the object.
GCS takes about one update per second per object: callers buffer, and append once every few seconds.
"""

from __future__ import annotations

import uuid


def append(path: str, data: bytes) -> None:
    """Appends `data` to the object `path` (gs://...), creating it if absent; one writer per object."""
    import fsspec

    fs, name = fsspec.core.url_to_fs(str(path))
    fs.invalidate_cache(name)  # exists() must not answer from a listing made before the object was
    if not fs.exists(name):
        fs.pipe_file(name, data)
        return
    part = f"{name}.append-{uuid.uuid4().hex}"
    fs.pipe_file(part, data)
    try:
        fs.merge(name, [name, part])
    finally:
        fs.rm_file(part)


class ComposeRecordWriter:
    """A tensorboardX record writer for gs:// that appends each flush's records (`append`).

    tensorboardX's own GCS writer keeps the whole event file in memory and uploads all of it at every flush,
    and again when the process exits.
    """

    class Factory:
        def open(self, path: str) -> ComposeRecordWriter:
            return ComposeRecordWriter(path)

        def directory_check(self, path: str) -> None:
            pass  # GCS has no directories

    def __init__(self, path: str):
        self.path = path
        self.pending = bytearray()

    def write(self, data: bytes) -> None:
        self.pending += data

    def flush(self) -> None:
        if self.pending:
            append(self.path, bytes(self.pending))
            self.pending.clear()

    def close(self) -> None:
        self.flush()


def use_compose_for_tensorboard() -> None:
    """Makes tensorboardX write gs:// event files with ComposeRecordWriter."""
    from tensorboardX import record_writer
    record_writer.register_writer_factory("gs", ComposeRecordWriter.Factory())
