"""Our parameter tree <-> open_clip state-dict names and layouts (NumPy only; no torch).

    to_open_clip(params, cfg)                    -> (clip_state, decoder_state)
    vision_to_open_clip(params['vision'], cfg)  -> the visual tower's tensors (also read by vision_only.py)
    from_open_clip(clip_state, decoder_state, cfg) -> params (decoder None when decoder_state is None)

Layouts (open_clip stores PyTorch conventions: Linear weights [out, in]):
- patch kernel [p, p, 3, D] (HWIO) -> visual.conv1.weight [D, 3, p, p] (transpose 3, 2, 0, 1)
- q/k/v kernels [D, H, K] -> rows of attn.in_proj_weight [3D, D] (each flattened to [D, H*K], transposed,
  concatenated q, k, v); biases [H, K] -> attn.in_proj_bias [3D]
- out kernel [H, K, D] -> attn.out_proj.weight [D, H*K]; MLP fc1/fc2 -> mlp.c_fc / mlp.c_proj (transposed)
- LayerNorm scale/bias -> weight/bias; heads [D, E] -> visual.proj / text_projection as they are
  (open_clip computes `pooled @ proj`)
- the vision position embedding is not a parameter here (2-D sin-cos recomputed from the grid, CLS slot
  zero); it is written out as the fixed tensor visual.positional_embedding [1 + N, D].
Every conversion is a transpose, reshape or concatenation, so a round trip is exact.

Under `scan_layers` a stack's parameters carry a leading layer axis (`transformer/blocks/...`); unrolled, each
block is `transformer/block_{i}/...`. Both convert to the same per-block open_clip names.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from openvision_max.config.schema import Config
from openvision_max.models.layers import posemb_sincos_2d

State = dict[str, np.ndarray]


class FormatError(ValueError):
    """An open_clip checkpoint that does not fit the config (missing, unexpected or mis-shaped tensors)."""


# --- Blocks ------------------------------------------------------------------------------------------------


def _blocks(stack: dict, depth: int) -> list[dict]:
    """Per-block parameter dicts of a `transformer` subtree, scanned or unrolled."""
    if "blocks" in stack:
        return [_index(stack["blocks"], i) for i in range(depth)]
    return [stack[f"block_{i}"] for i in range(depth)]


def _index(tree: Any, i: int) -> Any:
    return {k: _index(v, i) for k, v in tree.items()} if isinstance(tree, dict) else np.asarray(tree)[i]


def _stacked(blocks: list[dict], scanned: bool) -> dict:
    """The inverse of `_blocks`: a `transformer` subtree in the config's layout."""
    if not scanned:
        return {f"block_{i}": b for i, b in enumerate(blocks)}

    def stack(*leaves):
        if isinstance(leaves[0], dict):
            return {k: stack(*(leaf[k] for leaf in leaves)) for k in leaves[0]}
        return np.stack(leaves)
    return {"blocks": stack(*blocks)}


def _block_to_torch(p: dict, prefix: str) -> State:
    attn = p["attn"]
    width = attn["query"]["kernel"].shape[0]
    qkv = ("query", "key", "value")
    return {
        prefix + "ln_1.weight": p["ln_1"]["scale"], prefix + "ln_1.bias": p["ln_1"]["bias"],
        prefix + "attn.in_proj_weight": np.concatenate([attn[n]["kernel"].reshape(width, -1).T for n in qkv]),
        prefix + "attn.in_proj_bias": np.concatenate([attn[n]["bias"].reshape(-1) for n in qkv]),
        prefix + "attn.out_proj.weight": attn["out"]["kernel"].reshape(-1, width).T,
        prefix + "attn.out_proj.bias": attn["out"]["bias"],
        prefix + "ln_2.weight": p["ln_2"]["scale"], prefix + "ln_2.bias": p["ln_2"]["bias"],
        prefix + "mlp.c_fc.weight": p["mlp"]["fc1"]["kernel"].T, prefix + "mlp.c_fc.bias": p["mlp"]["fc1"]["bias"],
        prefix + "mlp.c_proj.weight": p["mlp"]["fc2"]["kernel"].T,
        prefix + "mlp.c_proj.bias": p["mlp"]["fc2"]["bias"],
    }


