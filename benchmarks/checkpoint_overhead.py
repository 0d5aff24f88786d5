"""Mean step time of a tiny run with a checkpoint every step vs none (asynchronous saves should hide the writes).

    python benchmarks/checkpoint_overhead.py [--steps 40] [--batch 16]

Prints what it measured; the steps after the first log window (which includes compilation) are averaged.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

from openvision_max.config import load_stages
from openvision_max.training.main import train

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def mean_step_time(out: str, name: str, steps: int, period: int, batch: int) -> float:
    stages = load_stages([str(CONFIGS / "demo.yml"), "dataset_type=synthetic", "evals=[]",
                          f"base_output_directory={out}", f"run_name={name}",
                          f"steps={steps}", f"global_batch_size={batch}", "log_period=1", f"checkpoint_period={period}",
                          "max_checkpoints_to_keep=2"])
    run_dir = train(stages)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in rows[2:]]  # skip the compile window and the first steady step
    return sum(times) / len(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16, help="global batch of the demo model")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        without = mean_step_time(out, "no_ckpt", args.steps, 10 ** 9, args.batch)
        every = mean_step_time(out, "ckpt_every_step", args.steps, 1, args.batch)
    print(f"demo model, batch {args.batch}, {args.steps} steps")
    print(f"mean step time, no checkpoints:        {without * 1e3:.1f} ms")
    print(f"mean step time, checkpoint every step: {every * 1e3:.1f} ms  ({(every / without - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
