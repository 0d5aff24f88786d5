"""A classification set laid out as `ROOT/<class>/<...>/<image>` (torchvision's ImageFolder layout).

Classes are the sorted names of ROOT's subfolders (hidden ones excluded), the label is a class's index in that
list, and the key is the image's path relative to ROOT. Files are found recursively below each class folder,
in sorted order, and picked by extension (`IMAGE_EXTENSIONS`, case-insensitive), so a README or a `.DS_Store`
beside the images is ignored rather than counted as an undecodable image. Records carry no texts; the class
names go to dataset.json for zero-shot evaluation.
"""

from __future__ import annotations

import pathlib
from typing import Iterator, Sequence

from openvision_max.data.records import RecordError, shard_name
from openvision_max.data.sources.sample import Job, Plan, Sample, UsageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"})


def _images(class_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in class_dir.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file())


def plan(inputs: Sequence[pathlib.Path], prefix: str, records_per_shard: int) -> Plan:
    if len(inputs) != 1 or not inputs[0].is_dir():
        raise UsageError(f"imagefolder takes one root directory, got {', '.join(map(str, inputs))}")
    root = inputs[0].resolve()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UsageError(f"no class subfolders in {root}")
    items = [(p.relative_to(root).as_posix(), label)
             for label, name in enumerate(classes) for p in _images(root / name)]
    if not items:
        raise UsageError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
    n = -(-len(items) // records_per_shard)
    jobs = [Job(shard_name(prefix, i, n),
                {"root": str(root), "items": items[i * records_per_shard:(i + 1) * records_per_shard]})
            for i in range(n)]
    return Plan(jobs, classes)


def read(source: dict) -> Iterator[Sample | RecordError]:
    root = pathlib.Path(source["root"])
    for rel, label in source["items"]:
        try:
            image = (root / rel).read_bytes()
        except OSError:
            image = None
        yield Sample(key=rel, image=image, label=label, needs_caption=False)