def _block_from_torch(r: _Reader, prefix: str, width: int, heads: int, mlp_dim: int) -> dict:
    k = width // heads
    w = r.take(prefix + "attn.in_proj_weight", (3 * width, width))
    b = r.take(prefix + "attn.in_proj_bias", (3 * width,))
    attn = {name: {"kernel": w[i * width:(i + 1) * width].T.reshape(width, heads, k),
                   "bias": b[i * width:(i + 1) * width].reshape(heads, k)}
            for i, name in enumerate(("query", "key", "value"))}
    attn["out"] = {"kernel": r.take(prefix + "attn.out_proj.weight", (width, width)).T.reshape(heads, k, width),
                   "bias": r.take(prefix + "attn.out_proj.bias", (width,))}
    return {
        "attn": attn,
        "ln_1": r.norm(prefix + "ln_1", width), "ln_2": r.norm(prefix + "ln_2", width),
        "mlp": {"fc1": {"kernel": r.take(prefix + "mlp.c_fc.weight", (mlp_dim, width)).T,
                        "bias": r.take(prefix + "mlp.c_fc.bias", (mlp_dim,))},
                "fc2": {"kernel": r.take(prefix + "mlp.c_proj.weight", (width, mlp_dim)).T,
                        "bias": r.take(prefix + "mlp.c_proj.bias", (width,))}},
    }


