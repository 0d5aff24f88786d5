"""Records per second of the webdataset converter on tars of real photos (scikit-image's samples).

    python benchmarks/convert_throughput.py [--samples 3000] [--tars 1] [--workers 1] [--max-side 512]

Builds `--tars` tars of `--samples` samples each (JPEG photos re-used round-robin, .txt alt-text, .json
recaption; the DataComp layout), converts them with the real CLI in a subprocess and prints one JSON line with
the wall time (process start-up included) and records/s. Most of the cost is the decode check of each image.
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the photo encoder the converter tests use
from photo_data import PHOTOS, photo_bytes  # noqa: E402


def build(directory: pathlib.Path, tars: int, samples: int, max_side: int) -> list[pathlib.Path]:
    photos = [photo_bytes(name, "JPEG", max_side) for name, *_ in PHOTOS]
    paths = []
    for t in range(tars):
        path = directory / f"bench-{t:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(samples):
                key = f"{t:05d}{i:09d}"
                for ext, data in (("jpg", photos[i % len(photos)]), ("txt", b"a photo"),
                                  ("json", json.dumps({"re_caption": "A photo. It has two sentences."}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=3000, help="samples per tar (default: %(default)s)")
    p.add_argument("--tars", type=int, default=1, help="input tars (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="converter worker processes (default: %(default)s)")
    p.add_argument("--max-side", type=int, default=512, help="photo size, longest side (default: %(default)s)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        tars = build(tmp, args.tars, args.samples, args.max_side)
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "openvision_max.data.convert", "--format", "webdataset",
                              "--input", *map(str, tars), "--output", str(tmp / "out"), "--quiet",
                              "--workers", str(args.workers)], check=True, capture_output=True, text=True).stdout
        wall = time.perf_counter() - start
    written = json.loads(out.strip().splitlines()[-1])["written"]
    print(json.dumps({"records": written, "workers": args.workers, "wall_s": round(wall, 2),
                      "records_per_s": round(written / wall, 1)}))


if __name__ == "__main__":
    main()
