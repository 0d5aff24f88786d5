"""Evals of a caption decoder without a text tower (objective=openvision2): caption likelihoods.

- `caption_loss`: the training objective on a held-out set: the mean token cross-entropy of each record's
  recaption (its alt-text where it has none), teacher-forced, over the whole set.
- `zeroshot_generative`: classification by caption likelihood: every class prompt (template x class name)
  is scored as the image's caption; a class's score is the mean over its templates of the prompt's caption
  loss (mean token cross-entropy), and the lowest wins.

The decoder reads the same share of patch tokens as in training (decoder.keep_ratio), drawn from a fixed
key per image index in the eval set, so a figure is the same at every eval and comparable with the
training loss. Batches are padded to a fixed size (one compiled program), and with a mesh split over the
batch axes like the trainer's.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from openvision_max import models
from openvision_max.config.schema import Config
from openvision_max.data import locate, transforms
from openvision_max.data.records import Record, RecordError
from openvision_max.data.tokenizer import Tokenizer, teacher_forcing
from openvision_max.evals import retrieval, zeroshot
from openvision_max.mesh.sharding import activate, batch_sharding
from openvision_max.models import token_masking
from openvision_max.models.inputs import normalize_images

EVAL_MASKING_SEED = 0  # the eval draw of kept tokens: fixed, independent of the run's seed


class CaptionScorer:
    """Caption losses of (image, caption) pairs under a model's parameters (objective=openvision2)."""

    def __init__(self, cfg: Config, params: Any, *, mesh: Optional[Mesh] = None, batch_size: int = 64,
                 tokenizer: Optional[Tokenizer] = None):
        self.cfg, self.params, self.mesh = cfg, params, mesh
        self.image_size = cfg.image_size
        self.tokenizer = tokenizer or Tokenizer()
        devices = mesh.devices.size if mesh is not None else 1
        self.batch_size = -(-batch_size // devices) * devices
        model = models.build(cfg)
        masked = cfg.derived.kept_patches < cfg.derived.num_patches

        def nll(params, images, ids, targets, mask):
            """Per image, per caption: (sum of token NLLs, tokens) for captions [B, P, Q]."""
            tokens = model.apply({"params": params}, normalize_images(images), method=model.image_tokens)
            # One key per eval-set index (not per batch position): the same draw for an image at every eval.
            keys = token_masking.example_keys(EVAL_MASKING_SEED, 0, ids) if masked else None

            def one_caption(xs):
                tgt, msk = xs
                inputs, tgt, msk = teacher_forcing({"caption_targets": tgt, "caption_mask": msk})
                tok = model.apply({"params": params}, tokens, inputs, keys, tgt, method=model.decode) * msk
                return jnp.sum(tok, axis=1), jnp.sum(msk, axis=1).astype(jnp.float32)

            # One caption position at a time over the batch: the logits of all prompts at once would be
            # [B, P, Q, V], gigabytes for a 32,000-word vocabulary.
            sums, counts = jax.lax.map(one_caption, (jnp.swapaxes(targets, 0, 1), jnp.swapaxes(mask, 0, 1)))
            return sums.T, counts.T

        shard = {} if mesh is None else {"in_shardings": (None, *(batch_sharding(mesh),) * 4),
                                         "out_shardings": NamedSharding(mesh, PartitionSpec())}
        self._nll = jax.jit(nll, **shard)

    def targets(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.tokenizer.decoder_targets(list(captions), self.cfg.decoder.caption_length)

    def nll(self, images: np.ndarray, ids: np.ndarray, targets: np.ndarray, mask: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
        """images uint8 [n, S, S, 3], their eval-set indices [n], captions' targets and masks [n, P, Q] ->
        (NLL sums, token counts) float32 [n, P]."""
        out_sums, out_counts = [], []
        for i in range(0, len(images), self.batch_size):
            chunk = [np.asarray(x[i:i + self.batch_size]) for x in (images, ids, targets, mask)]
            n = len(chunk[0])
            pad = self.batch_size - n
            if pad:
                chunk = [np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) for x in chunk]
            chunk[1] = chunk[1].astype(np.int32)
            if self.mesh is None:
                sums, counts = self._nll(self.params, *chunk)
            else:
                placed = [jax.make_array_from_callback(x.shape, batch_sharding(self.mesh), lambda j, x=x: x[j])
                          for x in chunk]
                with activate(self.cfg, self.mesh):
                    sums, counts = self._nll(self.params, *placed)
            out_sums.append(np.asarray(jax.device_get(sums))[:n])
            out_counts.append(np.asarray(jax.device_get(counts))[:n])
        return np.concatenate(out_sums), np.concatenate(out_counts)


class _LoadCaptioned(grain.transforms.Map):
    def __init__(self, image_size: int):
        self.image_size = image_size

    def map(self, data: bytes):
        try:
            record = Record.decode(data)
            caption = record.text("recaption").strip() or record.text("alt_text").strip()
            return transforms.eval_image(record.image, self.image_size), caption
        except (RecordError, transforms.DecodeError):
            return None, ""


def captioned_batches(shard_paths: Sequence[str], image_size: int, batch_size: int,
                      max_examples: Optional[int] = None) -> Iterator[tuple[np.ndarray, list[str]]]:
    """(uint8 images, captions) in record order; unreadable or uncaptioned records are dropped."""
    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(list(shard_paths)))
    if max_examples:
        ds = ds[:max_examples]
    stream = ds.map(_LoadCaptioned(image_size)).to_iter_dataset(
        grain.ReadOptions(num_threads=4, prefetch_buffer_size=2 * batch_size))
    images, captions = [], []
    for image, caption in stream:
        if image is None or not caption:
            continue
        images.append(image)
        captions.append(caption)
        if len(images) == batch_size:
            yield np.stack(images), captions
            images, captions = [], []
    if images:
        yield np.stack(images), captions


def caption_loss(scorer: CaptionScorer, shard_paths: Sequence[str], *, max_examples: Optional[int] = None
                 ) -> dict[str, float]:
    """{"loss": mean token cross-entropy over the set, "tokens", "examples"}."""
    total, tokens, n = 0.0, 0.0, 0
    for images, captions in captioned_batches(shard_paths, scorer.image_size, scorer.batch_size, max_examples):
        targets, mask = scorer.targets(captions)
        sums, counts = scorer.nll(images, np.arange(n, n + len(images)), targets[:, None], mask[:, None])
        total, tokens, n = total + float(sums.sum()), tokens + float(counts.sum()), n + len(images)
    if n == 0:
        raise locate.DataError(f"no usable captioned records in {', '.join(shard_paths[:3])}")
    return {"loss": total / max(tokens, 1.0), "tokens": tokens, "examples": float(n)}


def zeroshot_generative(scorer: CaptionScorer, shard_paths: Sequence[str], class_names: Sequence[str],
                        templates: Sequence[str], *, max_examples: Optional[int] = None) -> dict[str, float]:
    """{"top1", "top5", "examples"}: the classes ranked by their prompts' mean caption loss."""
    prompts = [t.format(name) for name in class_names for t in templates]
    targets, mask = scorer.targets(prompts)
    # Prompts are short: past the longest one's last token every prompt is padding, and a causal decoder's
    # outputs before a position do not depend on it, so those positions are not computed (exact; one token
    # more is kept because teacher forcing drops the last target).
    used = min(int(mask.sum(axis=1).max()) + 1, targets.shape[1])
    targets, mask = targets[:, :used], mask[:, :used]
    c, k = len(class_names), len(templates)
    ks = retrieval.reported_ks(zeroshot.TOP_KS, c - 1)
    hits, n = dict.fromkeys(ks, 0), 0
    for images, labels in zeroshot.labelled_batches(shard_paths, scorer.image_size, scorer.batch_size,
                                                    max_examples):
        if labels.max() >= c:
            raise ValueError(f"label {labels.max()} but only {c} class names")
        b = len(images)
        sums, counts = scorer.nll(images, np.arange(n, n + b), np.broadcast_to(targets, (b, *targets.shape)),
                                  np.broadcast_to(mask, (b, *mask.shape)))
        loss = (sums / np.maximum(counts, 1.0)).reshape(b, c, k).mean(axis=2)  # [b, classes]
        ranked = np.argsort(loss, axis=1, kind="stable")[:, :max(ks)]
        for top in ks:
            hits[top] += int((ranked[:, :top] == labels[:, None]).any(axis=1).sum())
        n += b
    if n == 0:
        raise locate.DataError(f"no usable labelled records in {', '.join(shard_paths[:3])}")
    return {**{f"top{top}": h / n for top, h in hits.items()}, "examples": float(n)}

