"""The vision-only export (timm VisionTransformer): parity with our tower, the documented load call, the CLI.

timm is the installed one (open-clip-torch depends on it); it must never download, so the hub is switched off
before anything imports it.
"""

import dataclasses
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before timm / huggingface_hub are imported

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import CONFIGS, TINY, tiny_config  # noqa: E402

from openvision_max import models  # noqa: E402
from openvision_max.export import __main__ as export_cli  # noqa: E402
from openvision_max.export import vision_only  # noqa: E402
from openvision_max.export.vision_only import timm_config, to_timm, write_vision_only  # noqa: E402
from openvision_max.models.inputs import IMAGE_MEAN, IMAGE_STD, normalize_images  # noqa: E402
from openvision_max.models.vision import VisionTower  # noqa: E402
from openvision_max.training.checkpointing import Checkpointer  # noqa: E402
from openvision_max.training.params import abstract_params  # noqa: E402

TINY_ARGS = [str(CONFIGS / "base.yml"), *TINY]  # tiny_config() on the command line
RTOL = 1e-5  # max abs difference / max abs value of the fp32 embeddings (timm vs ours); measured ~3e-7


@pytest.fixture(scope="module")
def timm():
    return pytest.importorskip("timm")


def random_params(cfg, seed=0):
    """Every leaf random (matrices std 0.2, vectors 0.05; LayerNorm scales near 1, as trained ones are)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, s: (rng.standard_normal(s.shape) * (0.2 if len(s.shape) >= 2 else 0.05)
                      + (p[-1].key == "scale")).astype(np.float32), abstract_params(cfg))


def our_embedding(cfg, vision, images):
    """`vision(images)[0]`: the image embedding before L2 normalisation, for uint8 [B, H, W, 3]."""
    tower = VisionTower(models.build(cfg).spec.vision, cfg.patch_size, cfg.embed_dim)
    return np.asarray(jax.jit(lambda p, x: tower.apply({"params": p}, normalize_images(x))[0])(vision, images))


def timm_embedding(model, images):
    import torch
    x = np.asarray(normalize_images(images))  # the pixels our tower sees, NCHW for timm
    with torch.no_grad():
        return model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()


def family_config(name):
    from openvision_max.config import load_config
    return load_config([str(CONFIGS / name)], platform="cpu", num_devices=1)


def relative_difference(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype == np.float32
    return float(np.abs(got - want).max() / np.abs(want).max())


def images(n=4, size=32, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("scan", ["true", "false"])
def test_timm_gives_our_embedding(scan, timm, tmp_path):
    """Only params["vision"] is read: an OpenVision 2 tree ({"vision", "decoder"}) exports the same way."""
    cfg = tiny_config(f"scan_layers={scan}")
    params = random_params(cfg)
    assert ("blocks" in params["vision"]["transformer"]) == (scan == "true")
    out = write_vision_only({"vision": params["vision"], "decoder": params["decoder"]}, cfg, tmp_path / "e")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "openvision_max_config.yml"]
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # strict: every tensor named
    assert type(model).__name__ == "VisionTransformer"
    assert type(model.norm).__name__ == "Identity" and type(model.fc_norm).__name__ == "LayerNorm"
    assert model.patch_embed.proj.bias is not None and not model.patch_embed.proj.bias.any()
    assert model.num_prefix_tokens == 1 and model.global_pool == "avg" and model.head.out_features == cfg.embed_dim
    x = images()
    got, want = timm_embedding(model, x), our_embedding(cfg, params["vision"], x)
    diff = relative_difference(got, want)
    print(f"scan_layers={scan}: max |timm - ours| = {np.abs(got - want).max():.2e}, / max |ours| = {diff:.2e}")
    assert diff < RTOL


def test_state_dict_is_exactly_timms(timm):
    """Names and shapes are those of the VisionTransformer timm builds from config.json (none missing or extra),
    and the tensors are our parameters laid out, not recomputed."""
    cfg = tiny_config()
    params = random_params(cfg, seed=2)
    state = to_timm(params["vision"], cfg)
    config = timm_config(cfg)
    model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"])
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: v.shape for k, v in state.items()}
    v = params["vision"]
    np.testing.assert_array_equal(state["patch_embed.proj.weight"], v["embedding"]["kernel"].transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(state["head.weight"], v["head"]["kernel"].T)
    np.testing.assert_array_equal(state["pos_embed"][0, 0], 0)  # CLS slot
    q = v["transformer"]["blocks"]["attn"]["query"]["kernel"][1].reshape(cfg.vision.width, -1).T
    np.testing.assert_array_equal(state["blocks.1.attn.qkv.weight"][:cfg.vision.width], q)


def test_config_json(timm):
    cfg = tiny_config()
    config = timm_config(cfg)
    assert config["pretrained_cfg"]["mean"] == pytest.approx((IMAGE_MEAN / 255).tolist())
    assert config["pretrained_cfg"]["std"] == pytest.approx((IMAGE_STD / 255).tolist())
    assert (config["pretrained_cfg"]["interpolation"], config["pretrained_cfg"]["crop_pct"]) == ("bilinear", 1.0)
    assert config["architecture"] == "vit_base_patch16_224"  # no timm size is this tiny: the plain builder
    assert vision_only.architecture(family_config("B16.yml")) == "vit_base_patch16_224"
    assert vision_only.architecture(family_config("L14.yml")) == "vit_large_patch14_224"
    assert int(1152 * timm_config(family_config("So400m14.yml"))["model_args"]["mlp_ratio"]) == 4304
    # Every named builder is plain: with the same model_args it builds what the default builder builds.
    args = config["model_args"]
    want = repr(timm.create_model(vision_only.DEFAULT_ARCHITECTURE, **args))
    for name in vision_only.ARCHITECTURES.values():
        assert repr(timm.create_model(name, **args)) == want, name


def test_timm_preprocessing_is_our_eval_transform(timm, tmp_path):
    """timm's eval transform from the pretrained_cfg gives our eval pixels, on non-square photos too."""
    import skimage.data
    from PIL import Image

    from openvision_max.data.transforms import eval_image

    cfg = tiny_config("image_size=48", "patch_size=16")
    out = write_vision_only(random_params(cfg), cfg, tmp_path / "e")
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    for name in ("astronaut", "chelsea", "rocket"):
        im = getattr(skimage.data, name)()[..., :3]
        want = (eval_image(im, 48).astype(np.float32) - IMAGE_MEAN) / IMAGE_STD
        np.testing.assert_allclose(transform(Image.fromarray(im)).permute(1, 2, 0).numpy(), want, atol=1e-5,
                                   err_msg=name)


