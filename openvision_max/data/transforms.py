"""Image transforms on the host: encoded bytes in, uint8 [size, size, 3] out (normalised later, on device).

Train (openvision.md): inception crop (area 40-100 %, aspect 3/4-4/3, bilinear with antialiasing), colour
jitter with probability 0.8 (brightness, contrast, saturation 0.32, hue 0.08, in random order), grayscale
with probability 0.2, no flip. Eval: resize the short side to `size`, centre crop.

Randomness comes only from the `np.random.Generator` passed in, so a pipeline that derives it from
(seed, record, epoch) is deterministic and resumable.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageEnhance

CROP_AREA = (0.4, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)
JITTER_PROB, GRAYSCALE_PROB = 0.8, 0.2
BRIGHTNESS = CONTRAST = SATURATION = 0.32
HUE = 0.08


class DecodeError(ValueError):
    """The bytes are not an image PIL can decode."""


def decode(data: bytes, min_size: int | None = None) -> Image.Image:
    """Encoded bytes -> RGB PIL image. With `min_size`, JPEGs decode at the smallest DCT scale whose short
    side stays >= min_size (a large speed-up for big photos at low training resolutions)."""
    try:
        img = Image.open(io.BytesIO(data))
        if min_size is not None and img.format == "JPEG":
            w, h = img.size
            scale = min(w, h) / min_size
            if scale >= 2:
                img.draft("RGB", (math.ceil(w / scale), math.ceil(h / scale)))
        img = img.convert("RGB")  # forces the full decode: a truncated file fails here, not later
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DecodeError(str(e) or type(e).__name__) from None
    return img


def inception_crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A random (left, top, right, bottom) box of 40-100 % of the area and aspect 3/4-4/3, tried 10 times,
    else the largest centred box with a clamped aspect (torchvision's RandomResizedCrop rule)."""
    area = width * height
    log_lo, log_hi = math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])
    for _ in range(10):
        target = area * rng.uniform(*CROP_AREA)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < CROP_ASPECT[0]:
        w, h = width, int(round(width / CROP_ASPECT[0]))
    elif ratio > CROP_ASPECT[1]:
        w, h = int(round(height * CROP_ASPECT[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _shift_hue(img: Image.Image, shift: float) -> Image.Image:
    h, s, v = img.convert("HSV").split()
    h = h.point(lambda x: (x + int(round(shift * 255))) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def color_jitter(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast, saturation (factors in [1-0.32, 1+0.32]) and hue (+-0.08 turn), random order."""
    ops = [
        lambda im: ImageEnhance.Brightness(im).enhance(rng.uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS)),
        lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(1 - CONTRAST, 1 + CONTRAST)),
        lambda im: ImageEnhance.Color(im).enhance(rng.uniform(1 - SATURATION, 1 + SATURATION)),
        lambda im: _shift_hue(im, rng.uniform(-HUE, HUE)),
    ]
    for i in rng.permutation(len(ops)):
        img = ops[i](img)
    return img


def train_image(data: bytes, size: int, rng: np.random.Generator) -> np.ndarray:
    """Encoded bytes -> augmented uint8 [size, size, 3]."""
    img = decode(data, min_size=size)
    box = inception_crop_box(img.width, img.height, rng)
    # Crop and resize in one resampling pass; PIL's bilinear filter widens its support when shrinking
    # (antialiasing).
    img = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if rng.uniform() < JITTER_PROB:
        img = color_jitter(img, rng)
    if rng.uniform() < GRAYSCALE_PROB:
        img = img.convert("L").convert("RGB")
    return np.asarray(img, np.uint8)


def eval_image(data: bytes | Image.Image | np.ndarray, size: int) -> np.ndarray:
    """Resize the short side to `size` (bilinear, antialiased), centre crop: uint8 [size, size, 3].

    Rounding follows torchvision's Resize + CenterCrop (long side truncated, crop offset rounded), so an
    exported model preprocessed by open_clip (`resize_mode: shortest`) sees the same pixels as ours.
    """
    if isinstance(data, bytes):
        img = decode(data, min_size=size)
    elif isinstance(data, np.ndarray):
        img = Image.fromarray(np.asarray(data, np.uint8)).convert("RGB")
    else:
        img = data.convert("RGB")
    w, h = img.size
    if w <= h:
        rw, rh = size, int(size * h / w)
    else:
        rw, rh = int(size * w / h), size
    if (rw, rh) != (w, h):
        img = img.resize((rw, rh), Image.Resampling.BILINEAR)
    left, top = int(round((rw - size) / 2.0)), int(round((rh - size) / 2.0))
    return np.asarray(img.crop((left, top, left + size, top + size)), np.uint8)