class _Reader:
    """Takes tensors out of a state dict by name, checking shapes; reports what was never taken."""

    def __init__(self, state: State, what: str):
        self.state, self.what, self.taken = state, what, set()

    def take(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in self.state:
            raise FormatError(f"{self.what}: {key} is missing (the config expects shape {list(shape)})")
        x = np.asarray(self.state[key])
        if x.shape != tuple(shape):
            raise FormatError(f"{self.what}: {key} has shape {list(x.shape)}, the config expects {list(shape)}")
        if x.dtype == np.float16:
            x = x.astype(np.float32)  # exact; lower precision than our float32 parameters, but no loss here
        elif x.dtype != np.float32:
            raise FormatError(f"{self.what}: {key} is {x.dtype}; float32 (or float16) tensors are expected")
        self.taken.add(key)
        return x

    def norm(self, prefix: str, width: int) -> dict:
        return {"scale": self.take(prefix + ".weight", (width,)), "bias": self.take(prefix + ".bias", (width,))}

    def check_all_taken(self) -> None:
        extra = sorted(set(self.state) - self.taken)
        if extra:
            more = f" (and {len(extra) - 3} more)" if len(extra) > 3 else ""
            raise FormatError(f"{self.what}: unexpected tensors {', '.join(extra[:3])}{more}: "
                              "not the OpenVision architecture this config describes")


# --- Whole model -------------------------------------------------------------------------------------------


def grid_size(cfg: Config) -> int:
    return cfg.image_size // cfg.patch_size


def vision_position_table(cfg: Config, grid: Optional[int] = None) -> np.ndarray:
    """The fixed position embedding open_clip adds: [1 + grid^2, D], the CLS row zero."""
    g = grid or grid_size(cfg)
    table = posemb_sincos_2d(g, g, cfg.vision.width)
    return np.concatenate([np.zeros((1, cfg.vision.width), np.float32), table])


def vision_to_open_clip(vision: Any, cfg: Config) -> State:
    """Our `vision` subtree (a tree of arrays, scanned or unrolled) -> the tensors of open_clip's visual tower,
    named without the `visual.` prefix: conv1.weight, class_embedding, positional_embedding,
    transformer.resblocks.{i}.*, ln_post.weight/bias, proj. The one reader of the vision tower's parameters:
    the open_clip export prefixes these names, the vision-only (timm) export renames them."""
    v = _numpy(vision)
    state: State = {
        "conv1.weight": v["embedding"]["kernel"].transpose(3, 2, 0, 1),
        "class_embedding": v["cls"].reshape(-1),
        "positional_embedding": vision_position_table(cfg),
        "ln_post.weight": v["ln_post"]["scale"], "ln_post.bias": v["ln_post"]["bias"],
        "proj": v["head"]["kernel"],
    }
    for i, block in enumerate(_blocks(v["transformer"], cfg.vision.depth)):
        state.update(_block_to_torch(block, f"transformer.resblocks.{i}."))
    return state


def to_open_clip(params: Any, cfg: Config) -> tuple[State, State]:
    """Parameters (a tree of arrays) -> (open_clip CLIP state dict, caption-decoder state dict), float32."""
    p = _numpy(params)
    t, d = p["text"], p["decoder"]
    clip: State = {f"visual.{k}": x for k, x in vision_to_open_clip(p["vision"], cfg).items()}
    clip.update({
        "token_embedding.weight": t["embedding"]["embedding"],
        "positional_embedding": t["pos_embedding"][0],
        "ln_final.weight": t["ln_final"]["scale"], "ln_final.bias": t["ln_final"]["bias"],
        "text_projection": t["head"]["kernel"],
        "logit_scale": p["t"],
    })
    if "b" in p:
        clip["logit_bias"] = p["b"]
    for i, block in enumerate(_blocks(t["transformer"], cfg.text.depth)):
        clip.update(_block_to_torch(block, f"transformer.resblocks.{i}."))
    decoder: State = {
        "image_proj.weight": d["image_proj"]["kernel"].T,
        "text_proj.weight": d["text_proj"]["kernel"].T,
        "queries": d["queries"][0],
        "ln_final.weight": d["ln_final"]["scale"], "ln_final.bias": d["ln_final"]["bias"],
        "head.weight": d["head"]["kernel"].T,
    }
    for i, block in enumerate(_blocks(d["transformer"], cfg.decoder.depth)):
        decoder.update(_block_to_torch(block, f"transformer.resblocks.{i}."))
    return _contiguous(clip), _contiguous(decoder)


def from_open_clip(clip: State, decoder: Optional[State], cfg: Config) -> dict:
    """open_clip state dicts -> our parameter tree (NumPy float32) in the config's layout.

    Raises FormatError naming the first tensor that is missing, unexpected or of the wrong shape. The decoder
    subtree is absent from the result when `decoder` is None. The vision position embedding is checked
    against the 2-D sin-cos table (at the checkpoint's own grid) rather than read: ours is not a parameter.
    """
    r = _Reader(clip, "open_clip checkpoint")
    vw, tw, e = cfg.vision.width, cfg.text.width, cfg.embed_dim
    p = cfg.patch_size
    pos = np.asarray(clip.get("visual.positional_embedding", np.zeros((0, vw), np.float32)))
    grid = int(round((pos.shape[0] - 1) ** 0.5)) if pos.ndim == 2 and pos.shape[0] > 1 else grid_size(cfg)
    expected = vision_position_table(cfg, grid)
    pos = r.take("visual.positional_embedding", expected.shape)
    diff = float(np.max(np.abs(pos - expected)))
    if diff > 1e-5:  # tables computed in another float order differ by ~1e-7
        raise FormatError(f"open_clip checkpoint: visual.positional_embedding is not the fixed 2-D sin-cos table "
                          f"(max difference {diff:.3g}): not an OpenVision-style vision tower")
    vision = {
        "embedding": {"kernel": r.take("visual.conv1.weight", (vw, 3, p, p)).transpose(2, 3, 1, 0)},
        "cls": r.take("visual.class_embedding", (vw,)).reshape(1, 1, vw),
        "ln_post": r.norm("visual.ln_post", vw),
        "head": {"kernel": r.take("visual.proj", (vw, e))},
        "transformer": _stacked([
            _block_from_torch(r, f"visual.transformer.resblocks.{i}.", vw, cfg.vision.num_heads, cfg.vision.mlp_dim)
            for i in range(cfg.vision.depth)], cfg.scan_layers),
    }
    text = {
        "embedding": {"embedding": r.take("token_embedding.weight", (cfg.vocab_size, tw))},
        "pos_embedding": r.take("positional_embedding", (cfg.text.context_length, tw))[None],
        "ln_final": r.norm("ln_final", tw),
        "head": {"kernel": r.take("text_projection", (tw, e))},
        "transformer": _stacked([
            _block_from_torch(r, f"transformer.resblocks.{i}.", tw, cfg.text.num_heads, cfg.text.mlp_dim)
            for i in range(cfg.text.depth)], cfg.scan_layers),
    }
    out = {"vision": vision, "text": text, "t": _scalar(r, "logit_scale")}
    if cfg.contrastive_loss == "sigmoid":
        out["b"] = _scalar(r, "logit_bias")
    r.check_all_taken()
    if decoder is not None:
        out["decoder"] = decoder_from_open_clip(decoder, cfg)
    return out


def decoder_from_open_clip(state: State, cfg: Config) -> dict:
    """caption_decoder.safetensors' tensors -> our `decoder` subtree (NumPy float32); FormatError on mismatch."""
    r = _Reader(state, "caption decoder file")
    dw, q = cfg.decoder.width, cfg.decoder.caption_length
    out = {
        "image_proj": {"kernel": r.take("image_proj.weight", (dw, cfg.vision.width)).T},
        "text_proj": {"kernel": r.take("text_proj.weight", (dw, cfg.text.width)).T},
        "queries": r.take("queries", (q, dw))[None],
        "ln_final": r.norm("ln_final", dw),
        "head": {"kernel": r.take("head.weight", (cfg.vocab_size, dw)).T},
        "transformer": _stacked([
            _block_from_torch(r, f"transformer.resblocks.{i}.", dw, cfg.decoder.num_heads, cfg.decoder.mlp_dim)
            for i in range(cfg.decoder.depth)], cfg.scan_layers),
    }
    r.check_all_taken()
    return out


def _scalar(r: _Reader, key: str) -> np.ndarray:
    # open_clip keeps logit_scale as a 0-d or a [1] parameter (`nonscalar_logit_scale`).
    shape = tuple(np.shape(r.state.get(key, ())))
    return r.take(key, shape if shape in ((), (1,)) else ()).reshape(())


def _numpy(tree: Any) -> Any:
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def _contiguous(state: State) -> State:
    # Transposes are views; safetensors and torch want C-contiguous buffers.
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}
