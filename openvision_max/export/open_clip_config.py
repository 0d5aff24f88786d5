"""The JSON configs of an export: `open_clip_config.json` (open_clip's hub layout) and the decoder's config.

Values are chosen so that open_clip 3.3 builds exactly our towers (checked against its source, model.py and
transformer.py):
- vision: `no_ln_pre` (no LayerNorm before the blocks), `pool_type: avg` (mean over patch tokens, CLS
  excluded) with `final_ln_after_pool` (LayerNorm on the pooled vector), exact GELU, LayerNorm eps 1e-6,
  a `learnable` position embedding slot that the export fills with our fixed 2-D sin-cos table;
- text: `no_causal_mask` (bidirectional, pads attended), `pool_type: last` (the [CLS] the tokenizer appends),
  GELU with the tanh approximation (`act_kwargs`), eps 1e-6, BERT WordPiece through open_clip's HFTokenizer
  in `tokenizer_mode: clips` ([bos] ids [eos], pad 0, [CLS] last);
- preprocess: ImageNet mean/std, bilinear, `resize_mode: shortest` = resize the short side then centre crop,
  which is our eval transform (`squash`, the original's export choice, distorts non-square images).
"""

from __future__ import annotations

import math
from typing import Any

from openvision_max.config.schema import Config
from openvision_max.models.layers import LN_EPS

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# open_clip only needs a non-empty name to choose its HFTokenizer; with `local-dir:` it always reads the
# tokenizer files from the directory itself. On the HF Hub, set this to the repository id.
TOKENIZER_NAME = "openvision-max-bert-uncased-clips"


def mlp_ratio(mlp_dim: int, width: int) -> float:
    """A ratio for which open_clip's `int(width * mlp_ratio)` gives exactly `mlp_dim` (So400m: 4304/1152)."""
    ratio = mlp_dim / width
    for _ in range(4):
        if int(width * ratio) == mlp_dim:
            return ratio
        ratio = math.nextafter(ratio, math.inf)  # past a product that rounds just below mlp_dim
    raise ValueError(f"no float mlp_ratio gives mlp_dim={mlp_dim} at width={width}")


def open_clip_config(cfg: Config) -> dict[str, Any]:
    """{"model_cfg": ..., "preprocess_cfg": ...} for `create_model_from_pretrained('local-dir:DIR')`."""
    norm = {"eps": LN_EPS}
    model_cfg: dict[str, Any] = {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
            "layers": cfg.vision.depth,
            "width": cfg.vision.width,
            "head_width": cfg.vision.head_dim,
            "mlp_ratio": mlp_ratio(cfg.vision.mlp_dim, cfg.vision.width),
            "no_ln_pre": True,
            "pool_type": "avg",
            "final_ln_after_pool": True,
            "pos_embed_type": "learnable",
            "norm_kwargs": norm,
        },
        "text_cfg": {
            "context_length": cfg.text.context_length,
            "vocab_size": cfg.vocab_size,
            "hf_tokenizer_name": TOKENIZER_NAME,
            "tokenizer_mode": "clips",
            "width": cfg.text.width,
            "heads": cfg.text.num_heads,
            "layers": cfg.text.depth,
            "mlp_ratio": mlp_ratio(cfg.text.mlp_dim, cfg.text.width),
            "no_causal_mask": True,
            "pool_type": "last",
            "act_kwargs": {"approximate": "tanh"},
            "norm_kwargs": norm,
        },
    }
    if cfg.contrastive_loss == "sigmoid":
        model_cfg["init_logit_bias"] = -10.0  # only makes open_clip create `logit_bias`; the value is loaded
    preprocess_cfg = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear",
                      "resize_mode": "shortest"}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


def architecture_mismatches(found: dict[str, Any], cfg: Config) -> list[str]:
    """What in an open_clip `model_cfg` differs from the towers `cfg` describes (image_size excepted: the
    position embedding is recomputed at any resolution). Empty when they match."""
    want = open_clip_config(cfg)["model_cfg"]
    problems = []
    if found.get("embed_dim") != want["embed_dim"]:
        problems.append(f"embed_dim is {found.get('embed_dim')}, the config has {want['embed_dim']}")
    defaults = {"no_ln_pre": False, "final_ln_after_pool": False, "no_causal_mask": False, "head_width": 64,
                "mlp_ratio": 4.0, "pool_type": None, "act_kwargs": None, "norm_kwargs": None}
    for section in ("vision_cfg", "text_cfg"):
        have = found.get(section, {})
        for key, value in want[section].items():
            if key in ("image_size", "hf_tokenizer_name", "pos_embed_type"):
                continue
            got = have.get(key, defaults.get(key))
            if key == "mlp_ratio":
                width = want[section]["width"]
                same = got is not None and int(width * got) == int(width * value)
            else:
                same = got == value
            if not same:
                problems.append(f"{section}.{key} is {got!r}, the config implies {value!r}")
    return problems


def decoder_config(cfg: Config) -> dict[str, Any]:
    """`caption_decoder_config.json`: what a reader needs to rebuild the caption decoder in any framework."""
    d = cfg.decoder
    image_tokens, text_tokens = cfg.derived.num_patches, cfg.text.context_length - 1
    return {
        "format": "openvision-max caption decoder v1",
        "width": d.width, "layers": d.depth, "heads": d.num_heads, "mlp_dim": d.mlp_dim,
        "mlp_ratio": mlp_ratio(d.mlp_dim, d.width),
        "caption_length": d.caption_length, "vocab_size": cfg.vocab_size,
        "vision_width": cfg.vision.width, "text_width": cfg.text.width,
        "image_tokens": image_tokens, "text_tokens": text_tokens, "prefix_length": image_tokens + text_tokens,
        "act": "gelu_tanh", "norm_eps": LN_EPS,
        "inputs": "[image_proj(vision patch tokens of the last block, before ln_post), "
                  "text_proj(text tokens 0..context_length-2 of the last block, before ln_final), queries]",
        "mask": "prefix-LM: positions < prefix_length attend to the whole prefix; query positions attend to the "
                "prefix and causally among themselves",
        "output": "head(ln_final(query positions)): logits [caption_length, vocab_size] predicting the recaption "
                  "tokens 1.. ([bos] dropped)",
    }
