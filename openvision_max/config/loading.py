"""pyconfig: YAML base + model file + `key=value` overrides, validated against `schema.Config`.

    cfg = load_config(["configs/L14.yml", "global_batch_size=512", "vision.depth=4"])

A config file may name the file it extends with `base_config: <path relative to it>`; the chain is merged
from the root (normally `configs/base.yml`, which holds every key) down. Overrides are parsed as YAML
scalars, so `dtype=float32`, `scan_layers=false` and `logical_axis_rules=[[embed, fsdp]]` all work.
Every problem raises `ConfigError` with one message; `cli_config` turns it into exit status 2.

A run's own `config.yml` (every key resolved, plus `derived`) is accepted as a config file too. Local paths
in the config are made absolute against the working directory here, where they enter, so a run directory
or checkpoint named relative to it works from any later working directory; `gs://` and other `scheme:`
paths (`demo:shapes`) are left as they are.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import functools
import itertools
import math
import os
import re
import sys
import types
import typing
from typing import Any, Literal, Union

import yaml
from etils import epath

from openvision_max.config.schema import Config, ConfigError, finalize

__all__ = ["Config", "ConfigError", "load_config", "load_stages", "cli_config", "config_to_dict", "all_keys"]

_MAX_CHAIN = 16


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _user_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("derived")]


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every settable dotted key of the schema, e.g. `vision.width`."""
    keys = []
    for f in _user_fields(cls):
        tp = _hints(cls)[f.name]
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(tp):
            keys.extend(all_keys(tp, prefix + f.name + "."))
    return keys


def _unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r} {where}{hint}")


