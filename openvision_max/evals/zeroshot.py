"""Zero-shot classification: class prompts embedded by the text tower, images by the image tower.

Per class, every template is filled with the class name, embedded, averaged and re-normalised (CLIP's
prompt ensembling); an image's prediction is the class with the highest cosine similarity. Datasets are
classification sets in the record format (the imagefolder converter, the demo's test splits), read in
order with the eval transform; only embeddings are kept, so memory does not grow with the image count.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import grain
import numpy as np

from openvision_max.data import locate, transforms
from openvision_max.data.records import Record, RecordError
from openvision_max.evals import retrieval
from openvision_max.evals.encoder import Encoder

DEFAULT_TEMPLATES = ("a photo of a {}.",)
TOP_KS = (1, 5)


def class_embeddings(encoder: Encoder, class_names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """float32 [classes, E]: the mean of each class's prompt embeddings, re-normalised."""
    prompts = [t.format(name) for name in class_names for t in templates]
    emb = encoder.embed_texts(prompts).reshape(len(class_names), len(templates), -1).mean(axis=1)
    return emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-8)


class _Load(grain.transforms.Map):
    def __init__(self, image_size: int):
        self.image_size = image_size

    def map(self, data: bytes):
        try:
            record = Record.decode(data)
            return transforms.eval_image(record.image, self.image_size), record.label
        except (RecordError, transforms.DecodeError):
            return None, -1


def labelled_batches(shard_paths: Sequence[str], image_size: int, batch_size: int,
                     max_examples: Optional[int] = None, threads: int = 4
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(uint8 images [<=batch, S, S, 3], int labels) in record order; unreadable records are dropped."""
    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(list(shard_paths)))
    if max_examples:
        ds = ds[:max_examples]
    stream = ds.map(_Load(image_size)).to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                                         prefetch_buffer_size=2 * batch_size))
    images, labels = [], []
    for image, label in stream:
        if image is None or label < 0:
            continue
        images.append(image)
        labels.append(label)
        if len(images) == batch_size:
            yield np.stack(images), np.asarray(labels)
            images, labels = [], []
    if images:
        yield np.stack(images), np.asarray(labels)


def evaluate(encoder: Encoder, shard_paths: Sequence[str], class_names: Sequence[str],
             templates: Sequence[str] = DEFAULT_TEMPLATES, *, max_examples: Optional[int] = None,
             classifier: Optional[np.ndarray] = None) -> dict[str, float]:
    """{"top1", "top5", "examples"}: accuracies as fractions; "top5" only with more than 5 classes.
    `classifier` reuses cached class embeddings."""
    if classifier is None:
        classifier = class_embeddings(encoder, class_names, templates)
    ks = retrieval.reported_ks(TOP_KS, len(class_names) - 1)  # an image's label competes with the others
    hits, n = dict.fromkeys(ks, 0), 0
    for images, labels in labelled_batches(shard_paths, encoder.image_size, encoder.batch_size, max_examples):
        if labels.max() >= len(class_names):
            raise ValueError(f"label {labels.max()} but only {len(class_names)} class names")
        scores = encoder.embed_images(images) @ classifier.T
        ranked = np.argsort(-scores, axis=1)[:, :max(ks)]
        for k in ks:
            hits[k] += int((ranked[:, :k] == labels[:, None]).any(axis=1).sum())
        n += len(labels)
    if n == 0:
        raise locate.DataError(f"no usable labelled records in {', '.join(shard_paths[:3])}")
    return {**{f"top{k}": h / n for k, h in hits.items()}, "examples": float(n)}
