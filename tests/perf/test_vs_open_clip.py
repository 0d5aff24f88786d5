"""open_clip's side of `--vs open_clip`: the same towers (trainable parameters, decayed kernels), a train step
that learns in fp32 and runs under bf16 autocast, and a loss equal to our `contrastive` on its embeddings."""

import math
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # before open_clip is imported: nothing here may download

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("open_clip")

from conftest import ROOT, tiny_config  # noqa: E402

from openvision_max import models  # noqa: E402
from openvision_max.perf import vs_open_clip  # noqa: E402
from openvision_max.perf.vs_open_clip import open_clip_trainer, our_tower_param_count  # noqa: E402
from openvision_max.training.losses import contrastive  # noqa: E402
from openvision_max.training.optimizer import decay_mask  # noqa: E402

# A learning rate that moves the tiny model in a few steps (the default peak LR at batch 8 is 2.5e-7).
LEARNING = ["base_lr=0.05", "warmup_steps=0"]


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_trainable_parameters_are_our_towers(loss):
    cfg = tiny_config(f"contrastive_loss={loss}")
    trainer = open_clip_trainer(cfg)
    assert trainer.param_count == our_tower_param_count(cfg)
    # The one tensor more: open_clip's vision position slot [1 + N, width], our fixed table, frozen.
    everything = sum(p.numel() for p in trainer.model.parameters())
    assert everything - trainer.param_count == (cfg.derived.num_patches + 1) * cfg.vision.width


def test_weight_decay_covers_exactly_our_kernels():
    cfg = tiny_config()
    trainer = open_clip_trainer(cfg)
    decayed = sum(p.numel() for g in trainer.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"])
    shapes = nn.unbox(jax.eval_shape(models.build(cfg).init, jax.random.key(0), *models.dummy_inputs(cfg))["params"])
    shapes.pop("decoder")
    ours = sum(math.prod(x.shape) for x, d in zip(jax.tree.leaves(shapes), jax.tree.leaves(decay_mask(shapes))) if d)
    assert decayed == ours


def test_steps_lower_the_loss_and_keep_the_position_table():
    trainer = open_clip_trainer(tiny_config(*LEARNING))
    table = trainer.model.visual.positional_embedding.detach().clone()
    losses = [trainer.step() for _ in range(4)]
    assert all(isinstance(x, float) and math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.1, losses
    assert trainer.model.visual.positional_embedding.equal(table)
    assert "no caption decoder" in trainer.description and "fp32" in trainer.description


def test_bf16_step_is_finite():
    trainer = open_clip_trainer(tiny_config("dtype=bfloat16", *LEARNING))
    assert math.isfinite(trainer.step())
    assert "amp_bf16" in trainer.description


@pytest.mark.parametrize("overrides", [["contrastive_loss=softmax"],
                                       ["contrastive_loss=sigmoid", "contrastive_weight=0.5"]])
def test_loss_is_our_contrastive_on_its_embeddings(overrides):
    cfg = tiny_config(*overrides)
    trainer = open_clip_trainer(cfg)
    probe = trainer.loss_and_embeddings()
    bias = None if probe.logit_bias is None else jnp.float32(probe.logit_bias)
    ours = cfg.contrastive_weight * contrastive(cfg.contrastive_loss, jnp.asarray(probe.image_emb),
                                                jnp.asarray(probe.text_emb), jnp.float32(probe.logit_scale), bias)
    assert probe.loss == pytest.approx(float(ours), rel=1e-5)
    assert probe.text_emb.shape == (2 * cfg.global_batch_size, cfg.embed_dim)
    # step() reports the same forward's loss, before its update.
    assert trainer.step() == pytest.approx(probe.loss, rel=1e-6)


def test_imports_without_torch_and_says_what_to_install(monkeypatch):
    code = ("import sys; sys.modules['torch'] = sys.modules['open_clip'] = None\n"
            "import openvision_max.perf.vs_open_clip")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[export\]'"):
        vs_open_clip.open_clip_trainer(tiny_config())
