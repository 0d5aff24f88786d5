"""Parameters and analytic FLOPs of every model size at its stage resolutions, as a table.

    python benchmarks/model_table.py [--batch 32768]

Uses the same analytic counter as the train loop's MFU (openvision_max/models/flops.py).
"""

from __future__ import annotations

import argparse
import pathlib

from openvision_max.config import load_config
from openvision_max.perf.family import MODELS
from openvision_max.perf.summary import summarize

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32768, help="global batch (sets the contrastive share)")
    args = parser.parse_args()
    header = (f"{'model':<10} {'res':>4} {'vision M':>9} {'total M':>8} {'vision GF':>10} {'text GF':>8} "
              f"{'decoder GF':>10} {'train GF/sample':>16}")
    print(header)
    print("-" * len(header))
    for name, resolutions in MODELS.items():
        for res in resolutions:
            cfg = load_config([str(CONFIGS / f"{name}.yml"), f"image_size={res}", f"global_batch_size={args.batch}"],
                              platform="cpu", num_devices=1)
            s = summarize(cfg)
            p, f = s["params"], s["flops_per_sample"]
            print(f"{name:<10} {res:>4} {p['vision'] / 1e6:>9.1f} {p['total'] / 1e6:>8.1f} "
                  f"{f['vision'] / 1e9:>10.2f} {f['text'] / 1e9:>8.2f} {f['decoder'] / 1e9:>10.2f} "
                  f"{f['train_total'] / 1e9:>16.1f}")


if __name__ == "__main__":
    main()
