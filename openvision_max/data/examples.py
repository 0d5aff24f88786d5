"""Record -> training example, the work grain's worker processes do: read, decode, augment, tokenize.

An example is a dict of numpy arrays:

    image            uint8 [S, S, 3]
    texts            int32 [2, context_length]   alt-text, then one sentence of the recaption
    caption_targets  int32 [caption_length]      the full recaption, shifted (see tokenizer.py)
    caption_mask     int32 [caption_length]
    key              str                         the record's key (kept on the host)

A record that cannot be used becomes {"skipped": reason} instead of raising, so one bad image never stops a
run; the host counts these per reason (metrics `data/skipped_<reason>`).

Randomness (crop, jitter, which sentence) is drawn from a generator seeded by (seed, record index, epoch):
the same record in the same epoch is always the same example, whatever the host count, worker count or
restarts in between.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

from openvision_max.data import transforms
from openvision_max.data.records import Record, RecordError
from openvision_max.data.tokenizer import Tokenizer, sub_captions


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
    image_size: int
    context_length: int
    caption_length: int
    seed: int
    augment: bool


def sample_rng(seed: int, record: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, record, epoch])


class MakeExample(grain.transforms.Map):
    """(epoch, record index) -> example dict, or {"skipped": reason}."""

    def __init__(self, shards: Sequence[str], spec: ExampleSpec):
        self.shards, self.spec = list(shards), spec
        self._source = None
        self._tokenizer = None

    def __getstate__(self):  # the reader and tokenizer are rebuilt in each worker process
        return {"shards": self.shards, "spec": self.spec}

    def __setstate__(self, state):
        self.__init__(state["shards"], state["spec"])

    @property
    def source(self):
        if self._source is None:
            self._source = grain.sources.ArrayRecordDataSource(self.shards)
        return self._source

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer()
        return self._tokenizer

    def map(self, element: tuple[int, int]) -> dict[str, Any]:
        epoch, index = element
        try:
            return self.example(Record.decode(self.source[index]), sample_rng(self.spec.seed, index, epoch))
        except RecordError as e:
            return {"skipped": e.reason}
        except transforms.DecodeError:
            return {"skipped": "undecodable_image"}

    def example(self, record: Record, rng: np.random.Generator) -> dict[str, Any]:
        s = self.spec
        alt = record.text("alt_text").strip()
        recaption = record.text("recaption").strip()
        if not alt:
            raise RecordError("empty_caption", record.key)
        # A record without a recaption (plain alt-text data) uses its alt-text for both other roles.
        recaption = recaption or alt
        sentences = sub_captions(recaption) or [recaption]
        sub = sentences[int(rng.integers(len(sentences)))]
        if s.augment:
            image = transforms.train_image(record.image, s.image_size, rng)
        else:
            image = transforms.eval_image(record.image, s.image_size)
        texts = self.tokenizer.encoder_ids([alt, sub], s.context_length)
        targets, mask = self.tokenizer.decoder_targets([recaption], s.caption_length)
        return {"image": image, "texts": texts, "caption_targets": targets[0], "caption_mask": mask[0],
                "key": record.key}
