"""What a source reader hands the converter, and the checks every sample passes before it becomes a record.

Skip reasons (the keys of the converter's `skipped` report; the pipeline's `data/skipped_<reason>` metrics use
the same words):

    missing_image      no image member / empty cell / a path that does not exist
    undecodable_image  PIL cannot open and fully decode the bytes
    missing_caption    no alt-text at all (webdataset: no .txt member; table: a null cell)
    empty_caption      an alt-text that is empty or only whitespace
    non_utf8_text      an alt-text or recaption that is not valid UTF-8
    bad_json           (webdataset) a .json member that does not parse as a JSON object
    truncated_member   (webdataset) a member cut off by the end of the tar

The recaption is optional: a sample whose recaption is missing or blank keeps its alt-text as the recaption.
Dropping such a sample would throw away a good image-text pair because one of two texts is absent, and the
alt-text is the natural stand-in (OpenVision's second contrastive text and decoder target both degrade to it).
The substitution is not a skip; it is counted separately as `recaption_fallbacks` in the shard sidecars and
dataset.json, so a source where it is common stands out. Texts are stored stripped of surrounding whitespace.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from typing import Any, Optional, Union

from PIL import Image

from openvision_max.data.records import Record, RecordError

Text = Union[str, bytes, None]


class UsageError(Exception):
    """An input problem found before any work starts; the message names the path."""


@dataclasses.dataclass
class Sample:
    key: str
    image: Optional[bytes]        # None: absent at the source
    alt_text: Text = None         # None: absent; bytes are checked for UTF-8, str is trusted
    recaption: Text = None
    label: int = -1
    needs_caption: bool = True    # False for classification sets, which carry no texts


@dataclasses.dataclass
class Job:
    shard: str                    # output file name, see records.shard_name
    source: Any                   # JSON-able; what the shard is made from (also the sidecar's staleness check)


@dataclasses.dataclass
class Plan:
    jobs: list[Job]
    classes: list[str] = dataclasses.field(default_factory=list)


def check_image(data: Optional[bytes]) -> None:
    """RecordError unless `data` is a complete image PIL can decode."""
    if not data:
        raise RecordError("missing_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. PIL's palette-transparency and EXIF warnings
            with Image.open(io.BytesIO(data)) as im:
                # A JPEG decoded at 1/8 scale still runs the entropy decoder over the whole stream, so it
                # catches cut-off and corrupt files at a fraction of the cost of a full-size decode.
                im.draft("RGB", (1, 1))
                im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise RecordError("undecodable_image", f"{type(e).__name__}: {e}") from None


def _text_bytes(value: Text, field: str, key: str) -> Optional[bytes]:
    """UTF-8 bytes of a text stripped of surrounding whitespace; None if absent."""
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise RecordError("non_utf8_text", f"{field} of {key!r}") from None
    return value.strip().encode("utf-8")


def to_record(sample: Sample) -> tuple[Record, bool]:
    """The record for a sample and whether its recaption fell back to the alt-text; RecordError to skip it.

    Cheap checks run first, the image decode last; a sample with several faults is counted once, under the
    first of: missing_image, non_utf8_text, missing_caption, empty_caption, undecodable_image.
    """
    if not sample.image:
        raise RecordError("missing_image", sample.key)
    alt = _text_bytes(sample.alt_text, "alt_text", sample.key)
    recap = _text_bytes(sample.recaption, "recaption", sample.key)
    fell_back = False
    if sample.needs_caption:
        if alt is None:
            raise RecordError("missing_caption", sample.key)
        if not alt:
            raise RecordError("empty_caption", sample.key)
        if not recap:
            recap, fell_back = alt, True
    check_image(sample.image)
    return Record(key=sample.key, image=sample.image, alt_text=alt or b"", recaption=recap or b"",
                  label=sample.label), fell_back
