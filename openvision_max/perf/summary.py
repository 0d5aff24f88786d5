"""`python -m openvision_max.summary CONFIG [key=value ...]`: parameter counts and FLOPs as one JSON object.

Parameter counts come from `jax.eval_shape` of the model's init (nothing is materialised); FLOPs from the
analytic counter in `openvision_max.flops`, the same one the train loop uses for MFU.
"""

from __future__ import annotations

import json
import math
import sys

import flax.linen as nn
import jax

from openvision_max import models
from openvision_max.config import cli_config
from openvision_max.config.schema import Config
from openvision_max.models import flops


def param_counts(cfg: Config) -> dict[str, int]:
    """Parameters per tower (`vision`, `text`, `decoder`; `text` is 0 for objective=openvision2) and in all
    (`total`, which adds the temperature)."""
    model = models.build(cfg)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *models.dummy_inputs(cfg))["params"])
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
    return {"vision": count(shapes["vision"]), "text": count(shapes.get("text", {})),
            "decoder": count(shapes["decoder"]), "total": count(shapes)}


def summarize(cfg: Config) -> dict:
    return {
        "objective": cfg.objective,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "global_batch_size": cfg.global_batch_size,
        "params": param_counts(cfg),
        "flops_per_sample": {k: int(round(v)) for k, v in flops.flops_per_sample(cfg).items()},
        **({"decoder_patch_tokens": {"kept": cfg.derived.kept_patches, "of": cfg.derived.num_patches}}
           if cfg.derived.kept_patches < cfg.derived.num_patches else {}),
    }


def main(argv: list[str]) -> None:
    # A staged config is summarised at its first stage to run (choose one with stage=NAME).
    cfg = cli_config(argv, "python -m openvision_max.summary")[0]
    print(json.dumps(summarize(cfg)))


if __name__ == "__main__":
    main(sys.argv[1:])
