"""The `evals:` of a config, run on a set of parameters; results named `eval/<name>/<metric>`.

Datasets are resolved when the runner is built, so a bad path stops a run before training starts, not
hours later at the first eval. Zero-shot class embeddings are cached per checkpoint step.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import pathlib
import time
from typing import Any, Optional

from jax.sharding import Mesh

from openvision_max.config.schema import Config
from openvision_max.data import locate
from openvision_max.evals import generative, retrieval, zeroshot
from openvision_max.evals.encoder import Encoder


class Scorers:
    """What evals run on, built on first use: `encoder` (image and text towers) or `captions` (the caption
    decoder's likelihoods), for one set of parameters."""

    def __init__(self, cfg: Config, params: Any, mesh: Optional[Mesh]):
        self.cfg, self.params, self.mesh = cfg, params, mesh

    @functools.cached_property
    def encoder(self) -> Encoder:
        return Encoder(self.cfg, self.params, mesh=self.mesh, batch_size=self.cfg.eval_batch_size)

    @functools.cached_property
    def captions(self) -> generative.CaptionScorer:
        return generative.CaptionScorer(self.cfg, self.params, mesh=self.mesh, batch_size=self.cfg.eval_batch_size)


@dataclasses.dataclass
class _ZeroShot:
    name: str
    shard_paths: list[str]
    class_names: list[str]
    templates: list[str]
    max_examples: Optional[int]

    def run(self, scorers: Scorers, cache: dict) -> dict[str, float]:
        key = ("classifier", tuple(self.class_names), tuple(self.templates))
        if key not in cache:
            cache[key] = zeroshot.class_embeddings(scorers.encoder, self.class_names, self.templates)
        return zeroshot.evaluate(scorers.encoder, self.shard_paths, self.class_names, self.templates,
                                 max_examples=self.max_examples, classifier=cache[key])


@dataclasses.dataclass
class _ZeroShotGenerative(_ZeroShot):
    def run(self, scorers: Scorers, cache: dict) -> dict[str, float]:
        return generative.zeroshot_generative(scorers.captions, self.shard_paths, self.class_names, self.templates,
                                              max_examples=self.max_examples)


@dataclasses.dataclass
class _CaptionLoss:
    name: str
    shard_paths: list[str]
    max_examples: Optional[int]

    def run(self, scorers: Scorers, cache: dict) -> dict[str, float]:
        return generative.caption_loss(scorers.captions, self.shard_paths, max_examples=self.max_examples)


IMAGENET_ASSET = pathlib.Path(__file__).resolve().parents[1] / "assets" / "imagenet_zeroshot.json"


def _shipped(entry: dict, key: str) -> list[str] | None:
    """`class_names: imagenet` / `templates: imagenet`: the ImageNet-1k names / CLIP's 81 templates we ship."""
    value = entry.get(key)
    if value == "imagenet":
        return list(json.loads(IMAGENET_ASSET.read_text())["classnames" if key == "class_names" else key])
    if isinstance(value, str):
        raise locate.DataError(f"eval {entry['name']}: {key} must be a list or 'imagenet', got {value!r}")
    return value


def _check_path(name: str, path: str) -> None:
    """A missing path, said as such: without this, a typo reads as a dataset without classes."""
    if path.startswith(locate.DEMO_SCHEME):
        return  # the demo resolver names the demo sets there are
    expanded = os.path.expanduser(path)
    if any(c in expanded for c in "*?["):  # what glob treats as a pattern
        if not glob.glob(expanded):
            raise locate.DataError(f"eval {name}: path pattern {path} matches nothing")
    elif not os.path.exists(expanded):
        raise locate.DataError(f"eval {name}: path {path} does not exist")


def _zeroshot(cfg: Config, entry: dict, kind: type = _ZeroShot) -> _ZeroShot:
    path = entry["path"]
    _check_path(entry["name"], str(path))
    entry = {**entry, "class_names": _shipped(entry, "class_names"), "templates": _shipped(entry, "templates")}
    names = list(entry.get("class_names") or locate.class_names(path, cfg.data_cache_dir))
    if not names:
        raise locate.DataError(f"eval {entry['name']}: {path} lists no classes in dataset.json; "
                                   "give class_names in the eval entry")
    templates = list(entry.get("templates") or locate.templates(path, cfg.data_cache_dir)
                     or zeroshot.DEFAULT_TEMPLATES)
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise locate.DataError(f"eval {entry['name']}: template {bad[0]!r} has no {{}} for the class name")
    return kind(entry["name"], locate.resolve([path], cfg.data_cache_dir), names, templates,
                entry.get("max_examples"))


def _caption_loss(cfg: Config, entry: dict) -> _CaptionLoss:
    """`path`: any captioned record set (a converted dataset, its shards or a pattern, demo:NAME)."""
    _check_path(entry["name"], str(entry["path"]))
    return _CaptionLoss(entry["name"], locate.resolve([entry["path"]], cfg.data_cache_dir), entry.get("max_examples"))


@dataclasses.dataclass
class _Retrieval:
    name: str
    dataset: retrieval.RetrievalDataset

    def run(self, scorers: Scorers, cache: dict) -> dict[str, float]:
        return retrieval.evaluate(scorers.encoder, self.dataset)


def _retrieval(cfg: Config, entry: dict) -> _Retrieval:
    """`path` is the captions JSON: COCO's (`format: coco`, e.g. captions_val2017.json) or a Karpathy split
    (`format: karpathy`, dataset_coco.json / dataset_flickr30k.json, with `split`); images in `image_dir`."""
    fmt = entry.get("format", "coco")
    path, image_dir = pathlib.Path(entry["path"]).expanduser(), entry.get("image_dir")
    if fmt not in ("coco", "karpathy"):
        raise locate.DataError(f"eval {entry['name']}: format {fmt!r} is not coco or karpathy")
    if not path.is_file():
        raise locate.DataError(f"eval {entry['name']}: no captions file at {path}")
    if not image_dir or not pathlib.Path(image_dir).expanduser().is_dir():
        raise locate.DataError(f"eval {entry['name']}: image_dir {image_dir!r} is not a directory")
    image_dir = pathlib.Path(image_dir).expanduser()
    try:
        if fmt == "coco":
            ds = retrieval.load_coco_captions(path, image_dir, name=entry["name"],
                                              max_images=entry.get("max_images"))
        else:
            ds = retrieval.load_karpathy(path, image_dir, split=entry.get("split", "test"), name=entry["name"],
                                         max_images=entry.get("max_images"))
    except (KeyError, ValueError, TypeError) as e:
        raise locate.DataError(f"eval {entry['name']}: {path} is not a {fmt} captions file ({e})") from None
    missing = [p for p in ds.image_paths if not p.is_file()]
    if missing:
        raise locate.DataError(f"eval {entry['name']}: {len(missing)} images listed in {path} are missing, "
                               f"e.g. {missing[0]}")
    return _Retrieval(entry["name"], ds)


BUILDERS = {"zeroshot": _zeroshot, "retrieval": _retrieval, "caption_loss": _caption_loss,
            "zeroshot_generative": functools.partial(_zeroshot, kind=_ZeroShotGenerative)}


class EvalRunner:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.evals = [BUILDERS[entry["type"]](cfg, entry) for entry in cfg.evals]
        self._cache: dict[Any, dict] = {}

    def __bool__(self) -> bool:
        return bool(self.evals)

    def run(self, params: Any, mesh: Optional[Mesh], step: int) -> dict[str, float]:
        """Every configured eval on `params` (the parameters at checkpoint step `step`)."""
        scorers = Scorers(self.cfg, params, mesh)
        cache = self._cache.setdefault(step, {})
        self._cache = {step: cache}  # keep only the current checkpoint's class embeddings
        out: dict[str, float] = {}
        for ev in self.evals:
            start = time.perf_counter()
            for metric, value in ev.run(scorers, cache).items():
                out[f"eval/{ev.name}/{metric}"] = float(value)
            out[f"eval/{ev.name}/seconds"] = time.perf_counter() - start
        return out
