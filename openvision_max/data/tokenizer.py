"""OpenVision's text formats over BERT-uncased WordPiece.

Ids (openvision.md): `[PAD]`=0, `[unused0]` serves as `[bos]`=1, `[unused1]` as `[eos]`=2, `[CLS]`=101.

- Encoder ids, length L (80): `[bos] w.. [eos]`, truncated to L-1 with `[eos]` forced last, padded with 0,
  then `[CLS]` appended (the text tower pools the last position).
- Decoder targets, length Q (128): `[bos] w.. [eos]` truncated/padded to Q the same way, then shifted left by
  one with a pad appended; the mask is 1 where the shifted target is a real token.

The vocabulary is vendored (openvision_max/assets/bert_uncased_vocab.txt, see assets/README.md); the WordPiece
itself runs in the Rust `tokenizers` library, so a host tokenises tens of thousands of captions per second.
"""

from __future__ import annotations

import hashlib
import pathlib
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

PAD_ID, BOS_ID, EOS_ID, CLS_ID = 0, 1, 2, 101
VOCAB_PATH = pathlib.Path(__file__).resolve().parents[1] / "assets" / "bert_uncased_vocab.txt"
VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
VOCAB_SIZE = 30522

_SENTENCE_SPLIT = re.compile(r"[.!]+")


def _wordpiece(vocab_path: pathlib.Path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {}
    with open(vocab_path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            vocab[line.rstrip("\n")] = i
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    # BERT-uncased: clean control characters, split CJK characters, lower-case and strip accents.
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # As in every BERT tokenizer (and open_clip's HF tokenizer), literal special tokens in a caption are
    # matched whole rather than split into pieces.
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    return tok


def sub_captions(text: str) -> list[str]:
    """The sentences of a recaption: split on runs of '.' or '!', empty pieces dropped."""
    return [s.strip() for s in _SENTENCE_SPLIT.split(text) if s.strip()]


class Tokenizer:
    """Turns captions into the OpenVision id formats. Picklable (rebuilt in each grain worker)."""

    def __init__(self, vocab_path: str | pathlib.Path = VOCAB_PATH):
        self.vocab_path = pathlib.Path(vocab_path)
        self._tok = _wordpiece(self.vocab_path)

    def __getstate__(self):
        return {"vocab_path": str(self.vocab_path)}

    def __setstate__(self, state):
        self.__init__(state["vocab_path"])

    def word_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Plain WordPiece ids, no special tokens."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def _framed(self, texts: Sequence[str], length: int) -> np.ndarray:
        """`[bos] ids [eos]` truncated to `length` with `[eos]` forced last, padded with 0: int32 [n, length]."""
        out = np.zeros((len(texts), length), np.int32)
        for row, ids in zip(out, self.word_ids(texts)):
            seq = [BOS_ID, *ids[: length - 2], EOS_ID]
            row[: len(seq)] = seq
        return out

    def encoder_ids(self, texts: Sequence[str], context_length: int = 80) -> np.ndarray:
        """Text-tower input: int32 [n, context_length], `[CLS]` last."""
        if context_length < 3:
            raise ValueError(f"context_length must be at least 3, got {context_length}")
        framed = self._framed(texts, context_length - 1)
        return np.concatenate([framed, np.full((len(texts), 1), CLS_ID, np.int32)], axis=1)

    def decoder_targets(self, texts: Sequence[str], caption_length: int = 128) -> tuple[np.ndarray, np.ndarray]:
        """Caption-decoder targets and mask: int32 [n, caption_length] each."""
        if caption_length < 2:
            raise ValueError(f"caption_length must be at least 2, got {caption_length}")
        framed = self._framed(texts, caption_length)
        targets = np.concatenate([framed[:, 1:], np.zeros((len(texts), 1), np.int32)], axis=1)
        return targets, (targets != PAD_ID).astype(np.int32)


def teacher_forcing(batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(inputs, targets, mask) [B, Q - 1] from the pipeline's caption_targets (the framed caption
    `[bos] w.. [eos] pad..` shifted left, a pad appended): inputs are `[bos]` + targets[:-2], i.e. the framed
    caption without its last token; the last target, always a pad, is dropped."""
    targets = batch["caption_targets"]
    t = targets.shape[1] - 1
    bos = jnp.full((targets.shape[0], 1), BOS_ID, targets.dtype)
    return jnp.concatenate([bos, targets[:, :t - 1]], axis=1), targets[:, :t], batch["caption_mask"][:, :t]


def vocab_sha256(path: str | pathlib.Path = VOCAB_PATH) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
