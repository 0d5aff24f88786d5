"""The `evals:` of a config, run on a set of parameters; results named `eval/<name>/<metric>`.

Datasets are resolved when the runner is built, so a bad path stops a run before training starts, not
hours later at the first eval. Zero-shot class embeddings are cached per checkpoint step.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

from jax.sharding import Mesh

from openvision_max.data import locate
from openvision_max.evals import zeroshot
from openvision_max.evals.encoder import Encoder
from openvision_max.schema import Config


@dataclasses.dataclass
class _ZeroShot:
    name: str
    shard_paths: list[str]
    class_names: list[str]
    templates: list[str]
    max_examples: Optional[int]

    def run(self, encoder: Encoder, cache: dict) -> dict[str, float]:
        key = ("classifier", tuple(self.class_names), tuple(self.templates))
        if key not in cache:
            cache[key] = zeroshot.class_embeddings(encoder, self.class_names, self.templates)
        return zeroshot.evaluate(encoder, self.shard_paths, self.class_names, self.templates,
                                 max_examples=self.max_examples, classifier=cache[key])


def _zeroshot(cfg: Config, entry: dict) -> _ZeroShot:
    path = entry["path"]
    names = list(entry.get("class_names") or locate.class_names(path, cfg.data_cache_dir))
    if not names:
        raise locate.DataError(f"eval {entry['name']}: {path} lists no classes in dataset.json; "
                                   "give class_names in the eval entry")
    templates = list(entry.get("templates") or locate.templates(path, cfg.data_cache_dir)
                     or zeroshot.DEFAULT_TEMPLATES)
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise locate.DataError(f"eval {entry['name']}: template {bad[0]!r} has no {{}} for the class name")
    return _ZeroShot(entry["name"], locate.resolve([path], cfg.data_cache_dir), names, templates,
                     entry.get("max_examples"))


BUILDERS = {"zeroshot": _zeroshot}


class EvalRunner:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.evals = [BUILDERS[entry["type"]](cfg, entry) for entry in cfg.evals]
        self._cache: dict[Any, dict] = {}

    def __bool__(self) -> bool:
        return bool(self.evals)

    def run(self, params: Any, mesh: Optional[Mesh], step: int) -> dict[str, float]:
        """Every configured eval on `params` (the parameters at checkpoint step `step`)."""
        encoder = Encoder(self.cfg, params, mesh=mesh, batch_size=self.cfg.eval_batch_size)
        cache = self._cache.setdefault(step, {})
        self._cache = {step: cache}  # keep only the current checkpoint's class embeddings
        out: dict[str, float] = {}
        for ev in self.evals:
            start = time.perf_counter()
            for metric, value in ev.run(encoder, cache).items():
                out[f"eval/{ev.name}/{metric}"] = float(value)
            out[f"eval/{ev.name}/seconds"] = time.perf_counter() - start
        return out
