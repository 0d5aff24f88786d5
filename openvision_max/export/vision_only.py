"""The vision-only export: the image tower as a timm `VisionTransformer` directory (timm's hub layout).

    DIR/config.json                    timm's hub config: architecture, num_classes, model_args, pretrained_cfg
    DIR/model.safetensors              the tower in timm's names, float32
    DIR/openvision_max_config.yml      the resolved config of the exported model

    model = timm.create_model("local-dir:DIR", pretrained=True)   # offline (tested with timm 1.0.31)

A timm without the `local-dir:` source can build it from the same files: `timm.create_model(config["architecture"],
pretrained=True, pretrained_cfg_overlay=dict(file="DIR/model.safetensors", **config["pretrained_cfg"]),
**config["model_args"])` with `config = json.load(open("DIR/config.json"))`.

`model(x)` (x: [B, 3, S, S], ImageNet-normalised) is our image embedding before L2 normalisation,
`vision(images)[0]`: the mean of the patch tokens (CLS excluded) after the last block, LayerNorm'ed
(`fc_norm`), through the bias-free head (`head`, an nn.Linear [E, D] with a zero bias; num_classes = embed_dim).
`model.forward_head(model.forward_features(x), pre_logits=True)` is the pooled vector before the head.
This is what an OpenVision 2 model (no text tower) can be exported as, and any other model's image tower.

What the config says, and why (facts from timm 1.0's vision_transformer.py):
- `class_token` with `no_embed_class: false`: CLS is concatenated first and the position table [1 + N, D]
  added to all tokens; its CLS row is zero, so this is our CLS-plus-sin-cos-patches. `pos_embed` is a learned
  parameter in timm; it holds our fixed 2-D sin-cos table. At another resolution timm would interpolate it
  (bicubic), which is not our table: export again with `image_size=` instead.
- `pre_norm: false`: no LayerNorm before the blocks (we have none); it also keeps the patch embedding's conv
  bias (timm drops it only with pre_norm), which the export fills with zeros.
- `global_pool: avg` with `fc_norm: true`: timm then skips the pre-pool `norm` (Identity), averages the tokens
  after the prefix (CLS) and applies `fc_norm` to the pooled vector: our mean pool and ln_post.
- LayerNorm eps 1e-6 (timm's ViT default), exact GELU (nn.GELU), fused qkv with bias, `mlp_ratio` such that
  timm's `int(width * mlp_ratio)` is our MLP width, head_dim = width / heads in both.
- `pretrained_cfg`: ImageNet mean/std, bilinear, crop_pct 1.0 with crop_mode center (resize the short side
  to S, centre crop): our eval transform, as `timm.data.create_transform(**resolve_data_config(model=model))`
  builds it.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

import numpy as np

from openvision_max.config.schema import Config
from openvision_max.export import mapping
from openvision_max.export.directory import export_target, save_our_config, save_safetensors, write_atomically
from openvision_max.export.open_clip_config import IMAGENET_MEAN, IMAGENET_STD, mlp_ratio

CONFIG = "config.json"
WEIGHTS = "model.safetensors"

# `architecture` only picks timm's ViT builder (every dimension is in model_args); where our tower is one of
# timm's plain ViT sizes, its name says so. Plain names only: timm loads `*siglip*` variants non-strictly.
# Keyed by (width, depth, heads, mlp_dim, patch_size).
ARCHITECTURES = {
    (192, 12, 3, 768, 16): "vit_tiny_patch16_224",
    (384, 12, 6, 1536, 16): "vit_small_patch16_224",
    (768, 12, 12, 3072, 16): "vit_base_patch16_224",
    (1024, 24, 16, 4096, 14): "vit_large_patch14_224",
    (1280, 32, 16, 5120, 14): "vit_huge_patch14_224",
}
DEFAULT_ARCHITECTURE = "vit_base_patch16_224"

# open_clip's per-block names (mapping.vision_to_open_clip) -> timm's Block names.
_BLOCK_NAMES = {
    "ln_1.weight": "norm1.weight", "ln_1.bias": "norm1.bias",
    "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.weight": "attn.proj.weight", "attn.out_proj.bias": "attn.proj.bias",
    "ln_2.weight": "norm2.weight", "ln_2.bias": "norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}


def architecture(cfg: Config) -> str:
    v = cfg.vision
    return ARCHITECTURES.get((v.width, v.depth, v.num_heads, v.mlp_dim, cfg.patch_size), DEFAULT_ARCHITECTURE)


def timm_config(cfg: Config) -> dict[str, Any]:
    """config.json for `timm.create_model("local-dir:DIR", pretrained=True)`."""
    v, size = cfg.vision, cfg.image_size
    model_args = {
        "img_size": size, "patch_size": cfg.patch_size, "embed_dim": v.width, "depth": v.depth,
        "num_heads": v.num_heads, "mlp_ratio": mlp_ratio(v.mlp_dim, v.width), "qkv_bias": True,
        "class_token": True, "no_embed_class": False, "pre_norm": False, "final_norm": True,
        "global_pool": "avg", "fc_norm": True, "dynamic_img_size": False, "num_classes": cfg.embed_dim,
    }
    pretrained_cfg = {
        "input_size": [3, size, size], "fixed_input_size": True, "interpolation": "bilinear", "crop_pct": 1.0,
        "crop_mode": "center", "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "num_classes": cfg.embed_dim,
        "first_conv": "patch_embed.proj", "classifier": "head",
        "description": "OpenVision-style image encoder exported by openvision-max: the output is the image "
                       "embedding before L2 normalisation (head = the projection to embed_dim, zero bias)",
    }
    return {"architecture": architecture(cfg), "num_classes": cfg.embed_dim, "num_features": v.width,
            "global_pool": "avg", "model_args": model_args, "pretrained_cfg": pretrained_cfg}


def to_timm(vision: Any, cfg: Config) -> mapping.State:
    """Our `vision` subtree (scanned or unrolled) -> timm VisionTransformer state dict, float32.

    Read through mapping.vision_to_open_clip (the same tensors as the open_clip export), then renamed:
    conv1 -> patch_embed.proj (+ zero bias), class_embedding -> cls_token [1, 1, D], positional_embedding ->
    pos_embed [1, 1 + N, D], resblocks -> blocks, ln_post -> fc_norm, proj [D, E] -> head.weight [E, D]
    (+ zero bias)."""
    oc = mapping.vision_to_open_clip(vision, cfg)
    width = cfg.vision.width
    state = {
        "patch_embed.proj.weight": oc.pop("conv1.weight"),
        "patch_embed.proj.bias": np.zeros((width,), np.float32),
        "cls_token": oc.pop("class_embedding").reshape(1, 1, width),
        "pos_embed": oc.pop("positional_embedding")[None],
        "fc_norm.weight": oc.pop("ln_post.weight"), "fc_norm.bias": oc.pop("ln_post.bias"),
        "head.weight": oc.pop("proj").T, "head.bias": np.zeros((cfg.embed_dim,), np.float32),
    }
    for name, x in oc.items():
        block, rest = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", name).groups()
        state[f"blocks.{block}.{_BLOCK_NAMES[rest]}"] = x
    # Transposes are views; safetensors and torch want C-contiguous buffers.
    return {k: np.ascontiguousarray(x, dtype=np.float32) for k, x in state.items()}


def write_vision_only(params: Any, cfg: Config, export_dir: str | os.PathLike) -> pathlib.Path:
    """Writes the vision-only export of `params` (only params["vision"] is read: an OpenVision or an
    OpenVision 2 tree) to `export_dir`, which must not exist or be empty; a failure leaves nothing there."""
    target = export_target(export_dir)
    state = to_timm(params["vision"], cfg)

    def write_files(tmp: pathlib.Path) -> None:
        (tmp / CONFIG).write_text(json.dumps(timm_config(cfg), indent=2) + "\n")
        save_safetensors(tmp / WEIGHTS, state, {"format": "pt"})
        save_our_config(tmp, cfg)
    return write_atomically(target, write_files)


def load_call(directory: str | os.PathLike) -> str:
    """The one line that loads the export in timm."""
    return f"timm.create_model('local-dir:{directory}', pretrained=True)"
