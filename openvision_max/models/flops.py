"""Analytic model FLOPs (2 per multiply-add) per sample, the numerator of MFU.

Convention (shared/reference/performance.md): weight matmuls 2 x tokens x params; attention scores and
values 4 x layers x attended (query, key) pairs x width, with causal parts counted half; no remat recompute;
training = 3 x forward. Elementwise work (norms, softmax, GELU) is not counted.
"""

from __future__ import annotations

import dataclasses

from openvision_max.config.schema import Config, Tower


def stack_forward(tower: Tower, tokens: int, attended_pairs: float) -> float:
    """Transformer blocks: weight matmuls plus attention scores and values, for one sequence."""
    d, m = tower.width, tower.mlp_dim
    weights = tower.depth * (4 * d * d + 2 * d * m)
    return 2 * tokens * weights + 4 * tower.depth * attended_pairs * d


def vision_forward(cfg: Config) -> float:
    """Image tower per image: patch embedding, blocks over CLS + patches, the pooled head."""
    n, d, p = cfg.derived.num_patches, cfg.vision.width, cfg.patch_size
    t = n + 1
    return 2 * n * (3 * p * p) * d + stack_forward(cfg.vision, t, t * t) + 2 * d * cfg.embed_dim


def text_forward(cfg: Config) -> float:
    """Text tower per text (the embedding lookup costs no FLOPs): blocks and the pooled head."""
    t = cfg.text.context_length
    return stack_forward(cfg.text, t, t * t) + 2 * cfg.text.width * cfg.embed_dim


def decoder_forward(cfg: Config) -> float:
    """Caption decoder per image: input projections, prefix-LM blocks, vocabulary head on the queries."""
    dec = cfg.decoder
    n_img, n_txt, q = cfg.derived.kept_patches, cfg.text.context_length - 1, dec.caption_length
    prefix = n_img + n_txt
    # The prefix attends within itself; each query sees the prefix and (causally, so half) the queries.
    pairs = prefix * prefix + q * prefix + q * q / 2
    projections = 2 * dec.width * (n_img * cfg.vision.width + n_txt * cfg.text.width)
    return projections + stack_forward(dec, prefix + q, pairs) + 2 * q * dec.width * cfg.vocab_size


def caption_lm_forward(cfg: Config) -> float:
    """OpenVision 2's teacher-forced decoder per image: the image projection of the kept tokens, the blocks,
    the vocabulary head on the caption positions (the token embedding is a lookup)."""
    dec = cfg.decoder
    k, t = cfg.derived.kept_patches, dec.caption_length - 1
    projection = 2 * k * cfg.vision.width * dec.width
    head = 2 * t * dec.width * cfg.vocab_size
    if dec.fusion == "concat":  # one causal stack over image + caption tokens
        return projection + stack_forward(dec, k + t, (k + t) ** 2 / 2) + head
    # cross_attn: depth / 2 causal self-attention blocks over the caption, and as many cross-attention
    # blocks: queries, output and MLP on the caption, keys and values on the image tokens, T x K pairs.
    half = dataclasses.replace(dec, depth=dec.depth // 2)
    d, m = dec.width, dec.mlp_dim
    cross = half.depth * (2 * t * (2 * d * d + 2 * d * m) + 2 * k * 2 * d * d + 4 * t * k * d)
    return projection + stack_forward(half, t, t * t / 2) + cross + head


def contrastive_forward(cfg: Config, texts_per_image: int = 2) -> float:
    """Per sample: its image's logits against every text of the global batch, for each text kind."""
    return texts_per_image * 2 * cfg.global_batch_size * cfg.embed_dim


def flops_per_sample(cfg: Config) -> dict[str, float]:
    """Forward FLOPs per image-text sample by part, and `train_total` = 3 x the whole forward.

    A sample holds one image and two texts (alt-text and a sub-caption), so `text` counts two sequences.
    objective=openvision2 has no text tower and no contrastive loss (those parts are 0), and its decoder is
    the teacher-forced one over the kept patch tokens.
    """
    if cfg.objective == "openvision2":
        parts = {"vision": vision_forward(cfg), "text": 0.0, "decoder": caption_lm_forward(cfg), "contrastive": 0.0}
        forward = sum(parts.values())
        return {**parts, "text_per_sequence": 0.0, "forward_total": forward, "train_total": 3 * forward}
    parts = {
        "vision": vision_forward(cfg),
        "text": 2 * text_forward(cfg),
        "decoder": decoder_forward(cfg),
        "contrastive": contrastive_forward(cfg),
    }
    forward = sum(parts.values())
    return {**parts, "text_per_sequence": text_forward(cfg), "forward_total": forward,
            "train_total": 3 * forward}
