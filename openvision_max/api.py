"""The Python inference API: `openvision_max.load_model(path)`.

    model = openvision_max.load_model("runs/b16")               # a run, checkpoints/ or step dir, or an export
    ids = model.tokenize(["a photo of a cat"])                  # int32 [n, context_length]
    x = np.stack([model.preprocess(img) for img in images])     # float32 [n, S, S, 3], normalised
    img, txt = model.encode_image(x), model.encode_text(ids)    # float32 numpy [n, E], L2-normalised
    probs = softmax(model.logit_scale * img @ txt.T)

Runs on one device (JAX's default backend). Embeddings come back as NumPy float32 arrays.
"""

from __future__ import annotations

import pathlib
from typing import Any, Optional, Sequence

import numpy as np
import yaml
from etils import epath

from openvision_max.config.paths import as_path
from openvision_max.config.schema import Config

PreprocessInput = Any  # a PIL image, a uint8 array [H, W, 3] or encoded image bytes


class LoadError(ValueError):
    """The path holds nothing `load_model` can read; the message is one line."""


class OpenVisionModel:
    """Tokenizer, preprocessing and the two encoders of one model, with its parameters on one device."""

    def __init__(self, cfg: Config, params: Any, *, source: str, batch_size: int = 32):
        import jax

        from openvision_max.data.tokenizer import Tokenizer
        from openvision_max.models import build

        if cfg.objective != "openvision":
            raise LoadError(f"{source} is an objective={cfg.objective} model (no text tower): load_model serves "
                            "image-text models; read its vision tower from the vision-only export "
                            "(python -m openvision_max.export ... --vision-only) or evaluate it with evals")
        self.cfg, self.params, self.source = cfg, params, source
        self.image_size, self.context_length, self.embed_dim = cfg.image_size, cfg.text.context_length, cfg.embed_dim
        self.batch_size = batch_size
        self.tokenizer = Tokenizer()
        model = build(cfg)
        self._images = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_image))
        self._ids = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_text))
        self.logit_scale = float(np.exp(np.asarray(params["t"])))
        self._encoder = None

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """Captions -> int32 [n, context_length]: [bos] words [eos], padded with 0, [CLS] last."""
        return self.tokenizer.encoder_ids(list(texts), self.context_length)

    def preprocess(self, image: PreprocessInput) -> np.ndarray:
        """One image -> float32 [S, S, 3]: short side resized to S (bilinear, antialiased), centre crop,
        ImageNet mean/std normalisation. The same pixels as the evaluators' transform."""
        from openvision_max.data.transforms import eval_image
        from openvision_max.models.inputs import IMAGE_MEAN, IMAGE_STD
        return (eval_image(image, self.image_size).astype(np.float32) - IMAGE_MEAN) / IMAGE_STD

    def encode_image(self, images: np.ndarray) -> np.ndarray:
        """float32 [n, H, W, 3] (normalised, as `preprocess` makes) -> L2-normalised float32 [n, E].
        Any H, W divisible by the patch size work (the position embedding is recomputed)."""
        images = np.asarray(images)
        if images.dtype == np.uint8:  # raw pixels would silently give meaningless embeddings
            raise ValueError("encode_image takes normalised float images (see preprocess), got uint8")
        images = images.astype(np.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected float images [n, H, W, 3], got {list(images.shape)}")
        return self._batched(self._images, images)

    def encode_text(self, ids: np.ndarray) -> np.ndarray:
        """int32 [n, context_length] (from `tokenize`) -> L2-normalised float32 [n, E]."""
        ids = np.asarray(ids, np.int32)
        if ids.ndim != 2 or ids.shape[1] != self.context_length:
            raise ValueError(f"expected ids [n, {self.context_length}], got {list(ids.shape)}")
        return self._batched(self._ids, ids)

    @property
    def encoder(self):
        """An evals.encoder.Encoder over these parameters (uint8 images in): what evaluators take."""
        if self._encoder is None:
            from openvision_max.evals.encoder import Encoder
            self._encoder = Encoder(self.cfg, self.params, batch_size=self.batch_size, tokenizer=self.tokenizer)
        return self._encoder

    def _batched(self, fn, x: np.ndarray) -> np.ndarray:
        # Fixed-size batches: one compiled program per input shape, whatever n is.
        out = []
        for i in range(0, len(x), self.batch_size):
            chunk = x[i:i + self.batch_size]
            n = len(chunk)
            if n < self.batch_size and len(x) > self.batch_size:
                chunk = np.concatenate([chunk, np.zeros((self.batch_size - n, *chunk.shape[1:]), chunk.dtype)])
            out.append(np.asarray(fn(self.params, chunk))[:n])
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)


def _load_export(path: epath.Path, dtype: str, config: Optional[Config], batch_size: int) -> OpenVisionModel:
    from openvision_max.config.run_config import inference_config
    from openvision_max.export.directory import ExportError, read_export
    from openvision_max.export.mapping import FormatError, from_open_clip
    from openvision_max.export.open_clip_config import architecture_mismatches

    try:
        oc_config, clip, _, ours = read_export(path, decoder=False)
    except ExportError as e:
        raise LoadError(str(e)) from None
    if config is None:
        if ours is None:
            raise LoadError(f"{path} has no openvision_max_config.yml (not our export): pass config=, or import "
                            "it with python -m openvision_max.import_open_clip")
        config = inference_config(ours, dtype=dtype)
    problems = architecture_mismatches(oc_config["model_cfg"], config)
    if problems:
        raise LoadError(f"{path} does not match the config: {'; '.join(problems[:3])}")
    # The encoders need no decoder (a released model has none): it is not read.
    try:
        params = from_open_clip(clip, None, config)
    except FormatError as e:
        raise LoadError(str(e)) from None
    import jax
    return OpenVisionModel(config, jax.device_put(params), source=f"export {path}", batch_size=batch_size)


def load_model(path: str | pathlib.Path, dtype: str = "float32", *, config: Optional[Config] = None,
               batch_size: int = 32) -> OpenVisionModel:
    """The model at `path`: a run directory (config.yml + checkpoints/, newest complete checkpoint), its
    checkpoints/ directory, one step directory, or an export (open_clip_config.json; our exports carry their
    config, other open_clip directories of OpenVision architecture need `config=`).

    `dtype` is the compute dtype ("float32" or "bfloat16"); parameters stay float32. Raises LoadError.
    """
    from openvision_max.config.run_config import find_run, inference_config, stage_of

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    # Local paths made absolute (orbax refuses relative ones); gs:// paths as they are.
    p = as_path(path)
    if not p.is_dir():
        raise LoadError(f"{path} is not a directory")
    if (p / "open_clip_config.json").is_file():
        return _load_export(p, dtype, config, batch_size)
    found = find_run(p)
    if found is None:
        raise LoadError(f"{path} is not a run directory (config.yml + checkpoints/), a checkpoint directory "
                        "or an exported directory (open_clip_config.json)")
    run_dir, step = found
    if config is None:
        config = inference_config(stage_of(yaml.safe_load((run_dir / "config.yml").read_text()), step), dtype=dtype)
    from openvision_max.training.checkpointing import CheckpointError
    from openvision_max.training.params import load_params
    try:
        params = load_params(config, str(p))
    except CheckpointError as e:
        raise LoadError(str(e)) from None
    return OpenVisionModel(config, params, source=f"checkpoint {p}", batch_size=batch_size)
