"""scikit-learn's 1,797 real handwritten digits (UCI optdigits, 8x8, 17 grey levels) as captioned PNGs.

They ship inside the scikit-learn wheel, so the demo needs no download. Each 8x8 image is mapped linearly
from its 0..16 ink levels to 0..255 (white strokes on black, as the data comes) and upscaled bicubically to
`SIZE`x`SIZE` RGB, the shape of the other demo sets. The split is seeded and stratified (scikit-learn's
`train_test_split`): `TEST_SIZE` images held out for zero-shot evaluation, the rest for training. All records
carry their label (0-9); `CLASSES` are the number words the captions use.
"""

from __future__ import annotations

import io
from typing import Iterator

import numpy as np
from PIL import Image

from openvision_max.data.records import Record

SIZE = 64
TEST_SIZE = 500
CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a handwritten digit {}.", "the digit {}, written by hand.", "a handwritten {}."]
_ALT = ["a handwritten digit {}", "a handwritten digit {}", "handwritten digit {}", "the digit {}, handwritten"]
_SECOND = ["It is drawn in white strokes on a black background.",
           "The strokes are white on a plain black background.",
           "White ink traces the digit against black."]
_THIRD = ["The image is a blurry, low resolution scan.", "The strokes are thick and soft edged.", ""]


def split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels); images float [n, 8, 8] in 0..16."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_x, test_x, train_y, test_y = train_test_split(digits.images, digits.target, test_size=TEST_SIZE,
                                                        random_state=seed, stratify=digits.target)
    return train_x, train_y, test_x, test_y


def png(image8: np.ndarray) -> bytes:
    grey = Image.fromarray(np.round(image8 * (255 / 16)).astype(np.uint8))  # 2-D uint8: mode L
    out = io.BytesIO()
    grey.resize((SIZE, SIZE), Image.Resampling.BICUBIC).convert("RGB").save(out, format="PNG")
    return out.getvalue()


def records(images: np.ndarray, labels: np.ndarray, name: str, seed: int) -> Iterator[Record]:
    """Captioned records; the caption wording varies with a generator seeded by `seed`."""
    rng = np.random.default_rng(seed)
    for i, (image, label) in enumerate(zip(images, labels)):
        word = CLASSES[int(label)]
        alt = _ALT[rng.integers(len(_ALT))].format(word)
        sentences = [f"A handwritten digit {word}.", _SECOND[rng.integers(len(_SECOND))],
                     _THIRD[rng.integers(len(_THIRD))]]
        yield Record(key=f"{name}-{i:05d}", image=png(image), alt_text=alt.encode(),
                     recaption=" ".join(s for s in sentences if s).encode(), label=int(label))
