"""A small webdataset tar of real photos (scikit-image's sample images), shared by converter and pipeline tests.

`make_photo_webdataset(directory)` writes an img2dataset-style tar (`<key>.jpg|png|webp`, `<key>.txt`,
`<key>.json` with `re_caption`) of six photos encoded as JPEG, PNG and WebP, one of them with its members out
of order and one without a .json (its recaption falls back to the alt-text), plus two broken samples:
`broken_jpeg` (the first half of a JPEG) and `empty_caption` (a whitespace-only .txt). It returns the tar's path
and what a correct conversion must produce: `expected[key] = {"image": bytes, "alt_text": str, "recaption": str}`
for the six good samples, and `skipped = {"undecodable_image": 1, "empty_caption": 1}`.
"""

from __future__ import annotations

import io
import json
import pathlib
import tarfile

import numpy as np
from PIL import Image

# name, format, alt-text, recaption (None: no .json member)
PHOTOS = [
    ("astronaut", "JPEG", "astronaut portrait with flag",
     "A woman in an orange spacesuit smiles at the camera. An American flag hangs behind her. She holds a "
     "white helmet in her arm."),
    ("chelsea", "PNG", "tabby cat chelsea",
     "A close-up of a tabby cat with green eyes. The cat looks to the left of the frame. Its fur is striped."),
    ("coffee", "WEBP", "cup of coffee on a saucer",
     "A white cup of coffee sits on a saucer. A spoon rests beside it. The table is red."),
    ("rocket", "JPEG", "rocket on the launch pad",
     "A rocket stands on its launch pad under a clear sky. Support towers flank it on both sides."),
    ("camera", "PNG", "man with a camera on a tripod",
     "A black and white photo of a man behind a camera on a tripod. He wears a dark coat. Buildings stand "
     "in the distance."),
    ("horse", "JPEG", "silhouette of a horse", None),
]
SKIPPED = {"undecodable_image": 1, "empty_caption": 1}
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def photo_bytes(name: str, fmt: str, max_side: int = 160) -> bytes:
    """A scikit-image sample photo, shrunk (keeps tests fast) and encoded; deterministic."""
    import skimage.data

    array = getattr(skimage.data, name)()
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    image = Image.fromarray(array).convert("RGB")
    image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, format=fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_700_000_000  # fixed mtime: the tar's bytes are deterministic
    tar.addfile(info, io.BytesIO(data))


def make_photo_webdataset(directory: str | pathlib.Path, name: str = "photos-00000.tar",
                          key_prefix: str = "") -> tuple[pathlib.Path, dict[str, dict]]:
    """Write the tar into `directory`; returns (tar path, expected records by key). See the module docstring."""
    path = pathlib.Path(directory) / name
    expected, members = {}, []
    for i, (photo, fmt, alt, recap) in enumerate(PHOTOS):
        key = f"{key_prefix}{i:09d}"
        image = photo_bytes(photo, fmt)
        sample = [(f"{key}.{_EXT[fmt]}", image), (f"{key}.txt", alt.encode())]
        if recap is not None:
            meta = {"url": f"https://example.com/{photo}", "caption": alt, "re_caption": recap, "status": "success"}
            sample.append((f"{key}.json", json.dumps(meta).encode()))
        members.append(sample)
        expected[key] = {"image": image, "alt_text": alt, "recaption": recap if recap is not None else alt}
    # Out of order: chelsea's .txt first, and its .json only after the next sample.
    chelsea = members[1]
    members[1] = [chelsea[1], chelsea[0]]
    members[2] = members[2] + [chelsea[2]]

    good_jpeg = photo_bytes("coffee", "JPEG")
    members.append([(f"{key_prefix}broken_jpeg.jpg", good_jpeg[: len(good_jpeg) // 2]),
                    (f"{key_prefix}broken_jpeg.txt", b"a cut-off jpeg")])
    members.append([(f"{key_prefix}empty_caption.png", photo_bytes("chelsea", "PNG", 64)),
                    (f"{key_prefix}empty_caption.txt", b"  \n"),
                    (f"{key_prefix}empty_caption.json", b'{"re_caption": "A cat."}')])
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in members:
            for member_name, data in sample:
                _add(tar, member_name, data)
    return path, expected


def png(seed: int, size=(40, 30)) -> bytes:
    """A PNG of uniform noise, `size` = (width, height), reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(directory: pathlib.Path, n: int = 24, shards: int = 3, bad: bool = False) -> list[str]:
    """`n` noise PNGs with numbered captions as `shards` ArrayRecord shards (plus, with `bad`, three records
    the pipeline must skip: an undecodable image, an empty alt-text, non-UTF-8 text); returns the keys in
    shard order."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from openvision_max.data.records import Record, shard_name
    directory.mkdir(parents=True, exist_ok=True)
    records = [Record(key=f"k{i:03d}", image=png(i), alt_text=f"a picture number {i}".encode(),
                      recaption=f"A noisy picture. It has number {i}! The end.".encode()) for i in range(n)]
    if bad:
        records += [Record("k-bad-image", b"not an image", b"alt", b"re"),
                    Record("k-empty", png(1), b"   ", b"re"),
                    Record("k-utf8", png(2), b"\xff\xfe bad", b"re")]
    keys = []
    for s in range(shards):
        w = ArrayRecordWriter(str(directory / shard_name("train", s, shards)), "group_size:1")
        for r in records[s::shards]:
            w.write(r.encode())
            keys.append(r.key)
        w.close()
    return keys
