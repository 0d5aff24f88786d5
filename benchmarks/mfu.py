"""The model family's MFU table: each model file at its recipe resolution(s) and per-device batch.

    python benchmarks/mfu.py --mode aot --topology v5p-8 [--all-resolutions] [--patch8] [--output-dir DIR]

Compiles the real train step of every model (Ti16, S16, B16, L14, So400m14, H14; with --patch8 also Ti/8,
S/8, B/8) for the topology from this host and writes DIR/mfu.md (the table, also printed), DIR/mfu.json and
DIR/mfu.png (modelled MFU against train FLOPs per sample, one line per resolution). Each row runs at the
recipe's per-device batch (its global batch over the 128 chips it was trained on) or, if that does not fit,
the largest halving of it that does. Every figure is the TPU compiler's model, not a measurement. Points are
cached under DIR/points, so an interrupted table resumes. Minutes per model on a 2-core host.
"""

from __future__ import annotations

import argparse
import sys

from openvision_max.config.paths import as_path
from openvision_max.perf import family


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="benchmarks/mfu.py", description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["aot"], default="aot",
                   help="aot: modelled on --topology (the family table needs no devices)")
    p.add_argument("--topology", required=True, help="a TPU topology, e.g. v5p-8")
    p.add_argument("--slices", type=int, default=1, help="number of slices")
    p.add_argument("--all-resolutions", action="store_true", help="every recipe resolution, not only 224 px")
    p.add_argument("--patch8", action="store_true", help="also Ti/8, S/8 and B/8")
    p.add_argument("--models", default="", help="comma-separated subset of the model files, e.g. Ti16,B16")
    p.add_argument("--output-dir", default="runs/benchmarks/mfu", help="where mfu.md/json/png go")
    args = p.parse_args(argv)
    chosen = [m for m in args.models.split(",") if m]
    unknown = sorted(set(chosen) - set(family.MODELS))
    if unknown:
        p.error(f"unknown model {unknown[0]!r}; the family: {', '.join(family.MODELS)}")
    try:  # the plot is written last: find out now, not after hours of compiles
        import matplotlib  # noqa: F401
    except ImportError:
        p.error("mfu.png needs matplotlib: pip install -e '.[viz]'")
    out_dir = as_path(args.output_dir)
    rows = [e for e in family.entries(all_resolutions=args.all_resolutions, patch8=args.patch8)
            if not chosen or e.model in chosen]
    results = [family.measure_entry(e, args.topology, args.slices, out_dir) for e in rows]
    print(family.write(results, out_dir, args.topology))
    print(f"written: {out_dir / 'mfu.md'}, {out_dir / 'mfu.json'}, {out_dir / 'mfu.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
