"""The on-disk record format: ArrayRecord shards of msgpack maps, schema version 1.

One record = one image with its texts:

    v          int    schema version (1)
    key        str    a unique id within the dataset (the webdataset key, a relative path, a row number)
    image      bytes  the encoded image exactly as stored at the source (JPEG, PNG, WebP, ...)
    alt_text   bytes  UTF-8 alt-text (the first contrastive text); b"" for classification sets
    recaption  bytes  UTF-8 long recaption (decoder target; one sentence is the second contrastive text)
    label      int    class index for classification sets (ImageFolder), -1 otherwise

Texts travel as bytes so that a reader, not the writer, decides what malformed text costs: the pipeline
skips and counts such records instead of failing a run. A dataset directory holds the shards
(`<name>-<i>-of-<n>.array_record`) and `dataset.json` (see `DatasetInfo`).

Shards are written with the ArrayRecord options `WRITER_OPTIONS`: group size 1 (one record per chunk, which
grain's random access needs) and no compression (images are already compressed; zstd would only cost CPU on
every read). Changes since the first version of this file, all backward compatible: `DatasetInfo` gained the
optional fields `templates`, `recaption_fallbacks`, `inputs` and `options` (a field missing from an older
`dataset.json` reads as its default), and `DatasetInfo.read` ignores keys it does not know, so an older reader
still opens a newer `dataset.json`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Optional

import msgpack

SCHEMA_VERSION = 1
SHARD_SUFFIX = ".array_record"
INFO_FILE = "dataset.json"
WRITER_OPTIONS = "group_size:1,uncompressed"


class RecordError(ValueError):
    """A record that cannot be used; `reason` names the metric `data/skipped_<reason>`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclasses.dataclass
class Record:
    key: str
    image: bytes
    alt_text: bytes = b""
    recaption: bytes = b""
    label: int = -1

    def encode(self) -> bytes:
        return msgpack.packb({"v": SCHEMA_VERSION, "key": self.key, "image": self.image,
                              "alt_text": self.alt_text, "recaption": self.recaption, "label": self.label},
                             use_bin_type=True)

    @staticmethod
    def decode(data: bytes) -> "Record":
        try:
            obj = msgpack.unpackb(data, raw=False)
        except Exception as e:  # msgpack raises several types for cut-off or corrupt input
            raise RecordError("truncated_record", str(e)) from None
        if not isinstance(obj, dict) or "image" not in obj:
            raise RecordError("truncated_record", "not an openvision-max record")
        if obj.get("v") != SCHEMA_VERSION:
            raise RecordError("schema_version", f"record schema {obj.get('v')!r}, reader knows {SCHEMA_VERSION}")
        return Record(key=str(obj.get("key", "")), image=obj["image"], alt_text=obj.get("alt_text", b""),
                      recaption=obj.get("recaption", b""), label=int(obj.get("label", -1)))

    def text(self, field: str) -> str:
        """A text field as str; RecordError('non_utf8_text') if it is not UTF-8."""
        try:
            return getattr(self, field).decode("utf-8")
        except UnicodeDecodeError:
            raise RecordError("non_utf8_text", f"{field} of {self.key!r}") from None


@dataclasses.dataclass
class DatasetInfo:
    """`dataset.json` beside the shards: what the converter made and from what."""

    source_format: str
    num_records: int = 0
    shards: list[str] = dataclasses.field(default_factory=list)
    classes: list[str] = dataclasses.field(default_factory=list)  # ImageFolder class names, by label
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    # Zero-shot prompt templates with one `{}` for the class name, suggested by whoever made the set.
    templates: list[str] = dataclasses.field(default_factory=list)
    # Records whose recaption was missing or blank at the source and was replaced by the alt-text.
    recaption_fallbacks: int = 0
    # What the converter made the set from, so that a conversion of another source into the same directory can
    # be refused: the resolved input paths (None in a dataset.json from before this field, or not from the
    # converter) and the options that shape the records (`--prefix`, `--recaption-field`, ...).
    inputs: Optional[list[str]] = None
    options: dict = dataclasses.field(default_factory=dict)

    def write(self, directory: str | pathlib.Path) -> None:
        path = pathlib.Path(directory) / INFO_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")
        tmp.replace(path)

    @staticmethod
    def read(directory: str | pathlib.Path) -> Optional["DatasetInfo"]:
        path = pathlib.Path(directory) / INFO_FILE
        if not path.exists():
            return None
        fields = {f.name for f in dataclasses.fields(DatasetInfo)}
        return DatasetInfo(**{k: v for k, v in json.loads(path.read_text()).items() if k in fields})


def shard_name(prefix: str, index: int, count: int) -> str:
    return f"{prefix}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"
