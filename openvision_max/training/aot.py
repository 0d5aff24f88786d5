"""Ahead-of-time compilation of the real train step for a TPU topology, on any host (no TPU needed).

    python train.py configs/L14.yml compile_topology=v5p-256 compile_topology_num_slices=1

libtpu supplies compile-only devices for the topology; the trainer's own jitted step (`jit_train_step`) is
lowered with abstract, sharded state and batch and compiled by the TPU compiler. Nothing runs: the report
is the compiler's memory per device (does it fit the chip's HBM?), its FLOP count and its *modelled* step
time (`optimal_seconds`, the compiler's cost model, not a measurement), and the MFU that time would give.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time
from typing import Any, Sequence

from openvision_max import models
from openvision_max.config import topology
from openvision_max.config.schema import Config, ConfigError
from openvision_max.mesh import peak_flops, sharding
from openvision_max.models import flops
from openvision_max.training import optimizer
from openvision_max.training import step as train_step

GB = 1e9


def _prefer_cpu_backend() -> None:
    """Concrete arrays (RNG keys, constants) belong on the host CPU: never open a local TPU for an AOT
    compile (on a TPU VM a training job may own the chips). An explicit JAX_PLATFORMS is respected, and once
    JAX's backends are up (a module that makes arrays at import) this changes nothing."""
    import jax
    if jax.config.jax_platforms is None:
        jax.config.update("jax_platforms", "cpu")


def build_mesh(cfg: Config):
    """The config's (data, fsdp, tensor) mesh over compile-only devices of `cfg.compile_topology`."""
    devices = topology.devices(cfg.compile_topology, cfg.compile_topology_num_slices)
    return sharding.create_mesh(cfg, devices)


def abstract_batch(cfg: Config, mesh) -> dict[str, Any]:
    """The batch layout of `openvision_max.data` (B = global_batch_size), sharded over the batch axes:
    images uint8 [B, H, W, 3], texts int32 [2B, L], caption_targets and caption_mask int32 [B, Q]."""
    import jax
    import jax.numpy as jnp
    b, q = cfg.global_batch_size, cfg.decoder.caption_length
    shapes = {
        "images": ((b, cfg.image_size, cfg.image_size, 3), jnp.uint8),
        "texts": ((2 * b, cfg.text.context_length), jnp.int32),
        "caption_targets": ((b, q), jnp.int32),
        "caption_mask": ((b, q), jnp.int32),
    }
    batch_sh = sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh) for k, (shape, dtype) in shapes.items()}


def compile_train_step(cfg: Config):
    """(compiled executable, mesh, {"lower_s", "compile_s"}) for the trainer's train step on the topology."""
    _prefer_cpu_backend()
    mesh = build_mesh(cfg)
    model, tx = models.build(cfg), optimizer.build(cfg)
    state, batch = train_step.abstract_state(model, tx, cfg, mesh), abstract_batch(cfg, mesh)
    step_fn = train_step.jit_train_step(model, tx, cfg, mesh, state_sh=train_step.shardings_of(state))
    t0 = time.perf_counter()
    with sharding.activate(cfg, mesh):
        lowered = step_fn.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, mesh, {"lower_s": t1 - t0, "compile_s": t2 - t1}


def memory_report(compiled, hbm_bytes: int) -> dict[str, Any]:
    """Bytes per device from the compiler's buffer assignment. Donated state is aliased to the new state, so
    the footprint is arguments + outputs - aliased + temporaries (+ the program itself). `fits` compares it
    with the datasheet HBM; the TPU runtime keeps a little of that for itself, so a few % headroom is thin."""
    m = compiled.memory_analysis()
    parts = {
        "argument_bytes": m.argument_size_in_bytes,
        "output_bytes": m.output_size_in_bytes,
        "alias_bytes": m.alias_size_in_bytes,
        "temp_bytes": m.temp_size_in_bytes,
        "code_bytes": m.generated_code_size_in_bytes,
    }
    total = (parts["argument_bytes"] + parts["output_bytes"] - parts["alias_bytes"] + parts["temp_bytes"]
             + parts["code_bytes"])
    return {**parts, "total_bytes": total, "hbm_bytes": hbm_bytes, "fits": total <= hbm_bytes}


def while_loops(compiled) -> list[str]:
    """Where the compiled program loops: the op paths of its `while` instructions (scanned layers, gradient
    accumulation), e.g. ["vision/transformer", "text/transformer"], deduplicated, forward and backward."""
    names = re.findall(r"\bwhile\(.*?op_name=\"([^\"]*)\"", compiled.as_text())
    # "jit(train_step)/transpose(jvp(OpenVision))/vision/transformer/while" -> "vision/transformer"
    paths = ["/".join(p for p in n.split("/")[:-1] if "(" not in p) or n for n in names]
    return sorted(set(paths))


# Custom calls of TPU programs that the cost model books at -1 s each (seen with libtpu 0.0.42.1).
UNCOSTED_CUSTOM_CALLS = ("ConcatBitcast", "SliceId", "ZeroCrop")


def cost_report(cfg: Config, compiled, device_kind: str) -> dict[str, Any]:
    """The compiler's per-device FLOPs, bytes and modelled step time, and the MFU of the analytic model FLOPs
    (flops.py, no remat recompute) at that modelled time against the datasheet peak.

    The modelled time is withheld (None; the compiler's figure stays in `optimal_seconds_raw`) when it is
    known to be wrong: XLA's cost analysis counts a while loop's body once, not once per iteration (L/14
    scanned: 1.23 TFLOP and 11 ms against 15.8 TFLOP and 88 ms unrolled), and it books every custom call it
    cannot cost at -1 s, so a program holding any has a negative total and no estimate. Such calls come from
    the TPU compiler itself: `ConcatBitcast` joins the halves of a sliced prefetch into on-chip memory (e.g.
    the demo's vocab-sized shards on v4-8, v5e-1, v5e-4, v6e-1), `SliceId`/`ZeroCrop` appear in multi-slice
    programs; unrolling the layers does not remove them. They are counted in `uncosted_custom_calls`.
    """
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax returned one dict per program
    raw_s = float(cost.get("optimal_seconds", 0.0))
    loops = while_loops(compiled)
    text = compiled.as_text()
    uncosted = {t: n for t in UNCOSTED_CUSTOM_CALLS if (n := text.count(f'custom_call_target="{t}"'))}
    modelled_s = raw_s if raw_s > 0 and not loops else None
    model_flops = flops.flops_per_sample(cfg)["train_total"] * cfg.global_batch_size / cfg.derived.num_devices
    peak = peak_flops.datasheet_peak(device_kind, cfg.dtype)
    return {
        "compiled_flops_per_device": float(cost.get("flops", 0.0)),
        "compiled_bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)),
        "model_flops_per_device": model_flops,
        "while_loops": loops,
        "uncosted_custom_calls": uncosted,
        "optimal_seconds_raw": raw_s,
        "modelled_step_seconds": modelled_s,
        "peak_flops_per_device": peak,
        "modelled_mfu": model_flops / modelled_s / peak if modelled_s and peak else None,
        "modelled_samples_per_second": cfg.global_batch_size / modelled_s if modelled_s else None,
    }


def report(cfg: Config, *, model_unfit: bool = True) -> dict[str, Any]:
    """Compiles the train step of `cfg` for its topology and returns every figure of the report.

    With scan_layers=true the compiler's cost model cannot see through the layer loop, so the same step is
    compiled a second time unrolled and its modelled time reported, labelled as such (`cost_model_of`); the
    memory figures are always those of the configured (scanned) program. When the cost model already refused
    the scanned program (a non-positive time: custom calls it cannot cost), the unrolled one holds the same
    calls, so the second compile is skipped; so it is, with model_unfit=False, for a program that does not fit
    (a benchmark searching for the batch that fits needs no time for the ones that do not).
    """
    compiled, mesh, times = compile_train_step(cfg)
    spec = topology.spec(cfg.compile_topology)
    device = mesh.devices.flat[0]
    cost = cost_report(cfg, compiled, device.device_kind)
    cost_model_of = "the configured program"
    memory = memory_report(compiled, spec.hbm_bytes)
    if cost["while_loops"] and cfg.scan_layers and cost["optimal_seconds_raw"] > 0 and (
            model_unfit or memory["fits"]):
        unrolled_cfg = dataclasses.replace(cfg, scan_layers=False)
        unrolled, _, unrolled_times = compile_train_step(unrolled_cfg)
        unrolled_cost = cost_report(unrolled_cfg, unrolled, device.device_kind)
        if not unrolled_cost["while_loops"]:
            loops, cost = cost["while_loops"], unrolled_cost
            cost["while_loops_of_configured_program"] = loops
            cost_model_of = "the same step unrolled (scan_layers=false)"
            times["unrolled_compile_s"] = unrolled_times["compile_s"]
    return {
        "compile_topology": cfg.compile_topology,
        "grid": spec.grid_name,
        "num_slices": cfg.compile_topology_num_slices,
        "device_kind": device.device_kind,
        "num_devices": int(mesh.devices.size),
        "mesh": dict(mesh.shape),
        "stage": cfg.derived.stage_name,
        "global_batch_size": cfg.global_batch_size,
        "per_device_batch_size": cfg.derived.per_device_batch_size,
        "image_size": cfg.image_size,
        "dtype": cfg.dtype,
        **{k: round(v, 3) for k, v in times.items()},
        "memory": memory,
        "cost_model_of": cost_model_of,
        **cost,
    }


def _si(x: float, unit: str) -> str:
    """3 significant digits with an SI prefix: 1.23 TFLOP, 45.6 MB, 270 ms."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1, ""), (1e-3, "m"),
                          (1e-6, "u")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def format_report(r: dict[str, Any]) -> str:
    """The human-readable block; every time figure from the compiler is labelled modelled."""
    m = r["memory"]
    verdict = "fits" if m["fits"] else "does NOT fit"
    if r["optimal_seconds_raw"] <= 0:
        calls = ", ".join(f"{n} {t}" for t, n in r.get("uncosted_custom_calls", {}).items()) or "custom calls"
        step = (f"not modelled: the compiler's cost model books each custom call it cannot cost at -1 s "
                f"({calls}; optimal_seconds={r['optimal_seconds_raw']:g})")
    elif r["while_loops"]:
        step = (f"not usable: the program loops ({', '.join(r['while_loops'])}) and the cost model counts a "
                f"loop body once (it says {_si(r['optimal_seconds_raw'], 's')}, FLOPs likewise undercounted); "
                "compile with scan_layers=false for a modelled time")
    else:
        step = (f"{_si(r['modelled_step_seconds'], 's')} = "
                f"{r['modelled_samples_per_second']:.4g} samples/s modelled")
    mfu_text = f"{r['modelled_mfu']:.1%}" if r["modelled_mfu"] is not None else "n/a"
    lines = [
        f"AOT compile of the train step for {r['compile_topology']} ({r['grid']}, {r['num_slices']} slice(s), "
        f"{r['num_devices']} x {r['device_kind']}), stage {r['stage']}",
        f"  mesh {r['mesh']}; batch {r['global_batch_size']} ({r['per_device_batch_size']} per device), "
        f"image {r['image_size']}, {r['dtype']}; lowered in {r['lower_s']:.1f} s, compiled in "
        f"{r['compile_s']:.1f} s on this host",
        f"  memory per device: {_si(m['total_bytes'], 'B')} = arguments {_si(m['argument_bytes'], 'B')} + "
        f"outputs {_si(m['output_bytes'], 'B')} - aliased {_si(m['alias_bytes'], 'B')} + temporaries "
        f"{_si(m['temp_bytes'], 'B')} + code {_si(m['code_bytes'], 'B')}",
        f"  HBM per chip {_si(m['hbm_bytes'], 'B')} ({m['hbm_bytes'] / 2 ** 30:.0f} GiB): {verdict} "
        f"({m['total_bytes'] / m['hbm_bytes']:.1%} used)",
        f"  compiled FLOPs per device per step: {_si(r['compiled_flops_per_device'], 'FLOP')}"
        f"{' (loop bodies counted once)' if r['while_loops'] else ''} "
        f"(analytic model FLOPs, no recompute: {_si(r['model_flops_per_device'], 'FLOP')}); "
        f"bytes accessed {_si(r['compiled_bytes_accessed_per_device'], 'B')}",
        f"  modelled step time (TPU compiler cost model of {r['cost_model_of']}, not measured): {step}",
        f"  modelled MFU (model FLOPs / modelled step time / datasheet peak "
        f"{_si(r['peak_flops_per_device'] or 0, 'FLOP/s')}): {mfu_text}",
    ]
    return "\n".join(lines)


def main(cfgs: Config | Sequence[Config]) -> None:
    """Compiles each stage's train step for its topology and prints the report block and one JSON line
    (`{"aot": {...}}`) per stage. A config error (e.g. a grid libtpu rejects) prints one line and exits 2."""
    for cfg in [cfgs] if isinstance(cfgs, Config) else cfgs:
        try:
            r = report(cfg)
        except ConfigError as e:
            print(f"train.py: config error: {e}", file=sys.stderr)
            sys.exit(2)
        print(format_report(r), flush=True)
        print(json.dumps({"aot": r}, default=_jsonable), flush=True)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)