def _read_yaml(path: epath.Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def _unresolve(data: dict) -> dict:
    """A run's resolved config.yml as a config file: `derived` dropped; a multi-stage run's `stages_resolved`
    becomes `stages:` entries that each hold their stage's whole config, so every stage comes back as it ran
    and `stage=NAME` still selects one (the run-wide keys, equal in every stage, come from the last)."""
    if "stages_resolved" not in data:
        return {k: v for k, v in data.items() if k != "derived"}
    resolved = data["stages_resolved"]
    entries = [{"name": s["derived"]["stage_name"],
                **{k: v for k, v in s.items() if k not in (*_RUN_KEYS, "derived")}} for s in resolved]
    last = {k: v for k, v in resolved[-1].items() if k != "derived"}
    return {**last, "stages": entries, "stage": ""}


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_chain(path: epath.Path) -> dict:
    layers = []
    for _ in range(_MAX_CHAIN):
        data = _read_yaml(path)
        if "derived" in data or "stages_resolved" in data:
            data = _unresolve(data)
        layers.append((path, data))
        parent = data.pop("base_config", None)
        if parent is None:
            break
        path = path.parent / str(parent)
    else:
        raise ConfigError(f"base_config chain deeper than {_MAX_CHAIN} files (a cycle?) at {path}")
    merged: dict = {}
    for path, data in reversed(layers):
        _check_known(data, Config, "", f"in {path}")
        merged = _merge(merged, data)
    return merged


def _check_known(data: dict, cls: type, prefix: str, where: str) -> None:
    names = {f.name for f in _user_fields(cls)}
    for k, v in data.items():
        if k not in names:
            raise _unknown_key(prefix + str(k), where)
        tp = _hints(cls)[k]
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            _check_known(v, tp, prefix + k + ".", where)


def _apply_override(overrides: dict, arg: str) -> None:
    """Adds `key=value` (a dotted key, a YAML value) to the nested `overrides` dict."""
    if "=" not in arg:
        raise ConfigError(f"expected key=value, got {arg!r}")
    key, text = arg.split("=", 1)
    parts = key.split(".")
    cls: Any = Config
    node = overrides
    for i, part in enumerate(parts):
        fields = {f.name for f in _user_fields(cls)} if dataclasses.is_dataclass(cls) else set()
        if part not in fields:
            raise _unknown_key(key, "on the command line")
        cls = _hints(cls)[part]
        if i < len(parts) - 1:
            node = node.setdefault(part, {})
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node[parts[-1]] = value


# Keys a stage may hold besides config overrides; and keys that only make sense for the whole run.
_STAGE_KEYS = ("name", "samples", "warmup_samples")
_RUN_KEYS = ("stages", "stage", "run_name", "base_output_directory", "coordinator_address", "num_processes",
             "process_id", "jax_distributed_initialization_timeout", "skip_jax_distributed_system",
             # Set up once per process, before the first stage: the same for every stage.
             "jax_smi", "collect_stack_trace", "stack_trace_to_cloud", "stack_trace_interval_seconds",
             "compilation_cache_dir", "enable_goodput_recording")


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or value != int(value):
        raise ConfigError(f"{key} expects a positive whole number, got {value!r}")
    return int(value)


def _stage_raw(files: dict, cli: dict, entry: Any, index: int) -> tuple[str, dict]:
    """One `stages:` entry -> (name, raw config): files < stage overrides < command line."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ConfigError(f"stages[{index}] must be a mapping with a `name` (a string), got {entry!r}")
    entry = dict(entry)
    name = entry.pop("name")
    samples, warmup_samples = entry.pop("samples", None), entry.pop("warmup_samples", None)
    where = f"in stage {name!r}"
    for key in entry:
        if key in _RUN_KEYS:
            raise ConfigError(f"{key!r} cannot be set per stage ({where})")
    _check_known(entry, Config, "", where)
    raw = _merge(_merge(files, entry), cli)
    batch = raw.get("global_batch_size")
    if not isinstance(batch, int) or isinstance(batch, bool):
        return name, raw  # _build reports the type error
    # A stage's length is given in samples, as in the paper; an explicit steps=/warmup_steps= on the command
    # line still wins.
    if samples is not None and "steps" not in cli:
        raw["steps"] = math.ceil(_positive_int(samples, f"stages[{index}].samples") / batch)
    if warmup_samples is not None and "warmup_steps" not in cli:
        if warmup_samples != 0:
            warmup_samples = _positive_int(warmup_samples, f"stages[{index}].warmup_samples")
        raw["warmup_steps"] = round(warmup_samples / batch)
    return name, raw


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in typing.get_args(tp)) + "]"
    if dataclasses.is_dataclass(tp):
        return "a section of keys"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Returns `value` as type `tp`, or raises ConfigError naming key, expected type and value."""
    def bad() -> ConfigError:
        return ConfigError(f"config key {key!r} expects {_type_name(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return _build(tp, value, key + ".")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise bad()
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad()
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad()
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad()
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is dict:
        if not isinstance(value, dict):
            raise bad()
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string.
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad()
    raise TypeError(f"schema type {tp} of {key!r} is not supported")  # a schema bug, not user input


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    kwargs = {}
    missing = []
    for f in _user_fields(cls):
        if f.name not in data:
            missing.append(prefix + f.name)
            continue
        kwargs[f.name] = _coerce(data[f.name], _hints(cls)[f.name], prefix + f.name)
    if missing:
        raise ConfigError(
            f"config is missing key(s) {', '.join(missing)} (does the file start with "
            "`base_config: base.yml`?)")
    return cls(**kwargs)


_PATH_KEYS = ("base_output_directory", "load_parameters_path", "export_dir", "data_cache_dir", "compilation_cache_dir")
_EVAL_PATH_KEYS = ("path", "image_dir")


def _absolute(path: str) -> str:
    """`path` made absolute against the working directory (and `~` expanded); "" and URIs (gs://..., demo:x)
    unchanged."""
    if not path or re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def _absolute_paths(cfg: Config) -> Config:
    """Every path key of `cfg` through `_absolute`: resolved once, where the config enters."""
    evals = [{k: _absolute(v) if k in _EVAL_PATH_KEYS and isinstance(v, str) else v for k, v in e.items()}
             if isinstance(e, dict) else e for e in cfg.evals]
    return dataclasses.replace(cfg, **{k: _absolute(getattr(cfg, k)) for k in _PATH_KEYS},
                               train_data=[_absolute(t) for t in cfg.train_data], evals=evals)


def _target(cfg: Config) -> tuple[str, int, int]:
    """The platform, device count and number of slices the run compiles for."""
    if cfg.compile_topology:
        from openvision_max.config import topology  # imports libtpu only when asked for
        slices = cfg.compile_topology_num_slices
        return "tpu", topology.device_count(cfg.compile_topology, slices), slices
    import jax
    devices = jax.devices()
    # TPU devices of a multi-slice job carry their slice; other platforms are one slice.
    return jax.default_backend(), len(devices), len({getattr(d, "slice_index", 0) for d in devices})


def _read(argv: list[str]) -> tuple[dict, dict, dict]:
    """(the config files merged, the command line's overrides, both merged) of `argv`."""
    if not argv:
        raise ConfigError("usage: CONFIG.yml [key=value ...]")
    files = _read_chain(epath.Path(argv[0]))  # a local file or gs:// (a run's config.yml in a bucket)
    cli: dict = {}
    for arg in argv[1:]:
        _apply_override(cli, arg)
    return files, cli, _merge(files, cli)


def default_run_name() -> str:
    """The run name when none is given: this host's clock (several processes agree on process 0's)."""
    return datetime.datetime.now().strftime("run_%Y%m%d_%H%M%S")


def read_run_keys(argv: list[str]) -> Config:
    """The run-wide keys of `argv`, type-checked but not resolved against any devices: what a process needs
    before JAX starts (the distributed start-up keys, and whether `run_name` was given: "" if not)."""
    return _build(Config, {"run_name": "", **_read(argv)[2]})


def load_stages(argv: list[str], *, platform: str | None = None, num_devices: int | None = None) -> list[Config]:
    """Reads `argv = [config_path, key=value, ...]` into the checked, finalized config of every stage to run.

    Without `stages:` the run is one stage named "main". With them, each stage is the config files, then the
    stage's overrides, then the command line; `stage=NAME` keeps that stage only. Every stage is validated
    here, so a mistake in the last stage fails before the first one starts.
    """
    files, cli, merged = _read(argv)
    if not merged.get("run_name"):
        merged["run_name"] = cli["run_name"] = default_run_name()
    top = _build(Config, merged)
    raw_stages = [_stage_raw(files, cli, entry, i) for i, entry in enumerate(top.stages)] or [("main", merged)]
    names = [name for name, _ in raw_stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"stage names must be unique, got {names}")
    if top.stage and top.stage not in names:
        raise ConfigError(f"stage={top.stage!r} is not a stage of this config; stages: {', '.join(names)}")
    num_slices = None  # a caller that names the devices (a test) leaves the slices to the DCN axes
    if platform is None or num_devices is None:
        target_platform, target_devices, num_slices = _target(top)
        platform = platform or target_platform
        num_devices = num_devices or target_devices
    configs = []
    for index, (name, raw) in enumerate(raw_stages):
        try:
            cfg = finalize(_absolute_paths(_build(Config, raw)), platform=platform, num_devices=num_devices,
                           num_slices=num_slices, stage_name=name, stage_index=index)
        except ConfigError as e:
            raise ConfigError(f"{e} (stage {name!r})" if len(raw_stages) > 1 else str(e)) from None
        configs.append(cfg)
    # Checkpoint step numbers count across stages, so each stage knows where its steps start.
    offsets = itertools.accumulate([c.steps for c in configs], initial=0)
    configs = [dataclasses.replace(c, derived=dataclasses.replace(c.derived, step_offset=o))
               for c, o in zip(configs, offsets)]
    return [c for c in configs if not top.stage or c.derived.stage_name == top.stage]


def load_config(argv: list[str], *, platform: str | None = None, num_devices: int | None = None) -> Config:
    """The config of the first stage to run (the whole run's config when there are no stages)."""
    return load_stages(argv, platform=platform, num_devices=num_devices)[0]


def cli_config(argv: list[str], prog: str) -> list[Config]:
    """`load_stages` for command-line tools: a config error prints one line and exits 2."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {prog} CONFIG.yml [key=value ...]\n\nKeys and their defaults: configs/base.yml",
              file=sys.stderr)
        sys.exit(0 if argv else 2)
    try:
        return load_stages(argv)
    except ConfigError as e:
        print(f"{prog}: config error: {e}", file=sys.stderr)
        sys.exit(2)


def config_to_dict(cfg: Config) -> dict:
    """The resolved config as plain YAML-serialisable data (tuples become lists)."""
    def plain(x: Any) -> Any:
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x
    return plain(dataclasses.asdict(cfg))
