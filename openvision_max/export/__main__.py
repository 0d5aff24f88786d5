"""`python -m openvision_max.export [CONFIG] [key=value ...] load_parameters_path=RUN export_dir=DIR [--vision-only]`

Writes an open_clip-loadable directory of the parameters at `load_parameters_path` (a run, its checkpoints/
or one step directory) for the model CONFIG describes. CONFIG may be left out when load_parameters_path is
in a run directory: the run's own config.yml is used (overrides still apply). With stages, the last stage
selected is exported (its image_size goes into the open_clip config; `stage=NAME` or `image_size=` choose
another).
`--vision-only` writes the image tower alone as a timm VisionTransformer directory instead (vision_only.py);
`objective: openvision2` (no text tower, which open_clip's CLIP needs) always does, with a note saying so.
Config and input errors print one line and exit 2; nothing is left under export_dir on failure.
"""

from __future__ import annotations

import re
import sys
import time

from openvision_max.config import cli_config
from openvision_max.config.paths import as_path, is_remote
from openvision_max.config.run_config import find_run
from openvision_max.export.directory import ExportError, write_export
from openvision_max.export.vision_only import load_call, write_vision_only
from openvision_max.training.checkpointing import CheckpointError

PROG = "python -m openvision_max.export"
VISION_ONLY = "--vision-only"


def fail(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)
    sys.exit(2)


# A run's config.yml may name a mesh or an attention kernel of the machine it trained on; the export reads
# parameters on one device of this host, so those are reset (before the command line's overrides).
ONE_HOST = ["ici_data_parallelism=1", "ici_fsdp_parallelism=-1", "ici_tensor_parallelism=1",
            "dcn_data_parallelism=-1", "dcn_fsdp_parallelism=1", "dcn_tensor_parallelism=1",
            "attention=dot_product", "compile_topology=''"]


def with_run_config(argv: list[str]) -> list[str]:
    """`argv` with the run's config.yml first when no config file is given, and the one-host settings after
    a run's config.yml."""
    if argv and re.match(r"[A-Za-z_][\w.]*=", argv[0]):  # key=value first: no config file given
        given = [a.split("=", 1)[1] for a in argv if a.startswith("load_parameters_path=")]
        if not given:
            fail("give a config file first, or load_parameters_path= of a run directory (its config.yml is used)")
        found = find_run(as_path(given[-1]))
        if found is None:
            fail(f"load_parameters_path={given[-1]} is not in a run directory (config.yml + checkpoints/): give the "
                 "config file first")
        return [str(found[0] / "config.yml"), *ONE_HOST, *argv]
    config = as_path(argv[0]) if argv else None
    if config is not None and config.name == "config.yml" and find_run(config.parent) is not None:
        return [argv[0], *ONE_HOST, *argv[1:]]
    return argv


def main(argv: list[str]) -> None:
    vision_only = VISION_ONLY in argv
    argv = [a for a in argv if a != VISION_ONLY]
    cfg = cli_config(with_run_config(argv), PROG)[-1]
    if not cfg.load_parameters_path:
        fail("load_parameters_path= is required (a run directory, its checkpoints/ or one step directory)")
    if not cfg.export_dir:
        fail("export_dir= is required (a directory that does not exist yet, or an empty one)")
    if cfg.objective == "openvision2" and not vision_only:
        print(f"{PROG}: objective=openvision2 has no text tower and open_clip's CLIP needs one: no open_clip "
              f"export; writing the vision-only timm export instead ({VISION_ONLY})", file=sys.stderr, flush=True)
        vision_only = True
    start = time.perf_counter()
    from openvision_max.training.params import load_params  # JAX starts here, after the arguments are checked
    try:
        params = load_params(cfg, cfg.load_parameters_path)
        out = (write_vision_only if vision_only else write_export)(params, cfg, cfg.export_dir)
    except CheckpointError as e:
        fail(f"checkpoint error: {e}")
    except ExportError as e:
        fail(str(e))
    took = f"{time.perf_counter() - start:.1f}s"
    if vision_only:
        # timm's local-dir: reads local files only.
        load = f"{load_call('LOCAL_COPY')} on a local copy" if is_remote(out) else load_call(out)
        print(f"exported the vision tower of {cfg.load_parameters_path} ({cfg.image_size}px) to {out} in {took}; "
              f"load with {load}", flush=True)
    else:
        print(f"exported {cfg.load_parameters_path} ({cfg.image_size}px) to {out} in {took}; "
              f"load with open_clip.create_model_from_pretrained('local-dir:{out}')", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
