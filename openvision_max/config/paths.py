"""Paths the config and the command lines name: a URI (gs://bucket/...) goes to etils.epath as it is, a local
path is made absolute (orbax and TensorStore refuse relative ones) with `~` expanded."""

from __future__ import annotations

import os
import pathlib

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    """A URI (gs://..., any scheme://) rather than a local path."""
    return "://" in str(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path: URIs unchanged, local paths absolute."""
    if is_remote(path):
        return epath.Path(path)
    return epath.Path(pathlib.Path(path).expanduser().absolute())
