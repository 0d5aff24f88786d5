"""Evals by caption likelihood (objective=openvision2): caption_loss and zeroshot_generative against a direct
computation with the model, and the config refusing text-tower evals without a text tower."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from openvision_max import models
from openvision_max.config.schema import ConfigError
from openvision_max.data import demo_data
from openvision_max.data.tokenizer import Tokenizer, teacher_forcing
from openvision_max.evals import generative, zeroshot
from openvision_max.evals.runner import EvalRunner
from openvision_max.models import token_masking
from openvision_max.models.inputs import normalize_images

OV2 = ["objective=openvision2", "vocab_size=30522", "image_size=64", "patch_size=16", "decoder.keep_ratio=0.5",
       "decoder.caption_length=12", "eval_batch_size=8"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    sets = demo_data.ensure_demo_data(tmp_path_factory.mktemp("demo"), shapes_train=10, shapes_test_per_class=1)
    return sets["digits_test"]


def _params(cfg):
    model = models.build(cfg)
    dummy = [jnp.zeros(s.shape, s.dtype) for s in models.dummy_inputs(cfg)]
    return model, nn.unbox(model.init(jax.random.key(3), *dummy)["params"])


def _direct_nll(cfg, model, params, images, ids, captions):
    """Per (image, caption) mean token NLL straight from the model, with the eval's token draw."""
    targets, mask = Tokenizer().decoder_targets(captions, cfg.decoder.caption_length)
    batch = {"caption_targets": jnp.asarray(targets), "caption_mask": jnp.asarray(mask)}
    inputs, targets, mask = teacher_forcing(batch)
    keys = token_masking.example_keys(generative.EVAL_MASKING_SEED, 0, jnp.asarray(ids))
    tokens = model.apply({"params": params}, normalize_images(jnp.asarray(images)), method=model.image_tokens)
    logits = model.apply({"params": params}, tokens, inputs, keys, method=model.decode)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * mask
    return np.asarray(nll.sum(1)), np.asarray(mask.sum(1), np.float32)


def test_caption_loss_and_generative_zeroshot_match_the_model(digits):
    cfg = tiny_config(*OV2, f"evals=[{{name: cap, type: caption_loss, path: {digits}, max_examples: 12}}, "
                      f"{{name: gen, type: zeroshot_generative, path: {digits}, max_examples: 12}}]")
    model, params = _params(cfg)
    results = EvalRunner(cfg).run(params, None, 0)
    shards = EvalRunner(cfg).evals[0].shard_paths
    images, captions = zip(*[(i, c) for ims, cs in generative.captioned_batches(shards, 64, 12, 12)
                             for i, c in zip(ims, cs)])
    sums, counts = _direct_nll(cfg, model, params, np.stack(images), np.arange(12), list(captions))
    assert results["eval/cap/examples"] == 12
    np.testing.assert_allclose(results["eval/cap/loss"], sums.sum() / counts.sum(), rtol=1e-5)
    # Generative zero-shot: per image, the class whose prompts have the lowest mean caption loss.
    ev = EvalRunner(cfg).evals[1]
    assert ev.class_names[3] == "three" and len(ev.templates) == 3
    prompts = [t.format(c) for c in ev.class_names for t in ev.templates]
    imgs, labels = next(zeroshot.labelled_batches(shards, 64, 12, 12))
    loss = np.stack([np.divide(*_direct_nll(cfg, model, params, imgs, np.arange(12), [p] * 12)) for p in prompts], 1)
    pred = loss.reshape(12, 10, 3).mean(2).argmin(1)
    assert results["eval/gen/top1"] == pytest.approx(np.mean(pred == labels))
    assert results["eval/gen/examples"] == 12 and 0 <= results["eval/gen/top5"] <= 1


@pytest.mark.parametrize("kind", ["zeroshot", "retrieval"])
def test_text_tower_evals_are_refused_without_a_text_tower(kind):
    with pytest.raises(ConfigError, match=f"a {kind} eval embeds texts with the text tower, which "
                                          "objective=openvision2 does not have"):
        tiny_config("objective=openvision2", f"evals=[{{name: x, type: {kind}, path: nowhere}}]")
