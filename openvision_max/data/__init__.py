"""Input pipelines. A batch is a dict of global arrays sharded over the batch axes:

    images          uint8 [B, H, W, 3]          normalised on device by the train step
    texts           int32 [2B, context_length]  B alt-texts, then B sub-captions
    caption_targets int32 [B, caption_length]   the recaption shifted left by one
    caption_mask    int32 [B, caption_length]   1 where caption_targets is a real token

An iterator also has get_state()/set_state() (JSON, saved in checkpoints), metrics() (counters for the
log) and close().
"""

from __future__ import annotations

from jax.sharding import Mesh

from openvision_max.config.schema import Config


def create_iterator(cfg: Config, mesh: Mesh):
    """The iterator `dataset_type` names."""
    if cfg.dataset_type == "grain":
        from openvision_max.data.grain_pipeline import GrainIterator
        return GrainIterator(cfg, mesh, augment=cfg.train_augment)
    from openvision_max.data.synthetic import SyntheticIterator
    return SyntheticIterator(cfg, mesh)
