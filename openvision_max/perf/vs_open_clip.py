"""open_clip's PyTorch train step for the two towers a config describes: the other side of `--vs open_clip`.

    trainer = open_clip_trainer(cfg, device="cuda")   # builds the model, the optimiser and one fixed batch
    loss = trainer.step()                              # one full step; returns once the device is done

The model is `open_clip.model.CLIP(**open_clip_config(cfg)["model_cfg"])`, the mapping our exports use so that
open_clip builds exactly our towers (see export/open_clip_config.py), with the logit scale (and, for the sigmoid
loss, bias) initialised as ours. What differs from our train step, and why:
- No caption decoder: open_clip's CLIP has none, so our side's decoder forward/backward has no counterpart
  here (compare against our step's tower FLOPs, or a config with a small decoder).
- The vision position embedding: open_clip holds a `learnable` parameter [1 + N, width]; ours is the fixed
  2-D sin-cos table. The slot is filled with that table (as an export does) and frozen, so it gets no
  gradient, Adam state or decay, as ours. `param_count` counts trainable parameters, which equals
  `our_tower_param_count(cfg)`; the module holds (1 + N) x vision.width numbers more, in that constant.
- Adam's first moment is fp32 (torch's AdamW has no bf16 moment; ours stores it in bf16).
- No clamp of the logit scale at ln 100 (open_clip's training loop has one; ours does not).
- Gradient accumulation is not mirrored: the step always runs the whole global batch at once.
- Rematerialisation: a tower whose remat policy is not `none` uses open_clip's per-block gradient
  checkpointing, which is our `full` policy (and the nearest thing to the partial ones).
- Initialisation is open_clip's own; it changes no timing.
Under bfloat16, parameters stay fp32 and forward + loss run under `torch.autocast` (open_clip's
`--precision amp_bf16`). On a GPU shared with JAX in one process, keep JAX from preallocating most of the
memory (XLA_PYTHON_CLIENT_PREALLOCATE=false) or torch will run out.

torch and open_clip (the `export` extra) are imported only when a trainer is built, so this module imports
without them.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, NamedTuple, Optional

import numpy as np

from openvision_max.config.schema import Config
from openvision_max.data.synthetic import CLS_ID
from openvision_max.export.mapping import vision_position_table
from openvision_max.export.open_clip_config import open_clip_config
from openvision_max.models.inputs import IMAGE_MEAN, IMAGE_STD
from openvision_max.models.openvision import LOGIT_SCALE_INIT
from openvision_max.perf.summary import param_counts
from openvision_max.training.optimizer import learning_rate_schedule

MISSING_TORCH = "--vs open_clip needs the export extra: pip install -e '.[export]'"
# Our parameters that Adam decays are the dense/conv kernels; in open_clip's names those are the >= 2-D
# tensors except these embedding tables (the vision position table is frozen, so it is not listed).
NO_DECAY_2D = ("token_embedding.weight", "positional_embedding")


class Probe(NamedTuple):
    """The loss of the fixed batch without an update, with what it was computed from (NumPy, fp32)."""
    loss: float
    image_emb: np.ndarray          # [B, E], L2-normalised
    text_emb: np.ndarray           # [2B, E], alt-texts first
    logit_scale: float             # exp(logit_scale parameter)
    logit_bias: Optional[float]    # sigmoid loss only


SCHEDULE_STEPS = 4096  # learning rates computed ahead for open_clip's steps


def our_tower_param_count(cfg: Config) -> int:
    """Our parameters without the caption decoder: vision + text towers + logit scale (+ bias if sigmoid)."""
    counts = param_counts(cfg)
    return counts["total"] - counts["decoder"]


def _import_torch() -> tuple[Any, Any]:
    try:
        import torch
    except ImportError as e:
        raise RuntimeError(MISSING_TORCH) from e
    # Building a CLIP reads no files, but nothing here may ever reach the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import open_clip
    except ImportError as e:
        raise RuntimeError(MISSING_TORCH) from e
    return torch, open_clip


def build_model(cfg: Config, torch: Any, open_clip: Any) -> Any:
    """open_clip's CLIP with our towers, logit init and fixed vision position table (frozen)."""
    scale_init = cfg.logit_scale_init or LOGIT_SCALE_INIT[cfg.contrastive_loss]
    model = open_clip.model.CLIP(**open_clip_config(cfg)["model_cfg"], init_logit_scale=math.log(scale_init))
    pos = model.visual.positional_embedding
    with torch.no_grad():
        pos.copy_(torch.from_numpy(vision_position_table(cfg)))
    pos.requires_grad_(False)
    # open_clip's checkpointing keeps each block's input and recomputes the block: our `full` policy.
    model.visual.set_grad_checkpointing(cfg.derived.vision_remat_policy != "none")
    model.transformer.grad_checkpointing = cfg.derived.text_remat_policy != "none"
    return model


