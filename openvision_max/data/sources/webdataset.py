"""Webdataset tar shards as img2dataset writes them (the DataComp / Recap-DataComp layout).

A sample is the set of members sharing a key: the member path up to the first '.' of its file name, the rest
being the extension (`00001/000010023.jpg` -> key `00001/000010023`, extension `jpg`). Used extensions:
`jpg|jpeg|png|webp` (the image; the first present in that order), `txt` (alt-text) and `json` (an object whose
`recaption_field` holds the recaption); others are ignored. One output shard per input tar.

The tar's headers are scanned first and grouped by key, then each sample's members are read, in order of the
key's first appearance: the members of a sample need not be adjacent, yet the usual adjacent layout is still
read front to back. A tar that ends early (a cut-off download) yields its complete samples; a member whose data
runs past the end counts as `truncated_member`, and so does the last sample seen when the scan stopped on a
cut-off header, since its remaining members may be what was lost. Compressed tars (`.tar.gz`) are read too, but
img2dataset's plain tars are what this is built for.
"""

from __future__ import annotations

import json
import os
import pathlib
import tarfile
import zlib
from typing import Iterator, Sequence

from openvision_max.data.records import RecordError, shard_name
from openvision_max.data.sources.sample import Job, Plan, Sample, UsageError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_USED = frozenset(IMAGE_EXTENSIONS + ("txt", "json"))
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


def plan(inputs: Sequence[pathlib.Path], prefix: str, recaption_field: str) -> Plan:
    jobs = []
    for i, path in enumerate(inputs):
        try:
            with tarfile.open(path, "r:*"):
                pass
        except tarfile.TarError:
            raise UsageError(f"cannot open {path}: not a tar archive") from None
        except OSError as e:
            raise UsageError(f"cannot open {path}: {e.strerror or e}") from None
        st = path.stat()
        source = {"tar": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                  "recaption_field": recaption_field}
        jobs.append(Job(shard_name(prefix, i, len(inputs)), source))
    return Plan(jobs)


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member path; extension lower-cased, '' if the file name has no '.'."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


def _scan(tar: tarfile.TarFile) -> tuple[dict[str, dict[str, tarfile.TarInfo]], bool]:
    """Members grouped by key in order of first appearance, and whether the scan hit a cut-off header."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    while True:
        try:
            member = tar.next()
        except _READ_ERRORS:
            return groups, True
        if member is None:
            return groups, False
        if not member.isfile():
            continue
        key, ext = split_name(member.name)
        if ext in _USED:
            groups.setdefault(key, {}).setdefault(ext, member)


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo, file_size: int | None) -> bytes:
    if file_size is not None and member.offset_data + member.size > file_size:
        raise RecordError("truncated_member", member.name)
    try:
        data = tar.extractfile(member).read()
    except _READ_ERRORS as e:
        raise RecordError("truncated_member", f"{member.name}: {e}") from None
    if len(data) != member.size:
        raise RecordError("truncated_member", member.name)
    return data


def _recaption(data: bytes, field: str, name: str) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RecordError("non_utf8_text", name) from None
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise RecordError("bad_json", f"{name}: {e}") from None
    if not isinstance(obj, dict):
        raise RecordError("bad_json", f"{name}: not a JSON object")
    value = obj.get(field)
    return value if isinstance(value, str) else None


def _sample(tar, key: str, parts: dict[str, tarfile.TarInfo], field: str, file_size) -> Sample:
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in parts), None)
    image = _read(tar, parts[image_ext], file_size) if image_ext else None
    alt = _read(tar, parts["txt"], file_size) if "txt" in parts else None
    recap = _recaption(_read(tar, parts["json"], file_size), field, parts["json"].name) if "json" in parts else None
    return Sample(key=key, image=image, alt_text=alt, recaption=recap)


def _open(path: str) -> tuple[tarfile.TarFile, int | None]:
    """The tar and, if uncompressed, its file size: member offsets are file positions only then, which lets a
    cut-off member be recognised from its header; compressed tars rely on read errors instead."""
    try:
        return tarfile.open(path, "r:"), os.path.getsize(path)
    except tarfile.ReadError:
        return tarfile.open(path, "r:*"), None


def read(source: dict) -> Iterator[Sample | RecordError]:
    tar, file_size = _open(source["tar"])
    with tar:
        groups, cut_off = _scan(tar)
        last = next(reversed(groups), None) if cut_off else None
        for key, parts in groups.items():
            if key == last:
                yield RecordError("truncated_member", f"{key}: the tar ends inside this sample")
                continue
            try:
                yield _sample(tar, key, parts, source["recaption_field"], file_size)
            except RecordError as e:
                yield e
