"""Image-text retrieval: Recall@K image->text and text->image, several captions per image (COCO, Flickr30k).

    ds = load_karpathy("dataset_flickr30k.json", "flickr30k-images", split="test")
    ds = load_coco_captions("annotations/captions_val2017.json", "val2017")
    evaluate(encoder, ds)  # {"i2t_r1": .., "i2t_r5": .., "i2t_r10": .., "t2i_r1": .., "t2i_r5": .., "t2i_r10": ..}

Ranks are computed on device, one block of queries at a time against all candidates: a [block, candidates]
similarity tile never leaves the device; only one rank per query comes back (no N x M host matrix).
Rank of a query = the number of wrong candidates scoring at least as high as its best correct one; R@K is
the fraction of queries with rank < K. Ties count against the model, so a collapsed model (all embeddings
equal) scores 0, not 1. Image->text: an image is a hit when any of its captions is in the top K. R@K (K > 1)
is left out where no query has K wrong candidates, as it would be 1.0 for any model (t2i_r10 on 10 images or fewer).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import pathlib
from typing import Any, Optional, Sequence

import numpy as np

from openvision_max.data.transforms import eval_image

KS = (1, 5, 10)


@dataclasses.dataclass(frozen=True)
class RetrievalDataset:
    """Images, their captions, and for each caption the index of its image."""
    name: str
    image_paths: list[pathlib.Path]
    captions: list[str]
    caption_image: np.ndarray  # int32 [num_captions], values in [0, num_images)

    def __post_init__(self):
        if len(self.captions) != len(self.caption_image):
            raise ValueError(f"{self.name}: {len(self.captions)} captions but {len(self.caption_image)} image indices")


# --- Loaders ----------------------------------------------------------------------------------------------


def _dataset(name: str, images: list[tuple[pathlib.Path, list[str]]], max_images: Optional[int]) -> RetrievalDataset:
    images = [(path, caps) for path, caps in images if caps][:max_images]
    if not images:
        raise ValueError(f"{name}: no images with captions")
    captions = [c for _, caps in images for c in caps]
    owner = np.concatenate([np.full(len(caps), i, np.int32) for i, (_, caps) in enumerate(images)])
    return RetrievalDataset(name, [path for path, _ in images], captions, owner)


def _read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_coco_captions(annotations: str | os.PathLike, image_dir: str | os.PathLike, *, name: str = "coco",
                       max_images: Optional[int] = None) -> RetrievalDataset:
    """COCO's captions JSON (`captions_val2017.json`: images[].id/file_name, annotations[].image_id/caption)
    with its image folder. Images keep the JSON's order; those without captions are dropped."""
    data = _read_json(annotations)
    by_id: dict[int, tuple[pathlib.Path, list[str]]] = {
        im["id"]: (pathlib.Path(image_dir) / im["file_name"], []) for im in data["images"]}
    for ann in data["annotations"]:
        if ann["image_id"] not in by_id:
            raise ValueError(f"{annotations}: caption {ann.get('id')} refers to unknown image {ann['image_id']}")
        by_id[ann["image_id"]][1].append(ann["caption"].strip())
    return _dataset(name, list(by_id.values()), max_images)


def load_karpathy(path: str | os.PathLike, image_root: str | os.PathLike, *, split: str = "test",
                  name: Optional[str] = None, max_images: Optional[int] = None) -> RetrievalDataset:
    """A Karpathy-split JSON (`dataset_coco.json`, `dataset_flickr30k.json`: images[].filename, optional
    filepath (COCO's val2014/train2014 folder), split, sentences[].raw), the images of one split."""
    data = _read_json(path)
    root = pathlib.Path(image_root)
    images = [(root / im.get("filepath", "") / im["filename"], [s["raw"].strip() for s in im["sentences"]])
              for im in data["images"] if im["split"] == split]
    return _dataset(name or f"{data.get('dataset', 'karpathy')}_{split}", images, max_images)


# --- Recall@K --------------------------------------------------------------------------------------------


@functools.cache
def _rank_fn():
    import jax
    import jax.numpy as jnp

    @jax.jit
    def ranks(queries, candidates, query_ids, candidate_ids):
        """queries [b, E], candidates [M, E], ids: a candidate is correct for a query when the ids are equal.
        -> int32 [b]: wrong candidates scoring >= the query's best correct candidate."""
        sims = jnp.matmul(queries, candidates.T, precision=jax.lax.Precision.HIGHEST)
        correct = query_ids[:, None] == candidate_ids[None, :]
        best = jnp.max(jnp.where(correct, sims, -jnp.inf), axis=1, keepdims=True)
        return jnp.sum((sims >= best) & ~correct, axis=1, dtype=jnp.int32)
    return ranks


