"""The typed config schema: every key a run accepts, and the values derived from them.

Defaults live in exactly one place, `configs/base.yml`; the dataclasses here carry types only. The loader
(`openvision_max.config`) checks each value against these types, then `finalize` checks combinations and
computes the derived values.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional, Union

ATTENTION_KINDS = ("dot_product", "flash", "cudnn")
REMAT_POLICIES = (
    "none", "full", "minimal", "save_qkv_proj", "save_out_proj", "save_dot_except_mlp",
    "minimal_offloaded", "save_qkv_proj_offloaded", "save_out_proj_offloaded",
)
MESH_AXES = ("data", "fsdp", "tensor")

# Which implementations exist per target platform. `flash` on CPU interprets the TPU kernel (tests).
ATTENTION_AVAILABLE = {
    "cpu": ("dot_product", "flash"),
    "tpu": ("dot_product", "flash"),
    "gpu": ("dot_product", "flash", "cudnn"),
}
FLASH_BLOCK_KEYS = ("flash_block_q", "flash_block_kv", "flash_block_q_bwd", "flash_block_kv_bwd")
FLASH_LANES = 128  # TPU kernel blocks are multiples of the vector lane count
# Host offload needs a pinned-host memory space, which the CPU backend does not have.
OFFLOAD_PLATFORMS = ("tpu", "gpu")

RematPolicy = Literal[REMAT_POLICIES]  # type: ignore[valid-type]


class ConfigError(ValueError):
    """A config or command-line problem; the CLI prints it as one line and exits 2."""


@dataclasses.dataclass(frozen=True)
class Tower:
    """One transformer stack (vision encoder, text encoder or caption decoder)."""
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    remat_policy: Optional[RematPolicy]  # null: use the top-level remat_policy
    attention: Optional[Literal[ATTENTION_KINDS]]  # type: ignore[valid-type]  # null: the top-level attention

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


@dataclasses.dataclass(frozen=True)
class TextTower(Tower):
    context_length: int


@dataclasses.dataclass(frozen=True)
class DecoderTower(Tower):
    caption_length: int
    fusion: Literal["concat", "cross_attn"]
    keep_ratio: float


@dataclasses.dataclass(frozen=True)
class Derived:
    """Values computed from the rest of the config in `finalize`; not settable by users."""
    stage_name: str               # the stage this config describes ("main" without `stages`)
    stage_index: int
    step_offset: int              # steps of the stages before this one (checkpoint steps count across stages)
    platform: str                 # the platform compiled for: cpu, gpu or tpu
    num_devices: int
    ici_mesh_shape: tuple[int, int, int]   # (data, fsdp, tensor) within a slice
    dcn_mesh_shape: tuple[int, int, int]   # (data, fsdp, tensor) across slices
    batch_shards: int             # devices the batch is split over: data x fsdp, ICI x DCN
    per_device_batch_size: int
    microbatch_size: int          # global_batch_size / gradient_accumulation_steps
    peak_learning_rate: float     # base_lr x global_batch_size / 256
    num_patches: int
    kept_patches: int             # patch tokens the caption decoder sees: int(num_patches x decoder.keep_ratio)
    vision_remat_policy: str
    text_remat_policy: str
    decoder_remat_policy: str
    vision_attention: str
    text_attention: str
    decoder_attention: str


@dataclasses.dataclass(frozen=True)
class Config:
    # Run and output.
    run_name: str
    base_output_directory: str
    seed: int
    steps: int
    global_batch_size: int
    log_period: int
    checkpoint_period: int
    max_checkpoints_to_keep: int
    eval_only: bool
    load_parameters_path: str
    export_dir: str
    stage: str
    stages: list[dict]
    # Model.
    objective: Literal["openvision", "openvision2"]
    image_size: int
    patch_size: int
    drop_partial_patches: bool
    embed_dim: int
    vocab_size: int
    dtype: Literal["bfloat16", "float32"]
    attention: Literal[ATTENTION_KINDS]  # type: ignore[valid-type]
    flash_block_q: int
    flash_block_kv: int
    flash_block_q_bwd: int
    flash_block_kv_bwd: int
    remat_policy: RematPolicy
    scan_layers: bool
    vision: Tower
    text: TextTower
    decoder: DecoderTower
    # Losses and optimiser.
    contrastive_loss: Literal["softmax", "sigmoid"]
    logit_scale_init: Optional[float]
    contrastive_weight: float
    caption_weight: float
    base_lr: float
    warmup_steps: int
    gradient_accumulation_steps: int
    grad_clip_norm: float
    max_nonfinite_steps: int
    weight_decay: float
    adam_b1: float
    adam_b2: float
    adam_eps: float
    # Data.
    dataset_type: Literal["synthetic", "grain"]
    reuse_example_batch: bool
    train_data: list[str]
    data_cache_dir: str
    train_augment: bool
    grain_worker_count: int
    grain_worker_buffer_size: int
    grain_read_threads: int
    grain_prefetch_buffer_size: int
    # Evaluation.
    evals: list[dict]
    eval_period: int
    eval_batch_size: int
    # Parallelism.
    ici_data_parallelism: int
    ici_fsdp_parallelism: int
    ici_tensor_parallelism: int
    dcn_data_parallelism: int
    dcn_fsdp_parallelism: int
    dcn_tensor_parallelism: int
    logical_axis_rules: list[tuple[str, Optional[Union[str, list[str]]]]]
    # Several processes (jax.distributed).
    coordinator_address: str
    num_processes: int
    process_id: int
    jax_distributed_initialization_timeout: int
    skip_jax_distributed_system: bool
    # Ahead-of-time compilation for a TPU topology from this host.
    compile_topology: str
    compile_topology_num_slices: int
    # Observability.
    profiler: Literal["", "xplane"]
    skip_first_n_steps_for_profiler: int
    profiler_steps: int
    profile_all_hosts: bool
    memory_metrics: bool
    jax_smi: bool
    collect_stack_trace: bool
    stack_trace_to_cloud: bool
    stack_trace_interval_seconds: int
    step_timeout_seconds: float
    compilation_cache_dir: str
    enable_goodput_recording: bool
    # Filled by `finalize`.
    derived: Optional[Derived] = dataclasses.field(default=None, metadata={"derived": True})


def _fill_mesh(shape: tuple[int, ...], total: int, kind: str) -> tuple[int, ...]:
    """Replace a single -1 in `shape` so that the product equals `total`."""
    if any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"{kind}_*_parallelism must be positive or -1, got {dict(zip(MESH_AXES, shape))}")
    unknown = [i for i, s in enumerate(shape) if s == -1]
    known = math.prod(s for s in shape if s != -1)
    if len(unknown) > 1:
        raise ConfigError(f"at most one {kind}_*_parallelism may be -1, got {dict(zip(MESH_AXES, shape))}")
    if unknown:
        if total % known:
            raise ConfigError(
                f"{kind} parallelism {dict(zip(MESH_AXES, shape))}: the fixed axes ({known}) do not divide "
                f"the {total} devices available")
        shape = tuple(total // known if s == -1 else s for s in shape)
    if math.prod(shape) != total:
        used = f"{kind} parallelism {dict(zip(MESH_AXES, shape))} uses {math.prod(shape)}"
        raise ConfigError(f"{used} slices but the job has {total}" if kind == "dcn" else
                          f"{used} devices but {total} are available")
    return shape


def _check_model(cfg: Config) -> None:
    for key in ("image_size", "patch_size", "embed_dim", "vocab_size"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {getattr(cfg, key)}")
    remainder = cfg.image_size % cfg.patch_size
    if remainder and not cfg.drop_partial_patches:
        raise ConfigError(
            f"image_size={cfg.image_size} is not divisible by patch_size={cfg.patch_size}: the patch grid must "
            f"tile the image (drop_partial_patches=true ignores the last {remainder} pixel rows and columns, "
            "as SoViT-400m/14 does at 384)")
    for name in ("vision", "text", "decoder"):
        tower = getattr(cfg, name)
        for key in ("width", "depth", "mlp_dim", "num_heads"):
            if getattr(tower, key) <= 0:
                raise ConfigError(f"{name}.{key} must be positive, got {getattr(tower, key)}")
        if tower.width % tower.num_heads:
            raise ConfigError(
                f"{name}.width={tower.width} is not divisible by {name}.num_heads={tower.num_heads}")
    if cfg.vision.width % 4 or cfg.vision.width < 8:
        raise ConfigError(
            f"vision.width={cfg.vision.width} must be a multiple of 4 and at least 8 "
            "(the 2-D sin-cos position embedding splits it into four parts)")
    if cfg.text.context_length < 2:
        raise ConfigError("text.context_length must be at least 2 ([CLS] is the last token)")
    for key in ("steps", "global_batch_size", "log_period", "checkpoint_period", "gradient_accumulation_steps",
                "max_checkpoints_to_keep", "max_nonfinite_steps"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {getattr(cfg, key)}")


def _check_objective(cfg: Config) -> None:
    dec = cfg.decoder
    if not 0 < dec.keep_ratio <= 1:
        raise ConfigError(f"decoder.keep_ratio must be in (0, 1], got {dec.keep_ratio:g}")
    patches = (cfg.image_size // cfg.patch_size) ** 2
    if int(patches * dec.keep_ratio) < 1:
        raise ConfigError(f"decoder.keep_ratio={dec.keep_ratio:g} keeps no patch token of the {patches} at "
                          f"image_size={cfg.image_size}, patch_size={cfg.patch_size}")
    if cfg.objective == "openvision" and dec.fusion != "concat":
        raise ConfigError(f"decoder.fusion={dec.fusion} is an objective=openvision2 decoder; objective=openvision's "
                          "caption decoder is the concat prefix-LM (decoder.fusion=concat)")
    if cfg.objective == "openvision2":
        if dec.fusion == "cross_attn" and dec.depth % 2:
            raise ConfigError(f"decoder.fusion=cross_attn pairs self- and cross-attention blocks: decoder.depth "
                              f"must be even, got {dec.depth}")
        if dec.caption_length < 2:
            raise ConfigError("objective=openvision2 reads the caption teacher-forced: decoder.caption_length must "
                              f"be at least 2, got {dec.caption_length}")


EVAL_TYPES = ("zeroshot", "retrieval", "caption_loss", "zeroshot_generative")
# Keys an `evals:` entry may carry, per evaluator type (beyond name, type and path).
EVAL_OPTIONS = {
    "zeroshot": ("class_names", "templates", "max_examples"),
    "retrieval": ("format", "image_dir", "split", "max_images"),
    "caption_loss": ("max_examples",),
    "zeroshot_generative": ("class_names", "templates", "max_examples"),
}
# The evals that embed texts with the text tower, which objective=openvision2 does not have.
TEXT_TOWER_EVALS = ("zeroshot", "retrieval")


def _check_loss(cfg: Config) -> None:  # and the optimiser
    if cfg.logit_scale_init is not None and cfg.logit_scale_init <= 0:
        raise ConfigError(f"logit_scale_init must be positive, got {cfg.logit_scale_init}")
    for key in ("contrastive_weight", "caption_weight", "base_lr", "weight_decay", "grad_clip_norm", "adam_eps",
                "warmup_steps"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    for key in ("adam_b1", "adam_b2"):  # a decay of 1 never forgets its first value; above 1 it diverges
        if not 0 <= getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {getattr(cfg, key)}")


def _check_data(cfg: Config) -> None:
    if cfg.dataset_type == "grain" and not cfg.train_data and not cfg.eval_only:
        raise ConfigError("dataset_type=grain needs train_data: dataset directories, shard files or patterns "
                          "(e.g. train_data=[/data/recap/train] or train_data=[demo:shapes_train])")
    for key in ("grain_worker_count", "grain_read_threads", "eval_period"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    for key in ("grain_worker_buffer_size", "grain_prefetch_buffer_size", "eval_batch_size"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {getattr(cfg, key)}")
    names = set()
    for i, entry in enumerate(cfg.evals):
        where = f"evals[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a mapping with name, type and path, got {entry!r}")
        missing = [k for k in ("name", "type", "path") if k not in entry]
        if missing:
            raise ConfigError(f"{where} lacks {', '.join(missing)} (each eval needs name, type and path)")
        if entry["type"] not in EVAL_TYPES:
            raise ConfigError(f"{where}: type {entry['type']!r} is not one of {', '.join(EVAL_TYPES)}")
        unknown = sorted(set(entry) - {"name", "type", "path", *EVAL_OPTIONS[entry["type"]]})
        if unknown:
            raise ConfigError(f"{where} ({entry['name']}): unknown option {unknown[0]!r}; a {entry['type']} eval "
                              f"takes {', '.join(EVAL_OPTIONS[entry['type']])}")
        if cfg.objective == "openvision2" and entry["type"] in TEXT_TOWER_EVALS:
            raise ConfigError(f"{where} ({entry['name']}): a {entry['type']} eval embeds texts with the text tower, "
                              "which objective=openvision2 does not have; use type: zeroshot_generative (class "
                              "prompts ranked by caption likelihood) or caption_loss")
        if entry["name"] in names:
            raise ConfigError(f"{where}: eval name {entry['name']!r} is used twice")
        names.add(entry["name"])
    if cfg.eval_only and not cfg.evals:
        raise ConfigError("eval_only=true needs at least one entry in evals")


def _check_observe(cfg: Config) -> None:
    if cfg.skip_first_n_steps_for_profiler < 0:
        raise ConfigError(f"skip_first_n_steps_for_profiler must be >= 0, got {cfg.skip_first_n_steps_for_profiler}")
    if cfg.profiler and cfg.profiler_steps <= 0:
        raise ConfigError(f"profiler={cfg.profiler} traces profiler_steps steps, which must be positive, got "
                          f"{cfg.profiler_steps}")
    if cfg.collect_stack_trace and cfg.stack_trace_interval_seconds <= 0:
        raise ConfigError("collect_stack_trace=true needs a positive stack_trace_interval_seconds, got "
                          f"{cfg.stack_trace_interval_seconds}")
    if cfg.step_timeout_seconds < 0:
        raise ConfigError(f"step_timeout_seconds must be >= 0 (0 = no watchdog), got {cfg.step_timeout_seconds:g}")


def _check_backend(cfg: Config, platform: str) -> None:
    for key in ("jax_distributed_initialization_timeout", "compile_topology_num_slices"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {getattr(cfg, key)}")
    available = ATTENTION_AVAILABLE[platform]
    for key, kind in (("attention", cfg.attention),
                      *((f"{n}.attention", getattr(cfg, n).attention) for n in ("vision", "text", "decoder"))):
        if kind is not None and kind not in available:
            raise ConfigError(f"{key}={kind!r} is not available on {platform}; available: {', '.join(available)}")
    for name in ("vision", "text", "decoder"):
        policy = getattr(cfg, name).remat_policy or cfg.remat_policy
        if policy.endswith("_offloaded") and platform not in OFFLOAD_PLATFORMS:
            raise ConfigError(
                f"remat policy {policy!r} ({name}) offloads to host memory, which {platform} does not "
                f"support; use one of: {', '.join(p for p in REMAT_POLICIES if not p.endswith('_offloaded'))}")


def _check_flash(cfg: Config, platform: str, tensor_shards: dict[str, int]) -> None:
    """What the flash kernels need: 128-multiple blocks, a TPU-tileable head_dim (TPU kernel; the GPU kernels
    take any), and heads that split evenly over the mesh axes `activation_heads` maps to (the kernel runs per
    shard under shard_map)."""
    for key in FLASH_BLOCK_KEYS:
        value = getattr(cfg, key)
        if value <= 0 or value % FLASH_LANES:
            raise ConfigError(f"{key}={value} must be a positive multiple of {FLASH_LANES} (TPU vector lanes)")
    flash_towers = [n for n in ("vision", "text", "decoder")
                    if (getattr(cfg, n).attention or cfg.attention) == "flash"]
    if not flash_towers:
        return
    heads_axes = next((axes for name, axes in cfg.logical_axis_rules if name == "activation_heads"), None)
    heads_shards = math.prod(tensor_shards[a] for a in ([heads_axes] if isinstance(heads_axes, str)
                                                        else heads_axes or []))
    for name in flash_towers:
        tower = getattr(cfg, name)
        d = tower.head_dim
        if platform != "gpu" and d > FLASH_LANES and d % FLASH_LANES:
            raise ConfigError(f"attention=flash on TPU needs head_dim <= {FLASH_LANES} or a multiple of "
                              f"{FLASH_LANES}; {name} has {d} ({name}.width={tower.width} / "
                              f"{name}.num_heads={tower.num_heads})")
        if tower.num_heads % heads_shards:
            raise ConfigError(f"attention=flash splits heads over {heads_shards} devices (activation_heads -> "
                              f"{heads_axes}), which {name}.num_heads={tower.num_heads} is not divisible by")


def _check_rules(cfg: Config) -> None:
    for name, axes in cfg.logical_axis_rules:
        for axis in [axes] if isinstance(axes, str) else axes or []:
            if axis not in MESH_AXES:
                raise ConfigError(
                    f"logical_axis_rules: {name!r} maps to {axis!r}, which is not a mesh axis "
                    f"({', '.join(MESH_AXES)})")


def finalize(cfg: Config, *, platform: str, num_devices: int, num_slices: Optional[int] = None,
             stage_name: str = "main", stage_index: int = 0) -> Config:
    """Checks combinations of keys and returns `cfg` with `derived` filled in. `num_slices` is the job's
    slice count found at run time (the DCN axes must use exactly that many; a -1 takes them all); None
    leaves it to the DCN axes (or to compile_topology_num_slices)."""
    _check_model(cfg)
    _check_objective(cfg)
    _check_rules(cfg)
    _check_data(cfg)
    _check_loss(cfg)
    _check_observe(cfg)
    _check_backend(cfg, platform)
    dcn = (cfg.dcn_data_parallelism, cfg.dcn_fsdp_parallelism, cfg.dcn_tensor_parallelism)
    ici = (cfg.ici_data_parallelism, cfg.ici_fsdp_parallelism, cfg.ici_tensor_parallelism)
    if cfg.compile_topology:
        num_slices = cfg.compile_topology_num_slices
    elif num_slices is None:
        num_slices = max(1, math.prod(s for s in dcn if s > 0))
    if num_devices % num_slices:
        raise ConfigError(f"{num_devices} devices cannot be split into {num_slices} slices")
    dcn = _fill_mesh(dcn, num_slices, "dcn")
    ici = _fill_mesh(ici, num_devices // num_slices, "ici")
    batch_shards = ici[0] * ici[1] * dcn[0] * dcn[1]
    _check_flash(cfg, platform, {axis: i * d for axis, i, d in zip(MESH_AXES, ici, dcn)})
    if cfg.global_batch_size % batch_shards:
        raise ConfigError(
            f"global_batch_size={cfg.global_batch_size} is not divisible by the {batch_shards} devices the "
            f"batch is split over (data x fsdp = {ici[0] * dcn[0]} x {ici[1] * dcn[1]})")
    accum = cfg.gradient_accumulation_steps
    if cfg.global_batch_size % (accum * batch_shards):
        raise ConfigError(
            f"global_batch_size={cfg.global_batch_size} does not split into gradient_accumulation_steps={accum} "
            f"microbatches divisible by the {batch_shards} devices the batch is split over")
    derived = Derived(
        stage_name=stage_name,
        stage_index=stage_index,
        step_offset=0,
        platform=platform,
        num_devices=num_devices,
        ici_mesh_shape=ici,
        dcn_mesh_shape=dcn,
        batch_shards=batch_shards,
        per_device_batch_size=cfg.global_batch_size // batch_shards,
        microbatch_size=cfg.global_batch_size // accum,
        peak_learning_rate=cfg.base_lr * cfg.global_batch_size / 256,
        num_patches=(cfg.image_size // cfg.patch_size) ** 2,
        kept_patches=int((cfg.image_size // cfg.patch_size) ** 2 * cfg.decoder.keep_ratio),
        vision_remat_policy=cfg.vision.remat_policy or cfg.remat_policy,
        text_remat_policy=cfg.text.remat_policy or cfg.remat_policy,
        decoder_remat_policy=cfg.decoder.remat_policy or cfg.remat_policy,
        vision_attention=cfg.vision.attention or cfg.attention,
        text_attention=cfg.text.attention or cfg.attention,
        decoder_attention=cfg.decoder.attention or cfg.attention,
    )
    return dataclasses.replace(cfg, derived=derived)
