"""A resolved config read back (a run's config.yml, an export's openvision_max_config.yml) for inference.

A resolved config holds every key plus `derived`. It is revalidated by the normal loader, for one device of
this host and with the settings that only concern training replaced: the mesh, remat, a TPU/GPU-only
attention kernel, AOT compilation, stages, training data and evals. When the repository's configs/base.yml
is present it is the bottom layer, so a config written before a key was added still loads (with that key's
default).
"""

from __future__ import annotations

import pathlib
import tempfile
from typing import Any, Optional

import yaml
from etils import epath

from openvision_max.config import load_config
from openvision_max.config.schema import ATTENTION_AVAILABLE, Config

BASE_YML = pathlib.Path(__file__).resolve().parents[1] / "configs" / "base.yml"


def _newest_step(checkpoints: epath.Path) -> Optional[int]:
    # Orbax gives a step directory its final (numeric) name only once it is complete.
    steps = [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit() and (p / "state").is_dir()]
    return max(steps, default=None)


def find_run(path: epath.Path) -> Optional[tuple[epath.Path, Optional[int]]]:
    """(run directory, checkpoint step or None for the newest) of a run directory (config.yml +
    checkpoints/), its checkpoints/ directory or one step directory (local or gs://); None for anything
    else."""
    path = epath.Path(path)
    if (path / "config.yml").is_file() and (path / "checkpoints").is_dir():
        return path, _newest_step(path / "checkpoints")
    if path.name == "checkpoints" and (path.parent / "config.yml").is_file():
        return path.parent, _newest_step(path)
    if path.name.isdigit() and (path / "state").is_dir() and (path.parent.parent / "config.yml").is_file():
        return path.parent.parent, int(path.name)
    return None


def stage_of(resolved: dict[str, Any], step: Optional[int]) -> dict[str, Any]:
    """The stage dict of a config.yml that covers checkpoint `step` (the last stage when unknown)."""
    stages = resolved.get("stages_resolved")
    if not stages:
        return resolved
    if step is not None:
        for s in stages:
            offset = s.get("derived", {}).get("step_offset", 0)
            if offset < step <= offset + s["steps"]:
                return s
    return stages[-1]


def inference_config(resolved: dict[str, Any], *, dtype: str = "float32", platform: Optional[str] = None) -> Config:
    """The Config of one resolved stage dict, for inference on one device of `platform` (default: JAX's)."""
    import jax

    platform = platform or jax.default_backend()
    raw = {k: v for k, v in resolved.items() if k not in ("derived", "stages_resolved")}
    # Data and evals belong to the run that trained the model (their paths may not exist here).
    raw.update(dataset_type="synthetic", train_data=[], evals=[], eval_only=False, load_parameters_path="",
               export_dir="")
    raw.update(stages=[], stage="", compile_topology="", remat_policy="none", dtype=dtype,
               ici_data_parallelism=1, ici_fsdp_parallelism=-1, ici_tensor_parallelism=1,
               dcn_data_parallelism=-1, dcn_fsdp_parallelism=1, dcn_tensor_parallelism=1)
    for tower in ("vision", "text", "decoder"):
        if isinstance(raw.get(tower), dict):
            raw[tower] = {**raw[tower], "remat_policy": None}
    if raw.get("attention") not in ATTENTION_AVAILABLE.get(platform, ("dot_product",)):
        raw["attention"] = "dot_product"  # same numbers; the fused kernels are for training speed
    if BASE_YML.is_file():
        raw["base_config"] = str(BASE_YML)
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    try:
        return load_config([f.name], platform=platform, num_devices=1)
    finally:
        pathlib.Path(f.name).unlink()
