"""`python -m openvision_max.export CONFIG [key=value ...] load_parameters_path=RUN export_dir=DIR`

Writes an open_clip-loadable directory of the parameters at `load_parameters_path` (a run, its checkpoints/
or one step directory) for the model CONFIG describes. With stages, the last stage selected is exported
(its image_size goes into the open_clip config; `stage=NAME` or `image_size=` choose another).
Config and input errors print one line and exit 2; nothing is left under export_dir on failure.
"""

from __future__ import annotations

import sys
import time

from openvision_max.config import cli_config
from openvision_max.export.directory import ExportError, write_export
from openvision_max.training.checkpointing import CheckpointError

PROG = "python -m openvision_max.export"


def fail(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
    cfg = cli_config(argv, PROG)[-1]
    if not cfg.load_parameters_path:
        fail("load_parameters_path= is required (a run directory, its checkpoints/ or one step directory)")
    if not cfg.export_dir:
        fail("export_dir= is required (a directory that does not exist yet, or an empty one)")
    start = time.perf_counter()
    from openvision_max.training.params import load_params  # JAX starts here, after the arguments are checked
    try:
        params = load_params(cfg, cfg.load_parameters_path)
        out = write_export(params, cfg, cfg.export_dir)
    except CheckpointError as e:
        fail(f"checkpoint error: {e}")
    except ExportError as e:
        fail(str(e))
    print(f"exported {cfg.load_parameters_path} ({cfg.image_size}px) to {out} in "
          f"{time.perf_counter() - start:.1f}s; load with open_clip.create_model_from_pretrained('local-dir:{out}')",
          flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