def synthetic_batch(cfg: Config, torch: Any, device: Any, seed: int) -> tuple[Any, Any]:
    """Images [B, 3, S, S] ImageNet-normalised fp32 and texts [2B, L] ids in [3, vocab), [CLS] last, as
    data/synthetic.py makes them (same distribution, not the same numbers)."""
    b, s, length = cfg.global_batch_size, cfg.image_size, cfg.text.context_length
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (b, s, s, 3), generator=gen, dtype=torch.uint8).float()
    images = (pixels - torch.from_numpy(IMAGE_MEAN)) / torch.from_numpy(IMAGE_STD)
    texts = torch.randint(3, cfg.vocab_size, (2 * b, length), generator=gen, dtype=torch.long)
    texts[:, -1] = CLS_ID
    return images.permute(0, 3, 1, 2).contiguous().to(device), texts.to(device)


def adamw(cfg: Config, model: Any, torch: Any) -> Any:
    """torch AdamW with our betas, eps and decoupled decay (p -= lr * wd * p, as optax's add_decayed_weights
    before the LR scale) on the kernels only."""
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and name not in NO_DECAY_2D else keep).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=0.0, betas=(cfg.adam_b1, cfg.adam_b2), eps=cfg.adam_eps)


class OpenClipTrainer:
    """One open_clip model, its AdamW and a fixed batch; `step()` trains on that batch once."""

    def __init__(self, cfg: Config, device: str, seed: int):
        torch, open_clip = _import_torch()
        self._torch, self._cfg = torch, cfg
        self.device = torch.device(device)
        # Seeded init without disturbing the caller's global torch RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = build_model(cfg, torch, open_clip).to(self.device).train()
        self.images, self.texts = synthetic_batch(cfg, torch, self.device, seed)
        self.optimizer = adamw(cfg, self.model, torch)
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        # Our warmup-cosine schedule, evaluated once: a JAX call per step would sit inside the timing. Only
        # its first steps (a recipe stage has billions; a benchmark runs tens), then the last value is held.
        first = np.arange(min(cfg.steps, SCHEDULE_STEPS) + 1)
        self._lrs = np.asarray(learning_rate_schedule(cfg)(first), np.float64)
        self._step = 0
        # cache_labels, as open_clip's training builds its losses.
        loss_cls = open_clip.loss.SigLipLoss if cfg.contrastive_loss == "sigmoid" else open_clip.loss.ClipLoss
        self._loss = loss_cls(cache_labels=True)
        self.param_count = sum(p.numel() for p in self._trainable)
        self.description = self._describe(open_clip.__version__)

    def _describe(self, open_clip_version: str) -> str:
        cfg, torch = self._cfg, self._torch
        precision = "amp_bf16" if cfg.dtype == "bfloat16" else "fp32"
        where = f"{self.device}, {precision}, {torch.get_num_threads()} threads"
        if self.device.type == "cuda":
            where += f", tf32 matmul {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}"
        ckpt = [name for name in ("vision", "text") if getattr(cfg.derived, f"{name}_remat_policy") != "none"]
        v, t = cfg.vision, cfg.text
        return (f"open_clip {open_clip_version} CLIP (torch {torch.__version__}, {where}): "
                f"vision ViT width {v.width} depth {v.depth} patch {cfg.patch_size} @{cfg.image_size}, "
                f"text width {t.width} depth {t.depth} ctx {t.context_length}; "
                f"{cfg.contrastive_loss} two-caption loss, batch {cfg.global_batch_size}; "
                f"grad checkpointing: {', '.join(ckpt) or 'none'}; no caption decoder")

    def _precision(self):
        if self._cfg.dtype == "bfloat16":
            return self._torch.autocast(device_type=self.device.type, dtype=self._torch.bfloat16)
        return contextlib.nullcontext()

    def _forward(self) -> tuple[Any, ...]:
        """(loss, image_emb, text_emb, logit_scale, logit_bias or None): OpenVision's two-caption loss, images
        against the first B texts and against the next B, averaged, times contrastive_weight."""
        with self._precision():
            image_emb, text_emb, scale, *bias = self.model(self.images, self.texts)
            bias = bias[0] if bias else None
            b = image_emb.shape[0]
            pair = [self._loss(image_emb, texts, scale, bias) for texts in (text_emb[:b], text_emb[b:])]
            loss = self._cfg.contrastive_weight * 0.5 * (pair[0] + pair[1])
        return loss, image_emb, text_emb, scale, bias

    def step(self) -> float:
        """One training step on the fixed batch; the loss before the update. Returns when the device is done."""
        torch = self._torch
        lr = float(self._lrs[min(self._step, len(self._lrs) - 1)])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._forward()[0]
        loss.backward()
        if self._cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self._trainable, self._cfg.grad_clip_norm)
        self.optimizer.step()
        self._step += 1
        value = loss.item()  # waits for the forward; the synchronize below for the update too
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return value

    def loss_and_embeddings(self) -> Probe:
        """The step's loss on the fixed batch without a gradient or an update, and its inputs."""
        with self._torch.no_grad():
            loss, image_emb, text_emb, scale, bias = self._forward()
        as_numpy = lambda x: x.float().cpu().numpy()  # noqa: E731
        return Probe(float(loss), as_numpy(image_emb), as_numpy(text_emb), float(scale),
                     None if bias is None else float(bias.detach()))


def open_clip_trainer(cfg: Config, *, device: str = "cpu", seed: int = 0) -> OpenClipTrainer:
    """open_clip's train step for `cfg`'s towers on `device` ("cpu", "cuda", "cuda:1", ...). Raises
    RuntimeError when torch or open_clip is not installed."""
    return OpenClipTrainer(cfg, device, seed)
