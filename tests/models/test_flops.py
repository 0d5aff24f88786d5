"""Analytic FLOPs against published figures and against XLA's own count of the compiled forward pass."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from openvision_max import models
from openvision_max.config import load_config
from openvision_max.models import flops
from openvision_max.perf.summary import summarize

from conftest import CONFIGS, ROOT, tiny_config

# Vision params from the OpenVision README table, in millions.
README_PARAMS = {"Ti16": 5, "S16": 22, "B16": 86, "L14": 307, "So400m14": 412, "H14": 632}


def summary_of(name, *overrides):
    return summarize(load_config([str(CONFIGS / f"{name}.yml"), "image_size=224", *overrides],
                                 platform="cpu", num_devices=1))


@pytest.mark.parametrize("name", README_PARAMS)
def test_vision_params_match_readme(name):
    vision = summary_of(name)["params"]["vision"]
    if name == "Ti16":
        assert 5.3e6 <= vision <= 5.9e6
    else:
        assert vision == pytest.approx(README_PARAMS[name] * 1e6, rel=0.02)


@pytest.mark.parametrize("name, gflops", [("B16", 35.13), ("L14", 162.03)])
def test_vision_flops_match_open_clip_profile(name, gflops):
    assert summary_of(name)["flops_per_sample"]["vision"] == pytest.approx(gflops * 1e9, rel=0.005)


def test_train_total_is_three_forwards():
    f = summary_of("B16")["flops_per_sample"]
    forward = f["vision"] + f["text"] + f["decoder"] + f["contrastive"]
    assert f["text"] == 2 * f["text_per_sequence"]
    assert abs(f["train_total"] - 3 * forward) <= 4  # integer rounding of the parts


def test_contrastive_share_grows_with_batch():
    small = summary_of("B16", "global_batch_size=256")["flops_per_sample"]["contrastive"]
    large = summary_of("B16", "global_batch_size=1024")["flops_per_sample"]["contrastive"]
    assert large == 4 * small == 2 * 2 * 1024 * 512  # two text kinds x 2 FLOPs x batch x embed_dim


def test_summary_cli_prints_one_json_object():
    proc = subprocess.run([sys.executable, "-m", "openvision_max.summary", str(CONFIGS / "B16.yml"),
                           "image_size=224"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out["params"]) == {"vision", "text", "decoder", "total"}
    assert {"vision", "text", "decoder", "train_total"} <= set(out["flops_per_sample"])


# Wide enough that the elementwise work XLA also counts (norms, GELU, softmax) stays a small share;
# unrolled, because XLA's cost analysis counts a scanned loop body once.
XLA_CHECK = ["scan_layers=false", "embed_dim=64", "text.context_length=16", "decoder.caption_length=8",
             *(f"{t}.{k}={v}" for t in ("vision", "text", "decoder")
               for k, v in (("width", 256), ("mlp_dim", 1024), ("num_heads", 4)))]


def _xla_flops(fn, *args) -> float:
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def test_analytic_forward_matches_xla_cost_analysis():
    cfg = tiny_config(*XLA_CHECK)
    model = models.build(cfg)
    images, texts = (jnp.zeros(s.shape, s.dtype) for s in models.dummy_inputs(cfg, 1))
    params = model.init(jax.random.key(0), images, texts)
    image_tokens = jnp.zeros((1, cfg.derived.num_patches, cfg.vision.width))
    text_tokens = jnp.zeros((1, cfg.text.context_length - 1, cfg.text.width))
    measured = {
        "vision": _xla_flops(lambda p, x: model.apply(p, x, method=lambda m, x: m.vision(x)), params, images),
        "text": _xla_flops(lambda p, x: model.apply(p, x, method=lambda m, x: m.text(x)), params, texts[:1]),
        "decoder": _xla_flops(lambda p, a, b: model.apply(p, a, b, method=lambda m, a, b: m.decoder(a, b)),
                              params, image_tokens, text_tokens),
    }
    analytic = {"vision": flops.vision_forward(cfg), "text": flops.text_forward(cfg),
                "decoder": flops.decoder_forward(cfg)}
    for tower in measured:
        assert analytic[tower] == pytest.approx(measured[tower], rel=0.05), (tower, analytic, measured)
