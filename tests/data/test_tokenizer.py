"""The OpenVision id formats over BERT-uncased WordPiece, checked against independent implementations."""

import random

import numpy as np
import pytest

from openvision_max.data import tokenizer as tk

WORDS = ["a", "photo", "of", "the", "cat", "dog", "Astronaut", "rocket-launch", "coffee", "naïve", "café",
         "résumé", "São", "Paulo", "東京", "タワー", "über", "straße", "e-mail", "U.S.A.", "3.14", "1,000",
         "#hashtag", "@user", "(brackets)", "[square]", "don't", "it's", "unbelievably", "antidisestablishment",
         "x" * 120, "emoji🙂", "tab\there", "new\nline", "  spaces  ", "Ω", "mañana", "ﬁ", "zero\u200bwidth"]


def captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = ["", ".", "!!!", "a", "A  B", "[CLS] [PAD] [unused0]"]
    while len(out) < n:
        length = rng.choice([1, 3, 8, 20, 60, 150])
        words = [rng.choice(WORDS) for _ in range(length)]
        sep = rng.choice([" ", " ", ", ", ". "])
        out.append(sep.join(words) + rng.choice(["", ".", "!", "?"]))
    return out


@pytest.fixture(scope="module")
def tok():
    return tk.Tokenizer()


def test_vocab_is_the_vendored_bert_uncased(tok):
    assert tk.vocab_sha256() == tk.VOCAB_SHA256
    lines = tk.VOCAB_PATH.read_text(encoding="utf-8").splitlines()
    assert len(lines) == tk.VOCAB_SIZE
    assert (lines[tk.PAD_ID], lines[tk.BOS_ID], lines[tk.EOS_ID], lines[tk.CLS_ID]) == (
        "[PAD]", "[unused0]", "[unused1]", "[CLS]")


def frame(ids: list[int], length: int) -> list[int]:
    seq = [tk.BOS_ID] + ids + [tk.EOS_ID]
    if len(seq) > length:
        seq = seq[:length - 1] + [tk.EOS_ID]
    return seq + [tk.PAD_ID] * (length - len(seq))


def test_encoder_ids_match_independent_wordpiece(tok):
    from tokenizers import BertWordPieceTokenizer

    texts = captions(1000)
    ref = BertWordPieceTokenizer(str(tk.VOCAB_PATH), lowercase=True)
    expected = np.array([frame(e.ids, 79) + [tk.CLS_ID]
                         for e in ref.encode_batch(texts, add_special_tokens=False)], np.int32)
    got = tok.encoder_ids(texts, 80)
    assert got.shape == (1000, 80) and got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)
    # The set exercises truncation (eos forced last), padding, unknown words and accents.
    assert (got[:, 78] == tk.EOS_ID).sum() > 50 and (got[:, 78] == tk.PAD_ID).sum() > 50
    assert (got == 100).any()  # [UNK]


def test_encoder_ids_match_transformers_slow_bert_if_installed(tok):
    transformers = pytest.importorskip("transformers")
    ref = transformers.BertTokenizer(str(tk.VOCAB_PATH), do_lower_case=True)
    texts = captions(300, seed=1)
    expected = np.array([frame(ref.encode(t, add_special_tokens=False), 79) + [tk.CLS_ID] for t in texts])
    np.testing.assert_array_equal(tok.encoder_ids(texts, 80), expected)


def test_decoder_targets_are_shifted_with_mask(tok):
    texts = ["A red circle. Two blue squares!", "word " * 200]
    targets, mask = tok.decoder_targets(texts, 128)
    framed = np.array([frame(ids, 128) for ids in tok.word_ids(texts)])
    np.testing.assert_array_equal(targets[:, :-1], framed[:, 1:])
    assert (targets[:, -1] == 0).all()
    np.testing.assert_array_equal(mask, (targets != 0).astype(np.int32))
    assert targets[1, -2] == tk.EOS_ID and mask[1].sum() == 127
    n = len(tok.word_ids(texts[:1])[0])
    assert mask[0].sum() == n + 1 and targets[0, n] == tk.EOS_ID


def test_sub_captions_split_on_full_stops_and_bangs():
    assert tk.sub_captions("A cat. It sleeps!! On a mat...") == ["A cat", "It sleeps", "On a mat"]
    assert tk.sub_captions("no punctuation") == ["no punctuation"]
    assert tk.sub_captions("...") == []


def test_tokenizer_pickles(tok):
    import pickle
    again = pickle.loads(pickle.dumps(tok))
    np.testing.assert_array_equal(again.encoder_ids(["a cat"]), tok.encoder_ids(["a cat"]))