def _ranks(queries: np.ndarray, candidates: np.ndarray, query_ids: np.ndarray, candidate_ids: np.ndarray,
           block: int) -> np.ndarray:
    import jax
    fn = _rank_fn()
    candidates, candidate_ids = jax.device_put(candidates), jax.device_put(candidate_ids)
    out = []
    for i in range(0, len(queries), block):
        q, ids = queries[i:i + block], query_ids[i:i + block]
        n = len(q)
        if n < block and len(queries) > block:  # pad the last block: one compiled shape
            q = np.concatenate([q, np.zeros((block - n, q.shape[1]), q.dtype)])
            ids = np.concatenate([ids, np.full(block - n, -1, ids.dtype)])
        out.append(np.asarray(fn(q, candidates, ids, candidate_ids))[:n])
    return np.concatenate(out)


def recalls(image_emb: np.ndarray, text_emb: np.ndarray, text_image: Sequence[int], ks: Sequence[int] = KS,
            block: int = 1024) -> dict[str, float]:
    """Recall@K both ways. image_emb [N, E], text_emb [M, E] (L2-normalised: similarity is the dot product),
    text_image int [M]: the image of each text. -> {"i2t_r1": .., "t2i_r1": .., ...}, fractions in [0, 1];
    R@k (k > 1) only where a query can miss its top k (see reported_ks)."""
    image_emb = np.asarray(image_emb, np.float32)
    text_emb = np.asarray(text_emb, np.float32)
    text_image = np.asarray(text_image, np.int32)
    n = len(image_emb)
    if text_emb.shape[0] != text_image.shape[0]:
        raise ValueError(f"{text_emb.shape[0]} text embeddings but {text_image.shape[0]} text->image indices")
    if text_image.size and (text_image.min() < 0 or text_image.max() >= n):
        raise ValueError(f"text->image indices must lie in [0, {n})")
    captionless = np.setdiff1d(np.arange(n), text_image)
    if captionless.size:
        raise ValueError(f"{captionless.size} images have no caption (e.g. image {captionless[0]})")
    image_ids = np.arange(n, dtype=np.int32)
    i2t = _ranks(image_emb, text_emb, image_ids, text_image, block)
    t2i = _ranks(text_emb, image_emb, text_image, image_ids, block)
    # The most wrong candidates a query has: an image competes with the captions of the other images, a
    # caption with the other images.
    most_wrong = {"i2t": len(text_image) - int(np.bincount(text_image, minlength=n).min()), "t2i": n - 1}
    out = {}
    for direction, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in reported_ks(ks, most_wrong[direction]):
            out[f"{direction}_r{k}"] = float(np.mean(ranks < k))
    return out


def reported_ks(ks: Sequence[int], most_wrong: int) -> list[int]:
    """R@1, and R@k where a query can miss its top k: with at most k - 1 wrong candidates per query, R@k is
    1.0 whatever the model does (as top-5 on fewer than 6 classes), so it is not reported."""
    return [k for k in ks if k == 1 or k <= most_wrong]


# --- End to end ------------------------------------------------------------------------------------------


def _read_images(paths: Sequence[pathlib.Path], size: int, pool: concurrent.futures.Executor) -> np.ndarray:
    return np.stack(list(pool.map(lambda p: eval_image(pathlib.Path(p).read_bytes(), size), paths)))


def evaluate(encoder: Any, dataset: RetrievalDataset, *, ks: Sequence[int] = KS, block: int = 1024,
             workers: int = 8) -> dict[str, float]:
    """Recall@K of `encoder` (evals.encoder.Encoder: embed_images uint8, embed_texts, image_size) on
    `dataset`: images decoded with the eval transform (short side to image_size, centre crop) on `workers`
    threads, embedded a batch at a time. -> {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"},
    less the R@k that cannot be below 1 (t2i_r10 with 10 images or fewer; see reported_ks)."""
    chunk = max(getattr(encoder, "batch_size", 64), 1)
    image_emb = []
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for i in range(0, len(dataset.image_paths), chunk):
            images = _read_images(dataset.image_paths[i:i + chunk], encoder.image_size, pool)
            image_emb.append(encoder.embed_images(images))
    text_emb = encoder.embed_texts(dataset.captions)
    return recalls(np.concatenate(image_emb), text_emb, dataset.caption_image, ks=ks, block=block)