# --- The command ------------------------------------------------------------------------------------------


def saved_run(root, cfg):
    """A random model of `cfg` saved as a run: config.yml + checkpoints/7."""
    import yaml

    from openvision_max.config import config_to_dict
    params = random_params(cfg, seed=3)
    run_dir = root / "run"
    run_dir.mkdir()
    (run_dir / "config.yml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    with Checkpointer(run_dir / "checkpoints", max_to_keep=1, period=1) as ckpt:
        ckpt.maybe_save(7, {"params": jax.device_put(params)}, {"stage_index": 0, "stage_step": 7}, force=True)
    return dataclasses.make_dataclass("Run", ["cfg", "params", "dir"])(cfg, params, run_dir)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return saved_run(tmp_path_factory.mktemp("run"), tiny_config())


def test_cli_writes_what_the_load_call_loads(run, timm, tmp_path, capsys):
    out = tmp_path / "v"
    export_cli.main([f"load_parameters_path={run.dir}", f"export_dir={out}", "--vision-only"])
    printed = capsys.readouterr()
    line = printed.out.strip().splitlines()[-1]
    call = f"timm.create_model('local-dir:{out}', pretrained=True)"
    assert line.startswith(f"exported the vision tower of {run.dir} (32px) to {out}") and line.endswith(call)
    assert not printed.err
    model = eval(call, {"timm": timm}).eval()  # the printed call, as a user would paste it
    x = images(seed=4)
    assert relative_difference(timm_embedding(model, x), our_embedding(run.cfg, run.params["vision"], x)) < RTOL
    # Without local-dir: (older timm), from the same files and config.json.
    config = json.loads((out / "config.json").read_text())
    model = timm.create_model(config["architecture"], pretrained=True, pretrained_cfg_overlay=dict(
        file=str(out / "model.safetensors"), **config["pretrained_cfg"]), **config["model_args"]).eval()
    assert relative_difference(timm_embedding(model, x), our_embedding(run.cfg, run.params["vision"], x)) < RTOL
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_an_openvision2_run_gets_the_vision_only_export_and_its_patch_tokens(timm, tmp_path, capsys):
    """objective=openvision2: one line says why there is no open_clip export and the vision-only one is
    written; timm's forward_features without its CLS row are the patch tokens the caption decoder reads."""
    import torch

    ov2 = saved_run(tmp_path, tiny_config("objective=openvision2"))
    assert "text" not in ov2.params and "logit_scale" not in ov2.params
    out = tmp_path / "v"
    export_cli.main([f"load_parameters_path={ov2.dir}", f"export_dir={out}"])
    printed = capsys.readouterr()
    assert printed.err.strip() == (
        "python -m openvision_max.export: objective=openvision2 has no text tower and open_clip's CLIP needs one: "
        "no open_clip export; writing the vision-only timm export instead (--vision-only)")
    assert printed.out.strip().endswith(f"timm.create_model('local-dir:{out}', pretrained=True)")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "openvision_max_config.yml"]
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = images(seed=5)
    with torch.no_grad():
        features = model.forward_features(torch.from_numpy(np.asarray(normalize_images(x))).permute(0, 3, 1, 2))
    ours = models.build(ov2.cfg)
    tokens = np.asarray(ours.apply({"params": ov2.params}, normalize_images(x), method=ours.image_tokens))
    assert relative_difference(features[:, 1:].numpy(), tokens) < RTOL


def test_cli_errors_leave_nothing(run, tmp_path, capsys):
    def one_line_exit_2(argv):
        with pytest.raises(SystemExit) as e:
            export_cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1, err
        return err

    out = tmp_path / "v"
    err = one_line_exit_2([*TINY_ARGS, "vision.mlp_dim=128", f"load_parameters_path={run.dir}", f"export_dir={out}",
                           "--vision-only"])
    assert "the model has (2, 32, 128)" in err
    assert not out.exists() and not list(tmp_path.iterdir())
    (out / "x").mkdir(parents=True)
    err = one_line_exit_2([f"load_parameters_path={run.dir}", f"export_dir={out}", "--vision-only"])
    assert "already exists and is not an empty directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"] and os.listdir(out) == ["x"]

