"""Embedding images and texts with a model's parameters: what evaluators and `load_model` build on.

Batches are padded to a fixed size so one compiled program serves every call (no recompiles for the last,
short batch). With a mesh, inputs are split over the batch axes and the (already sharded) parameters are
used where they live. Every process passes the same host arrays (each host reads the whole eval set) and
places only the shards its devices hold; embeddings come back replicated, so every process has all of them.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from openvision_max.config.schema import Config
from openvision_max.data.tokenizer import Tokenizer
from openvision_max.mesh.sharding import activate, batch_sharding
from openvision_max.models import openvision
from openvision_max.models.inputs import normalize_images


class Encoder:
    """`embed_images(uint8 [n, S, S, 3])` and `embed_texts(list[str])` -> L2-normalised float32 [n, E]."""

    def __init__(self, cfg: Config, params: Any, *, mesh: Optional[Mesh] = None, batch_size: int = 64,
                 tokenizer: Optional[Tokenizer] = None):
        self.cfg, self.params, self.mesh = cfg, params, mesh
        self.image_size = cfg.image_size
        self.tokenizer = tokenizer or Tokenizer()
        devices = mesh.devices.size if mesh is not None else 1
        self.batch_size = -(-batch_size // devices) * devices  # a multiple of the devices the batch splits over
        model = openvision.build(cfg)
        shard = {} if mesh is None else {"in_shardings": (None, batch_sharding(mesh)),
                                         "out_shardings": NamedSharding(mesh, PartitionSpec())}
        self._images = jax.jit(lambda p, x: model.apply({"params": p}, normalize_images(x),
                                                        method=model.encode_image), **shard)
        self._ids = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_text), **shard)
        self._logit = jax.jit(lambda p: model.apply({"params": p}, method=model.logit_params))

    def _batched(self, fn, x: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(x), self.batch_size):
            chunk = x[i:i + self.batch_size]
            pad = self.batch_size - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            if self.mesh is None:
                emb = fn(self.params, chunk)
            else:
                # A global array from the host copy: each process supplies the shards of its own devices.
                batch = jax.make_array_from_callback(chunk.shape, batch_sharding(self.mesh), lambda i: chunk[i])
                with activate(self.cfg, self.mesh):
                    emb = fn(self.params, batch)
            out.append(np.asarray(jax.device_get(emb))[:self.batch_size - pad])
        if not out:
            return np.zeros((0, self.cfg.embed_dim), np.float32)
        return np.concatenate(out).astype(np.float32)

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (self.image_size,) * 2 + (3,):
            raise ValueError(f"expected uint8 [n, {self.image_size}, {self.image_size}, 3] images, "
                             f"got {images.dtype} {list(images.shape)}")
        return self._batched(self._images, images)

    def embed_ids(self, ids: np.ndarray) -> np.ndarray:
        return self._batched(self._ids, np.asarray(ids, np.int32))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed_ids(self.tokenizer.encoder_ids(list(texts), self.cfg.text.context_length))

    def logit_scale(self) -> float:
        return float(self._logit(self.params)["logit_scale"])
