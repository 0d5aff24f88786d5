"""The model family's MFU table: every model file at its recipe resolutions and per-device batch, through the
benchmark harness (`perf/benchmark.py`), written as mfu.md, mfu.json and mfu.png. `benchmarks/mfu.py` is the
command line.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

from etils import epath

from openvision_max.config import load_stages
from openvision_max.perf import benchmark

CONFIGS = epath.Path(__file__).resolve().parents[2] / "configs"
# Model file -> resolutions of the OpenVision recipe (shared/reference/openvision.md).
MODELS = {"Ti16": (160, 224, 384), "S16": (160, 224, 384), "B16": (160, 224, 384),
          "L14": (84, 224, 336), "So400m14": (84, 224, 384), "H14": (84, 224)}
# OpenVision's patch-8 variants (Ti/8, S/8, B/8) are the patch-16 files with patch_size=8.
PATCH8 = ("Ti16", "S16", "B16")
# The recipe's global batches were run data-parallel over 128 chips (128 x 1 x 1): its per-device batch is
# each stage's global batch / 128 (256 at low resolution, 128 at 224, 64 at 336/384).
RECIPE_CHIPS = 128


@dataclasses.dataclass(frozen=True)
class Entry:
    model: str          # the model file's name
    image_size: int
    patch_size: int | None  # None: the file's own
    stage: str          # the recipe stage at that resolution
    recipe_per_device: int


def entries(*, all_resolutions: bool, patch8: bool) -> list[Entry]:
    """The table's rows in order: the 224 px stage of each model (every recipe stage with all_resolutions),
    then the patch-8 variants with patch8."""
    variants = [(name, None) for name in MODELS] + ([(name, 8) for name in PATCH8] if patch8 else [])
    rows = []
    for name, patch in variants:
        stages = load_stages([str(CONFIGS / f"{name}.yml")], platform="cpu", num_devices=1)
        for cfg in stages:
            if all_resolutions or cfg.image_size == 224:
                rows.append(Entry(name, cfg.image_size, patch, cfg.derived.stage_name,
                                  max(1, cfg.global_batch_size // RECIPE_CHIPS)))
    return rows


def _args(entry: Entry, per_device: int, topology: str, slices: int, out_dir: epath.Path):
    argv = [str(CONFIGS / f"{entry.model}.yml"), f"stage={entry.stage}", f"per_device_batch_size={per_device}",
            *([f"patch_size={entry.patch_size}"] if entry.patch_size else []), "--mode", "aot",
            "--topology", topology, "--slices", str(slices), "--output-dir", str(out_dir / "points")]
    return benchmark.parse(argv)


def measure_entry(entry: Entry, topology: str, slices: int, out_dir: epath.Path, say=print) -> dict[str, Any]:
    """The entry at its recipe per-device batch or, when that does not fit, the largest power-of-two
    fraction of it that does (each try a cached benchmark point)."""
    per_device, tried = entry.recipe_per_device, []
    while True:
        args, points = _args(entry, per_device, topology, slices, out_dir)
        result = benchmark.run_sweep(points, args, out_dir / "points", say=say).results[0]
        result = {**result, "recipe_per_device_batch": entry.recipe_per_device, "tried_per_device": tried}
        if result["fits"] or per_device == 1:
            return result
        tried = [*tried, per_device]
        per_device //= 2


def train_gflop_per_sample(result: dict[str, Any]) -> float | None:
    aot = result.get("aot")
    if not aot:
        return None
    return aot["model_flops_per_device"] * aot["num_devices"] / aot["global_batch_size"] / 1e9


def markdown(results: Sequence[dict[str, Any]], topology: str) -> str:
    lines = [f"MFU of the train step on {topology}, from the TPU compiler's cost model (modelled, not measured)",
             "", "| model | res | batch/chip (recipe) | memory/chip | fits | modelled step | modelled MFU | "
             "modelled samples/s/chip | train GFLOP/sample |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        step, mfu = r.get("modelled_step_seconds"), r.get("modelled_mfu")
        rate = r.get("modelled_samples_per_second")
        chips = r["aot"]["num_devices"] if r.get("aot") else None
        gflop = train_gflop_per_sample(r)
        lines.append(
            f"| {r['model']} | {r['image_size']} | {r['per_device_batch_size']} ({r['recipe_per_device_batch']}) | "
            f"{benchmark.gigabytes(r.get('memory_bytes'))} | {'yes' if r['fits'] else 'no'} | "
            f"{f'{step:.3f} s' if step else 'n/a'} | {f'{mfu:.1%}' if mfu else 'n/a'} | "
            f"{f'{rate / chips:.1f}' if rate and chips else 'n/a'} | {f'{gflop:.1f}' if gflop else 'n/a'} |")
    return "\n".join(lines) + "\n"


def plot(results: Sequence[dict[str, Any]], path: epath.Path, topology: str) -> None:
    """mfu.png: modelled MFU against train GFLOP per sample, one line per resolution, points named."""
    import matplotlib
    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for res in sorted({r["image_size"] for r in results}):
        pts = sorted((train_gflop_per_sample(r), r["modelled_mfu"], r["model"]) for r in results
                     if r["image_size"] == res and r.get("modelled_mfu") and train_gflop_per_sample(r))
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=f"{res} px")
        for x, y, name in pts:
            ax.annotate(name, (x, 100 * y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("model FLOPs per sample, train (GFLOP)")
    ax.set_ylabel("modelled MFU (%)")
    ax.set_title(f"Train-step MFU on {topology} (TPU compiler cost model, modelled)")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def write(results: Sequence[dict[str, Any]], out_dir: epath.Path, topology: str) -> str:
    """mfu.md, mfu.json and mfu.png in out_dir; returns the markdown table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(results, topology)
    (out_dir / "mfu.md").write_text(table)
    (out_dir / "mfu.json").write_text(json.dumps(list(results), indent=1, default=str))
    plot(results, out_dir / "mfu.png", topology)
    return table
