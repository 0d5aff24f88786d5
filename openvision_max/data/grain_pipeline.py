"""`dataset_type=grain`: image-text batches from ArrayRecord shards, as global jax Arrays.

The order of the whole stream is fixed by the seed alone: a global permutation of all records per epoch
(grain's index shuffle, reseeded each epoch), repeated forever. Host h of n takes every n-th element of that
stream, so hosts read disjoint records that together cover each epoch, with no coordination. Workers
(`grain_worker_count` processes, or reader threads in-process when 0) turn (epoch, record) into examples
(`examples.MakeExample`); the host assembles its share of each global batch from the valid ones, counting
the skipped, and puts it on the devices with the mesh's batch sharding.

The iterator state (grain's position plus the skip counters) is JSON and goes into every checkpoint, so a
resumed run sees exactly the records an uninterrupted run would.
"""

from __future__ import annotations

import collections
import sys
from typing import Any, Optional

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from openvision_max.config.schema import Config
from openvision_max.data import locate
from openvision_max.data.examples import ExampleSpec, MakeExample
from openvision_max.mesh.sharding import batch_sharding

FIELDS = ("image", "texts", "caption_targets", "caption_mask")


class _WithEpoch(grain.transforms.MapWithIndex):
    """Position in the repeated stream -> (epoch, record index)."""

    def __init__(self, num_records: int):
        self.num_records = num_records

    def map_with_index(self, index: int, element: int) -> tuple[int, int]:
        return index // self.num_records, int(element)


def _ensure_absl_flags_parsed() -> None:
    # grain's worker processes read absl flags; outside an absl app they are unparsed and the workers fail.
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def example_stream(cfg: Config, shard_paths: list[str], *, process_index: int, process_count: int,
                   augment: bool = True) -> grain.IterDataset:
    """This host's infinite stream of examples (or skip markers)."""
    num_records = len(grain.sources.ArrayRecordDataSource(shard_paths))
    if num_records == 0:
        raise locate.DataError(f"the training shards hold no records: {', '.join(shard_paths[:3])}")
    spec = ExampleSpec(image_size=cfg.image_size, context_length=cfg.text.context_length,
                       caption_length=cfg.decoder.caption_length, seed=cfg.seed, augment=augment)
    ds = grain.MapDataset.range(num_records).seed(cfg.seed).shuffle().repeat()
    ds = ds.map_with_index(_WithEpoch(num_records))[process_index::process_count]
    ds = ds.map(MakeExample(shard_paths, spec))
    stream = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.grain_read_threads,
                                                  prefetch_buffer_size=cfg.grain_prefetch_buffer_size))
    if cfg.grain_worker_count > 0:
        _ensure_absl_flags_parsed()
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.grain_worker_count, per_worker_buffer_size=cfg.grain_worker_buffer_size))
    return stream


def _to_contract(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-example layout -> the batch contract (texts [2B, L]: all alt-texts, then all sub-captions)."""
    texts = batch["texts"]
    return {"images": batch["image"],
            "texts": jnp.concatenate([texts[:, 0], texts[:, 1]], axis=0),
            "caption_targets": batch["caption_targets"], "caption_mask": batch["caption_mask"]}


class GrainIterator:
    """Global batches for the train loop; `metrics()` adds the skip counters to the log."""

    def __init__(self, cfg: Config, mesh: Mesh, *, process_index: Optional[int] = None,
                 process_count: Optional[int] = None, augment: bool = True):
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if cfg.global_batch_size % self.process_count:
            raise locate.DataError(f"global_batch_size={cfg.global_batch_size} is not divisible by the "
                                       f"{self.process_count} hosts")
        self.host_batch = cfg.global_batch_size // self.process_count
        self.shard_paths = locate.resolve(cfg.train_data, cfg.data_cache_dir)
        self._stream = example_stream(cfg, self.shard_paths, process_index=self.process_index,
                                      process_count=self.process_count, augment=augment)
        self._it = iter(self._stream)
        self.skipped: collections.Counter[str] = collections.Counter()
        self.last_keys: list[str] = []
        self._sharding = batch_sharding(mesh)
        self._global_shape = {
            "image": (cfg.global_batch_size, cfg.image_size, cfg.image_size, 3),
            "texts": (cfg.global_batch_size, 2, cfg.text.context_length),
            "caption_targets": (cfg.global_batch_size, cfg.decoder.caption_length),
            "caption_mask": (cfg.global_batch_size, cfg.decoder.caption_length),
        }
        self._contract = jax.jit(_to_contract, out_shardings=self._sharding)
        self._warned = False

    def __iter__(self):
        return self

    def host_examples(self) -> list[dict[str, Any]]:
        """The next `host_batch` valid examples of this host (skipped records counted, not returned)."""
        out: list[dict[str, Any]] = []
        while len(out) < self.host_batch:
            example = next(self._it)
            if "skipped" in example:
                self.skipped[example["skipped"]] += 1
                if not self._warned:
                    print(f"data: skipping unusable records (first: {example['skipped']}); counted in "
                          "metrics as data/skipped_<reason>", file=sys.stderr, flush=True)
                    self._warned = True
                continue
            out.append(example)
        return out

    def __next__(self) -> dict[str, jax.Array]:
        examples = self.host_examples()
        self.last_keys = [e["key"] for e in examples]
        local = {k: np.stack([e[k] for e in examples]) for k in FIELDS}
        arrays = {k: jax.make_array_from_process_local_data(self._sharding, v, self._global_shape[k])
                  for k, v in local.items()}
        return self._contract(arrays)

    def metrics(self) -> dict[str, float]:
        return {f"data/skipped_{reason}": float(n) for reason, n in sorted(self.skipped.items())}

    def get_state(self) -> dict[str, Any]:
        return {"grain": self._it.get_state(), "skipped": dict(self.skipped),
                "host": [self.process_index, self.process_count]}

    def set_state(self, state: dict[str, Any]) -> None:
        # Each host's position is its own: another host's would repeat that host's records and skip its own.
        saved = state.get("host")  # absent in states saved before hosts were recorded
        if saved is not None and list(saved) != [self.process_index, self.process_count]:
            raise locate.DataError(f"the data iterator state of host {saved[0]} of {saved[1]} cannot resume host "
                                   f"{self.process_index} of {self.process_count}")
        self._it.set_state(state["grain"])
        self.skipped = collections.Counter(state.get("skipped", {}))

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
