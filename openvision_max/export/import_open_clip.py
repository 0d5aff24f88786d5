"""`python -m openvision_max.import_open_clip DIR CONFIG [key=value ...] output=RUN_DIR`

Reads an open_clip model directory of matching architecture (open_clip_config.json + safetensors or .bin: our
export, or a released OpenVision PyTorch model) into RUN_DIR, a directory that `load_parameters_path=RUN_DIR`
(fine-tuning), `eval_only` and `load_model(RUN_DIR)` accept: RUN_DIR/config.yml and an Orbax checkpoint
RUN_DIR/checkpoints/0 holding the parameters.

The caption decoder comes from DIR/caption_decoder.safetensors when present (our exports); released models
have none, so the decoder is freshly initialised from `seed` (as a new run would be) and a note says so.
Exports of our own parameters import bit for bit. Errors print one line and exit 2; RUN_DIR is written under
a temporary name and renamed at the end, so a failure leaves nothing there.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
import tempfile

import yaml
from etils import epath

from openvision_max.config import cli_config, config_to_dict
from openvision_max.config.paths import is_remote
from openvision_max.config.schema import Config
from openvision_max.export.directory import ExportError, read_export, umask_modes
from openvision_max.export.mapping import FormatError, from_open_clip
from openvision_max.export.open_clip_config import architecture_mismatches

PROG = "python -m openvision_max.import_open_clip"


class ImportFailed(ValueError):
    """The directory cannot be imported for this config; the message is one line."""


def import_open_clip(directory: str | os.PathLike, cfg: Config, output: str | os.PathLike) -> tuple[pathlib.Path, str]:
    """Imports `directory` into the run directory `output`; returns (output, how the decoder was obtained)."""
    import jax

    from openvision_max.training.params import init_params

    remote = is_remote(output)
    # Orbax refuses relative checkpoint paths.
    target = epath.Path(output) if remote else pathlib.Path(output).expanduser().absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ImportFailed(f"output {target} already exists and is not an empty directory")
    try:
        oc_config, clip, decoder, _ = read_export(directory)
        problems = architecture_mismatches(oc_config["model_cfg"], cfg)
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise ImportFailed(f"{directory} does not match the config: {'; '.join(problems[:3])}{more}")
        params = from_open_clip(clip, decoder, cfg)
    except (ExportError, FormatError) as e:
        raise ImportFailed(str(e)) from None
    if decoder is None:
        params["decoder"] = jax.device_get(init_params(cfg, cfg.seed)["decoder"])
        how = f"freshly initialised (seed {cfg.seed}): {directory} has no caption_decoder.safetensors"
    else:
        how = "imported from caption_decoder.safetensors"
    device = jax.devices()[0]
    params = jax.tree.map(lambda x: jax.device_put(x, device), params)
    if remote:  # gs://: no rename into place; the checkpoint is complete only once orbax commits it
        _write_run(target, cfg, params, {"imported_from": str(directory), "decoder": how})
        return target, how
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_run(tmp, cfg, params, {"imported_from": str(directory), "decoder": how})
        umask_modes(tmp)
        if target.exists():
            target.rmdir()
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target, how


def _write_run(run_dir, cfg: Config, params, meta: dict) -> None:
    """A run directory holding `params` as checkpoint 0, as train.py would leave it."""
    from openvision_max.training.checkpointing import Checkpointer

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    with Checkpointer(run_dir / "checkpoints", max_to_keep=1, period=1) as ckpt:
        ckpt.maybe_save(0, {"params": params}, meta, force=True)


def _split_output(argv: list[str]) -> tuple[str, list[str], str]:
    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        print(f"usage: {PROG} OPEN_CLIP_DIR CONFIG.yml [key=value ...] output=RUN_DIR", file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    outputs = [a.split("=", 1)[1] for a in argv[2:] if a.startswith("output=")]
    rest = [argv[1]] + [a for a in argv[2:] if not a.startswith("output=")]
    if len(outputs) != 1 or not outputs[0]:
        print(f"{PROG}: output=RUN_DIR is required once", file=sys.stderr)
        sys.exit(2)
    return argv[0], rest, outputs[0]


def main(argv: list[str]) -> None:
    directory, config_argv, output = _split_output(argv)
    cfg = cli_config(config_argv, PROG)[-1]
    if cfg.objective != "openvision":
        print(f"{PROG}: an open_clip CLIP has a text tower, which objective={cfg.objective} does not: import it "
              "into an objective=openvision config", file=sys.stderr)
        sys.exit(2)
    try:
        out, how = import_open_clip(directory, cfg, output)
    except ImportFailed as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"imported {directory} into {out} (decoder {how}); "
          f"fine-tune with load_parameters_path={out}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
