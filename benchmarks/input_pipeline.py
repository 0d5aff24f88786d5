"""Input-pipeline throughput: records/s for decode + augment + tokenize, from converted real photos.

    python benchmarks/input_pipeline.py [--records 512] [--image-size 224] [--max-side 512] [--workers 0 1 2]

Builds a webdataset tar of scikit-image's sample photos (JPEG, longest side `--max-side`, re-used round-robin
under distinct keys, with DataComp-like alt-texts and multi-sentence recaptions), converts it with the real
converter, then measures on this host:

1. each stage alone in one thread, per record: read + decode, + train transform (inception crop, jitter,
   grayscale, resize), + tokenize (the whole worker job, `MakeExample`);
2. the pipeline as training runs it (`GrainIterator.host_examples`), for each `--workers` value
   (0 = reader threads in the training process), as records/s overall and per worker process.

Prints one table. Numbers depend on the host's cores and on what else runs; they are what was measured.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the photo encoder the converter tests use
from photo_data import PHOTOS, photo_bytes  # noqa: E402

ALT = "a photo of {} taken outdoors"
RECAPTION = ("The image shows {} in natural light. The colours are vivid and the background is slightly blurred! "
             "Several smaller details are visible near the edges of the frame. The photo looks like a typical "
             "web image with a short caption.")


def build_tar(path: pathlib.Path, records: int, max_side: int) -> None:
    photos = [(name, photo_bytes(name, "JPEG", max_side)) for name, *_ in PHOTOS]
    with tarfile.open(path, "w") as tar:
        for i in range(records):
            name, data = photos[i % len(photos)]
            members = (("jpg", data), ("txt", ALT.format(name).encode()),
                       ("json", json.dumps({"re_caption": RECAPTION.format(name)}).encode()))
            for ext, payload in members:
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def per_record(fn, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - start)


def stage_rates(shards: list[str], image_size: int, n: int) -> list[tuple[str, float]]:
    import grain
    import numpy as np

    from openvision_max.data import transforms
    from openvision_max.data.examples import ExampleSpec, MakeExample
    from openvision_max.data.records import Record

    source = grain.sources.ArrayRecordDataSource(shards)
    n = min(n, len(source))
    make = MakeExample(shards, ExampleSpec(image_size=image_size, context_length=80, caption_length=128,
                                           seed=0, augment=True))
    rng = np.random.default_rng(0)
    return [
        ("read + decode", per_record(lambda i: transforms.decode(Record.decode(source[i]).image, image_size), n)),
        ("+ train transform", per_record(
            lambda i: transforms.train_image(Record.decode(source[i]).image, image_size, rng), n)),
        ("+ tokenize (whole worker job)", per_record(lambda i: make.map((0, i)), n)),
    ]


def pipeline_rate(data_dir: str, image_size: int, workers: int, n: int, batch: int = 32) -> float:
    from openvision_max.config import load_config
    from openvision_max.data.grain_pipeline import GrainIterator
    from openvision_max.mesh.sharding import create_mesh

    cfg = load_config([str(ROOT / "configs/base.yml"), f"image_size={image_size}", f"global_batch_size={batch}",
                       "dataset_type=grain", f"train_data=[{data_dir}]", f"grain_worker_count={workers}"],
                      platform="cpu", num_devices=1)
    it = GrainIterator(cfg, create_mesh(cfg))
    try:
        it.host_examples()  # start-up: worker processes, first reads
        start = time.perf_counter()
        done = 0
        while done < n:
            done += len(it.host_examples())
        return done / (time.perf_counter() - start)
    finally:
        it.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=512, help="records in the converted set (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=224, help="training resolution (default: %(default)s)")
    p.add_argument("--max-side", type=int, default=512, help="photo size, longest side (default: %(default)s)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                   help="grain_worker_count values to measure (default: %(default)s)")
    args = p.parse_args()
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        build_tar(tmp / "photos-00000.tar", args.records, args.max_side)
        subprocess.run([sys.executable, "-m", "openvision_max.data.convert", "--format", "webdataset", "--input",
                        str(tmp / "photos-00000.tar"), "--output", str(tmp / "converted"), "--quiet"],
                       check=True, capture_output=True)
        shards = sorted(str(s) for s in (tmp / "converted").glob("*.array_record"))
        rows = [(name, "1 thread", rate, rate) for name, rate in stage_rates(shards, args.image_size,
                                                                            args.records)]
        for w in args.workers:
            rate = pipeline_rate(str(tmp / "converted"), args.image_size, w, args.records)
            workers = f"{w} worker{'s' if w > 1 else ''}" if w else "threads in-process"
            rows.append(("pipeline (GrainIterator)", workers, rate, rate / max(w, 1)))
    print(f"input pipeline at {args.image_size}px, {args.records} converted JPEG photos (longest side "
          f"{args.max_side}px), {os.cpu_count()} CPUs on this host")
    print(f"{'what':32s} {'how':20s} {'records/s':>10s} {'per worker':>11s}")
    for name, how, rate, per in rows:
        print(f"{name:32s} {how:20s} {rate:10.1f} {per:11.1f}")


if __name__ == "__main__":
    main()
