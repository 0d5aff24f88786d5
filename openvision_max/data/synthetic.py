"""`dataset_type=synthetic`: random batches of the right shapes made on device (no host work, no input stall)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from openvision_max.config.schema import Config
from openvision_max.mesh.sharding import batch_sharding

CLS_ID = 101


def _make(cfg: Config, rng: jax.Array) -> dict[str, jax.Array]:
    b, length, q = cfg.global_batch_size, cfg.text.context_length, cfg.decoder.caption_length
    k_img, k_txt, k_cap, k_len = jax.random.split(rng, 4)
    texts = jax.random.randint(k_txt, (2 * b, length), 3, cfg.vocab_size, jnp.int32)
    texts = texts.at[:, -1].set(CLS_ID)
    lengths = jax.random.randint(k_len, (b, 1), q // 4, q + 1)
    return {
        "images": jax.random.randint(k_img, (b, cfg.image_size, cfg.image_size, 3), 0, 256, jnp.int32
                                     ).astype(jnp.uint8),
        "texts": texts,
        "caption_targets": jax.random.randint(k_cap, (b, q), 3, cfg.vocab_size, jnp.int32),
        "caption_mask": (jnp.arange(q)[None] < lengths).astype(jnp.int32),
    }


class SyntheticIterator:
    """Yields device-generated batches; its state is just the step, so resume is exact. With
    `reuse_example_batch` every step gets the first batch (made once): a benchmark then times no generation,
    and a model can be seen to memorise it."""

    def __init__(self, cfg: Config, mesh: Mesh):
        self._key = jax.random.key(cfg.seed + 1)
        self._step = 0
        self._make = jax.jit(functools.partial(_make, cfg), out_shardings=batch_sharding(mesh))
        self._reused = self._make(jax.random.fold_in(self._key, 0)) if cfg.reuse_example_batch else None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        batch = self._reused or self._make(jax.random.fold_in(self._key, self._step))
        self._step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": self._step}

    def set_state(self, state: dict) -> None:
        self._step = int(state["step"])

    def metrics(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass
