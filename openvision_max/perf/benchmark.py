"""`python -m openvision_max.benchmark CONFIG [key=value ...] [options]`: MFU of the real train step, point by
point over a sweep of config keys.

    # modelled on a TPU topology from this host (the compiler's cost model: never a measurement)
    python -m openvision_max.benchmark configs/L14.yml stage=finetune_224 --mode aot --topology v5p-8 \\
        --sweep remat_policy=full,save_qkv_proj per_device_batch_size=32,64 --pick
    # measured on the present backend (CPU here, a GPU or TPU where there is one)
    python -m openvision_max.benchmark configs/B16.yml image_size=224 --mode measure --vs open_clip

A point is the config plus one value of each swept key (the cartesian product). `per_device_batch_size`, as
in MaxText, is accepted in the overrides and the sweep: it sets global_batch_size to that many samples per
batch shard (data x fsdp devices). Each finished point is a JSON file under --output-dir named after its
values and a hash of its resolved config, so an interrupted sweep resumes where it stopped and a rerun
compiles nothing it has already measured.

--mode aot compiles the trainer's own step for --topology (the code path of `compile_topology=`) and reports
memory per device, whether it fits, and the modelled step time, MFU and samples/s. --mode measure runs real
steps on synthetic data (`reuse_example_batch`: no generation in the timed region): warm-up steps excluded,
each timed step dispatched and waited for, nothing else in between; the step time is the median. Its MFU is
against the datasheet peak of the device or, on CPU, the host's measured matmul peak at the compute dtype.
It runs as one process on this host's devices (a pod slice's figures come from --mode aot).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import re
import statistics
import sys
import time
from typing import Any, Callable, Sequence

from etils import epath

from openvision_max.config import config_to_dict, load_config
from openvision_max.config.schema import Config, ConfigError

PROG = "python -m openvision_max.benchmark"
PER_DEVICE_BATCH = "per_device_batch_size"
MODES = ("aot", "measure")
# What `--vs open_clip` does to our side: open_clip's CLIP has no caption decoder, so ours is cut to one
# block of token size, which the report states.
TOKEN_DECODER = ("decoder.depth=1", "decoder.width=64", "decoder.mlp_dim=64", "decoder.num_heads=1",
                 "decoder.caption_length=8")


class UsageError(ValueError):
    """A bad command line or sweep; printed as one line, exit status 2, before any work."""


@dataclasses.dataclass(frozen=True)
class Point:
    """One configuration of a sweep: the swept values and the config they give."""
    values: dict[str, str]
    cfg: Config
    key: str          # hash of the resolved config and the measurement settings

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.values.items()) or "config as given"


# --- the sweep ---------------------------------------------------------------------------------------------

def _split_values(text: str) -> list[str]:
    """`a,b,[c,d]` -> ["a", "b", "[c,d]"]: commas inside brackets or braces belong to the value."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    return [*values, current]


def sweep_values(specs: Sequence[str]) -> list[dict[str, str]]:
    """["remat_policy=full,minimal", "per_device_batch_size=32,64"] -> the 4 points' {key: value}, in order."""
    axes: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, rest = spec.partition("=")
        if not sep or not key or not rest:
            raise UsageError(f"--sweep {spec!r}: expected KEY=VALUE1,VALUE2,...")
        if key in axes:
            raise UsageError(f"--sweep names {key!r} twice")
        values = _split_values(rest)
        if any(not v for v in values):
            raise UsageError(f"--sweep {spec!r}: an empty value")
        axes[key] = values
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def _config_of(argv: list[str], num_devices: int | None = None) -> Config:
    """The config of `argv` (for the first `num_devices` local devices, or all), with per_device_batch_size=N
    turned into the global batch of N per batch shard."""
    plain = [a for a in argv if not a.startswith(f"{PER_DEVICE_BATCH}=")]
    per_device = [a.partition("=")[2] for a in argv if a.startswith(f"{PER_DEVICE_BATCH}=")]
    cfg = load_config(plain, num_devices=num_devices)
    if not per_device:
        return cfg
    try:
        n = int(per_device[-1])
    except ValueError:
        raise ConfigError(f"{PER_DEVICE_BATCH}={per_device[-1]!r} is not an integer") from None
    if n <= 0:
        raise ConfigError(f"{PER_DEVICE_BATCH} must be positive, got {n}")
    return load_config([*plain, f"global_batch_size={n * cfg.derived.batch_shards}"], num_devices=num_devices)


def mode_overrides(args: argparse.Namespace) -> list[str]:
    """The keys a mode sets: the topology for aot, synthetic repeated batches for measure."""
    if args.mode == "aot":
        return [f"compile_topology={args.topology}", f"compile_topology_num_slices={args.slices}"]
    extra = ["dataset_type=synthetic", "reuse_example_batch=true"]
    return [*extra, *TOKEN_DECODER] if args.vs else extra


def point_key(cfg: Config, args: argparse.Namespace) -> str:
    """What a cached point is valid for: the resolved config and how it is measured. Less the keys that name
    where a run writes (which differ between checkouts and change no figure), so that cached points travel."""
    resolved = config_to_dict(cfg)
    for key in ("run_name", "base_output_directory", "data_cache_dir", "export_dir"):
        resolved.pop(key, None)
    settings = {"mode": args.mode, "topology": args.topology, "slices": args.slices, "steps": args.steps,
                "warmup": args.warmup, "vs": args.vs}
    if args.devices:  # only when given, so that points cached before the option existed stay valid
        settings["devices"] = args.devices
    blob = json.dumps({"config": resolved, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_points(args: argparse.Namespace) -> list[Point]:
    """Every point's config, resolved before any compilation: a bad value anywhere fails the whole sweep
    at once (ConfigError naming the point)."""
    points = []
    for values in sweep_values(args.sweep):
        argv = [args.config, *args.overrides, *mode_overrides(args), *(f"{k}={v}" for k, v in values.items())]
        try:
            cfg = _config_of(argv, args.devices or None)
        except ConfigError as e:
            where = " ".join(f"{k}={v}" for k, v in values.items())
            raise ConfigError(f"{e} (sweep point {where})" if where else str(e)) from None
        points.append(Point(values, cfg, point_key(cfg, args)))
    return points


def point_file(out_dir: epath.Path, point: Point) -> epath.Path:
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", "_".join(f"{k}={v}" for k, v in point.values.items())) or "point"
    return out_dir / f"{slug[:120]}-{point.key}.json"


# --- one point -----------------------------------------------------------------------------------------------

def _out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "out of memory" in text.lower()


def _first_line(error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:400]


def run_aot(cfg: Config) -> dict[str, Any]:
    """The AOT report of the point (training/aot.py), or a compile that ran out of HBM as a non-fitting point.
    A scanned program that does not fit is not compiled a second time (unrolled) for its modelled time."""
    from openvision_max.training import aot
    try:
        r = aot.report(cfg, model_unfit=False)
    except Exception as e:  # only an out-of-memory compile is a result; the rest propagates
        if not _out_of_memory(e):
            raise
        return {"fits": False, "error": _first_line(e)}
    m = r["memory"]
    return {"fits": m["fits"], "memory_bytes": m["total_bytes"], "hbm_bytes": m["hbm_bytes"],
            "modelled_step_seconds": r["modelled_step_seconds"], "modelled_mfu": r["modelled_mfu"],
            "modelled_samples_per_second": r["modelled_samples_per_second"], "aot": r}


def dot_forms(stablehlo: str) -> dict[str, int]:
    """How the program's matmuls are typed, as the model emits them (StableHLO `dot_general`s):
    {"bf16 x bf16 -> bf16": 40, "f32 x f32 -> f32": 6}. bf16 inputs with an fp32 result are the form a CPU's
    AMX / AVX-512 bf16 fast path (and the MXU's fp32 accumulation) serve best."""
    dtype = r"tensor<(?:[0-9?]+x)*(\w+)>"
    forms: dict[str, int] = {}
    for lhs, rhs, out in re.findall(rf"stablehlo\.dot_general.*?: \({dtype}, {dtype}\) -> {dtype}", stablehlo):
        form = f"{lhs} x {rhs} -> {out}"
        forms[form] = forms.get(form, 0) + 1
    return dict(sorted(forms.items(), key=lambda kv: -kv[1]))


class TrainStep:
    """Our train step on the present devices, on one repeated synthetic batch, compiled ahead of the timing."""

    def __init__(self, cfg: Config):
        import jax

        from openvision_max import models
        from openvision_max.data.synthetic import SyntheticIterator
        from openvision_max.mesh.sharding import activate, create_mesh
        from openvision_max.training import optimizer
        from openvision_max.training.step import abstract_state, create_state, jit_train_step, shardings_of

        self.cfg, self._jax = cfg, jax
        mesh = create_mesh(cfg)
        model, tx = models.build(cfg), optimizer.build(cfg)
        with activate(cfg, mesh):
            state_sh = shardings_of(abstract_state(model, tx, cfg, mesh))
            self.state = create_state(model, tx, cfg, mesh, jax.random.key(cfg.seed), shardings=state_sh)
            self.batch = next(SyntheticIterator(cfg, mesh))
            t0 = time.perf_counter()
            lowered = jit_train_step(model, tx, cfg, mesh, state_sh=state_sh).lower(self.state, self.batch)
            self.dot_forms = dot_forms(lowered.as_text())
            self.compiled = lowered.compile()
            self.compile_s = time.perf_counter() - t0

    def __call__(self) -> None:
        """One step, returning when the device is done with it (the only sync)."""
        self.state, metrics = self.compiled(self.state, self.batch)
        self._jax.block_until_ready((self.state, metrics))


def timed(step: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def peak_memory_bytes() -> int | None:
    """The largest peak over local devices from `memory_stats()`, where the backend keeps one (not CPU)."""
    import jax
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def run_measure(cfg: Config, *, steps: int, warmup: int, vs: str | None) -> dict[str, Any]:
    """Median step time of `steps` timed steps after `warmup`, MFU against the peak, peak memory; with
    vs="open_clip" the same number of open_clip steps, alternated with ours (A B A B)."""
    from openvision_max.mesh import peak_flops
    from openvision_max.models import flops

    ours = TrainStep(cfg)
    sides: dict[str, Callable[[], Any]] = {"ours": ours}
    theirs = None
    if vs == "open_clip":
        from openvision_max.perf.vs_open_clip import open_clip_trainer
        theirs = open_clip_trainer(cfg, device=_torch_device(cfg))
        sides["open_clip"] = theirs.step
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(warmup):
        for step in sides.values():
            step()
    for _ in range(steps):
        for name, step in sides.items():
            times[name].append(timed(step))
    step_s = statistics.median(times["ours"])
    peak, peak_source = peak_flops.peak_flops_per_device(cfg.dtype, cached=False)  # measured in this run
    # Fake CPU devices share the host's cores, and one of them alone uses all of them: on CPU the whole host's
    # peak is the denominator, however many of its devices the step runs on.
    import jax
    devices_peak = peak * (jax.local_device_count() if cfg.derived.platform == "cpu" else cfg.derived.num_devices)
    model_flops = flops.flops_per_sample(cfg)["train_total"] * cfg.global_batch_size
    result = {
        "fits": True, "step_times_s": times["ours"], "step_seconds": step_s,
        "samples_per_second": cfg.global_batch_size / step_s, "model_flops_per_step": model_flops,
        "peak_flops_per_device": peak, "peak_source": peak_source,
        "measured_mfu": model_flops / step_s / devices_peak,
        "memory_bytes": peak_memory_bytes(), "compile_s": ours.compile_s, "dot_forms": ours.dot_forms,
    }
    if theirs is not None:
        their_s = statistics.median(times["open_clip"])
        result["vs_open_clip"] = {
            "description": theirs.description, "step_times_s": times["open_clip"], "step_seconds": their_s,
            "samples_per_second": cfg.global_batch_size / their_s, "ratio": their_s / step_s,
            "our_decoder": " ".join(TOKEN_DECODER)}
    return result


def _torch_device(cfg: Config) -> str:
    return "cuda" if cfg.derived.platform == "gpu" else "cpu"


def describe_target(cfg: Config, args: argparse.Namespace) -> str:
    if args.mode == "aot":
        return f"{args.topology} x{args.slices}" if args.slices > 1 else args.topology
    import jax
    return f"{cfg.derived.num_devices} x {jax.devices()[0].device_kind}"


def run_point(point: Point, args: argparse.Namespace) -> dict[str, Any]:
    cfg = point.cfg
    t0 = time.perf_counter()
    body = (run_aot(cfg) if args.mode == "aot" else
            run_measure(cfg, steps=args.steps, warmup=args.warmup, vs=args.vs))
    return {"model": model_name(args.config, cfg), "point": point.values, "key": point.key, "mode": args.mode,
            "target": describe_target(cfg, args), "image_size": cfg.image_size, "patch_size": cfg.patch_size,
            "dtype": cfg.dtype, "global_batch_size": cfg.global_batch_size,
            "per_device_batch_size": cfg.derived.per_device_batch_size, "stage": cfg.derived.stage_name,
            "seconds": round(time.perf_counter() - t0, 1), **body}


def model_name(config_path: str, cfg: Config) -> str:
    """`L14`, or `B16 (patch 8)` when the patch was overridden away from the file name's."""
    stem = epath.Path(config_path).stem
    digits = re.search(r"(\d+)$", stem)
    if digits and int(digits.group(1)) != cfg.patch_size:
        return f"{stem} (patch {cfg.patch_size})"
    return stem


# --- results ---------------------------------------------------------------------------------------------------

def mfu_of(r: dict[str, Any]) -> float | None:
    return r.get("modelled_mfu") if r["mode"] == "aot" else r.get("measured_mfu")


def gigabytes(x: float | None) -> str:
    return f"{x / 1e9:.1f} GB" if x is not None else "n/a"


def format_row(r: dict[str, Any]) -> str:
    """One line per point; every compiler figure carries the word "modelled"."""
    label = " ".join(f"{k}={v}" for k, v in r["point"].items()) or "config as given"
    head = f"{r['model']} @{r['image_size']} [{label}] {r['per_device_batch_size']}/device on {r['target']}:"
    if r.get("error"):
        return f"{head} does NOT fit ({r['error']})"
    fits = "fits" if r["fits"] else "does NOT fit"
    if r["mode"] == "aot":
        step, mfu, rate = r["modelled_step_seconds"], r["modelled_mfu"], r["modelled_samples_per_second"]
        if step:
            timing = f"modelled step {step:.4g} s, modelled MFU {mfu:.1%}, modelled {rate:.4g} samples/s"
        elif not r["fits"]:
            timing = "not modelled (it does not fit)"
        else:
            timing = "no modelled time (the cost model refused it: see `python train.py ... compile_topology=`)"
        return f"{head} memory {gigabytes(r['memory_bytes'])} of {gigabytes(r['hbm_bytes'])} ({fits}); {timing}"
    text = (f"{head} measured step {r['step_seconds']:.4g} s (median of {len(r['step_times_s'])}), "
            f"MFU {r['measured_mfu']:.1%}, {r['samples_per_second']:.4g} samples/s, peak memory "
            f"{gigabytes(r['memory_bytes'])}")
    vs = r.get("vs_open_clip")
    if vs:
        text += (f"; open_clip {vs['samples_per_second']:.4g} samples/s (median step {vs['step_seconds']:.4g} s): "
                 f"ours / open_clip = {vs['ratio']:.2f}x")
    return text


def pick(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model size (and resolution), the fitting point with the highest MFU."""
    best: dict[str, dict[str, Any]] = {}
    for r in results:
        mfu = mfu_of(r)
        if not r.get("fits") or r.get("error") or mfu is None:
            continue
        name = f"{r['model']} @{r['image_size']}"
        if name not in best or mfu > mfu_of(best[name]):
            best[name] = r
    return best


def _read_cached(path: epath.Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None  # absent, or cut short by an interrupted write: measured again


def _write(path: epath.Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.rename(path)


@dataclasses.dataclass
class SweepResult:
    results: list[dict[str, Any]]
    ran: int
    cached: int


def run_sweep(points: Sequence[Point], args: argparse.Namespace, out_dir: epath.Path,
              say: Callable[[str], None] = print) -> SweepResult:
    """Each point from its cache file or measured (and cached); a row printed per finished point."""
    from tqdm import tqdm
    results, ran, cached = [], 0, 0
    bar = tqdm(points, desc="benchmark", unit="point", disable=len(points) < 2, file=sys.stderr)
    for point in bar:
        path = point_file(out_dir, point)
        result = _read_cached(path)
        if result is None:
            bar.set_postfix_str(point.label[:60])
            result = run_point(point, args)
            _write(path, result)
            ran, suffix = ran + 1, ""
        else:
            cached, suffix = cached + 1, " (cached)"
        results.append(result)
        (bar.write if len(points) > 1 else say)(format_row(result) + suffix)
    bar.close()
    return SweepResult(results, ran, cached)


# --- command line ------------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="the model's YAML file (e.g. configs/L14.yml)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (also per_device_batch_size=N)")
    p.add_argument("--mode", choices=MODES, default="measure",
                   help="aot: compile for --topology and report the compiler's modelled figures; measure: time "
                        "real steps on this machine's devices (default)")
    p.add_argument("--topology", default="", help="aot: a TPU topology, e.g. v5p-8, v6e-256")
    p.add_argument("--slices", type=int, default=1, help="aot: the number of slices (multi-slice over DCN)")
    p.add_argument("--sweep", nargs="+", default=[], metavar="KEY=V1,V2",
                   help="config keys to sweep (cartesian product), e.g. remat_policy=full,minimal")
    p.add_argument("--devices", type=int, default=0,
                   help="measure: run on the first N local devices (default: all of them)")
    p.add_argument("--steps", type=int, default=10, help="measure: timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="measure: untimed steps first (compile, caches)")
    p.add_argument("--vs", choices=["open_clip"], default=None,
                   help="measure: time open_clip's PyTorch step for the same towers, alternating with ours")
    p.add_argument("--pick", action="store_true",
                   help="after the sweep, report the fitting point with the highest MFU per model size")
    p.add_argument("--output-dir", default="",
                   help="where each point's JSON goes (default: <base_output_directory>/benchmarks/<config>)")
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.mode == "aot" and not args.topology:
        raise UsageError("--mode aot needs --topology (e.g. --topology v5p-8)")
    if args.devices and args.mode != "measure":
        raise UsageError("--devices is for --mode measure (--mode aot takes the topology's devices)")
    if args.devices < 0:
        raise UsageError("--devices must be >= 0")
    if args.mode == "measure" and (args.topology or args.slices != 1):
        raise UsageError("--topology and --slices are for --mode aot; --mode measure uses this machine's devices")
    if args.vs and args.mode != "measure":
        raise UsageError("--vs open_clip times real steps: use it with --mode measure")
    for name in ("steps", "slices"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1")
    if args.warmup < 0:
        raise UsageError("--warmup must be >= 0")
    if not epath.Path(args.config).exists():
        raise UsageError(f"config file {args.config} does not exist")
    if args.vs:  # before anything compiles: the comparison cannot run without PyTorch and open_clip
        import importlib.util
        if not all(importlib.util.find_spec(m) for m in ("torch", "open_clip")):
            from openvision_max.perf.vs_open_clip import MISSING_TORCH
            raise UsageError(MISSING_TORCH)


def output_dir(args: argparse.Namespace, cfg: Config) -> epath.Path:
    if args.output_dir:
        return epath.Path(args.output_dir)
    return epath.Path(cfg.base_output_directory) / "benchmarks" / epath.Path(args.config).stem


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[Point]]:
    """The options and every point, or one line on stderr and exit 2 (usage or config error)."""
    p = parser()
    args = p.parse_intermixed_args(list(argv))
    try:
        check_args(args)
        points = build_points(args)
        if args.vs and any(pt.cfg.objective != "openvision" for pt in points):
            raise UsageError("--vs open_clip compares the three-tower objective=openvision step with open_clip's "
                             "CLIP; objective=openvision2 has no text tower to compare")
        return args, points
    except UsageError as e:
        p.error(str(e))
    except ConfigError as e:
        print(f"{PROG}: config error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv: Sequence[str]) -> SweepResult:
    args, points = parse(argv)
    out_dir = output_dir(args, points[0].cfg)
    try:
        sweep = run_sweep(points, args, out_dir)
    except ConfigError as e:  # e.g. --mode aot on a host without libtpu, a grid libtpu rejects
        print(f"{PROG}: config error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{len(points)} point(s): {sweep.ran} run, {sweep.cached} from the cache in {out_dir}", flush=True)
    if args.mode == "measure":
        for dtype, r in {r["dtype"]: r for r in sweep.results if "peak_source" in r}.items():
            forms = ", ".join(f"{n} x {form}" for form, n in r["dot_forms"].items())
            print(f"{dtype}: peak from the {r['peak_source']}; the model's dots (StableHLO): {forms}", flush=True)
    if args.pick:
        best = pick(sweep.results)
        if not best:
            print("pick: no point fits", flush=True)
        for name, r in best.items():
            print(f"pick {name}: {format_row(r)}", flush=True)
    return sweep
