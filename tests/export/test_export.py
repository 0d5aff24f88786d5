"""Export to open_clip and import back: parity with open_clip 3.3 (offline), bit-exact round trips, errors.

The open_clip side is the installed open-clip-torch (the `export` extra); it must never download, so the
hub is switched off before anything imports it.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / open_clip are imported

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from openvision_max import models  # noqa: E402
from openvision_max.config import load_config  # noqa: E402
from openvision_max.export import __main__ as export_cli  # noqa: E402
from openvision_max.export import mapping  # noqa: E402
from openvision_max.export.directory import DECODER_WEIGHTS, WEIGHTS, read_export, write_export  # noqa: E402
from openvision_max.export.open_clip_config import mlp_ratio, open_clip_config  # noqa: E402
from openvision_max.training import checkpointing  # noqa: E402
from openvision_max.training.checkpointing import Checkpointer  # noqa: E402
from openvision_max.training.params import abstract_params, init_params  # noqa: E402

from conftest import CONFIGS, ROOT, TINY, tiny_config  # noqa: E402

TOL = 1e-4  # max abs difference of fp32 embeddings (open_clip vs ours)
# The tiny model with the real text format: BERT ids need the full vocabulary, and 80 tokens.
TINY_EXPORT = ["vocab_size=32000", "text.context_length=80", "decoder.depth=2"]
CONFIG_ARGS = [str(CONFIGS / "base.yml"), *TINY, *TINY_EXPORT]  # the same model on the command line


def random_params(cfg, seed=0, std=0.05):
    """Parameters with every leaf random (no zeros or ones a broken mapping could also produce); matrices
    with `std`, vectors with 0.05."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: (rng.standard_normal(s.shape) * (std if len(s.shape) >= 2 else 0.05)
                                     ).astype(np.float32), abstract_params(cfg))
    for name in ("vision", "text", "decoder"):  # LayerNorm scales near 1, as trained ones are
        params[name] = jax.tree_util.tree_map_with_path(
            lambda p, x: x + 1 if p[-1].key == "scale" else x, params[name])
    params["t"] = np.float32(np.log(1 / 0.07))
    return params


def save_run(cfg, params, run_dir):
    """A run directory as train.py leaves it: config.yml + checkpoints/<step>/ with state.params."""
    import yaml

    from openvision_max.config import config_to_dict
    run_dir.mkdir(parents=True)
    (run_dir / "config.yml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    with Checkpointer(run_dir / "checkpoints", max_to_keep=2, period=1) as ckpt:
        ckpt.maybe_save(7, {"params": jax.device_put(params)}, {"stage_index": 0, "stage_step": 7}, force=True)
    return run_dir


def assert_bit_equal(got, want):
    got, want = jax.device_get(got), jax.device_get(want)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape, jax.tree_util.keystr(path)
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), jax.tree_util.keystr(path)


def sample_photos():
    """Real photos of several aspect ratios (uint8 [H, W, 3]) shipped with scikit-image."""
    import skimage.data
    return {name: getattr(skimage.data, name)()[..., :3] for name in ("astronaut", "chelsea", "coffee", "rocket")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny model saved as a run, exported through the CLI, and loaded by open_clip and by us."""
    cfg = tiny_config(*TINY_EXPORT)
    params = random_params(cfg, std=0.2)  # large enough that zero-shot predictions differ between images
    tmp = tmp_path_factory.mktemp("tiny")
    run = save_run(cfg, params, tmp / "run")
    export_cli.main([*CONFIG_ARGS, f"load_parameters_path={run}", f"export_dir={tmp / 'export'}"])
    return dataclasses.make_dataclass("Tiny", ["cfg", "params", "run", "export"])(cfg, params, run, tmp / "export")


@pytest.fixture(scope="module")
def open_clip():
    return pytest.importorskip("open_clip")


def open_clip_embed(model, images, ids):
    import torch
    with torch.no_grad():
        img = model.encode_image(torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2), normalize=True)
        txt = model.encode_text(torch.from_numpy(np.asarray(ids, np.int64)), normalize=True)
    return img.numpy(), txt.numpy()


# --- Formats ----------------------------------------------------------------------------------------------


def test_open_clip_config_describes_our_towers():
    cfg = load_config([str(CONFIGS / "So400m14.yml"), "image_size=384"], platform="cpu", num_devices=1)
    oc = open_clip_config(cfg)
    v, t = oc["model_cfg"]["vision_cfg"], oc["model_cfg"]["text_cfg"]
    assert oc["model_cfg"]["embed_dim"] == 1152
    assert (v["image_size"], v["patch_size"], v["layers"], v["width"], v["head_width"]) == (384, 14, 27, 1152, 72)
    assert int(1152 * v["mlp_ratio"]) == 4304  # 4304 / 1152 alone rounds down to 4303 in open_clip's int()
    assert (v["no_ln_pre"], v["pool_type"], v["final_ln_after_pool"], v["norm_kwargs"]) == (
        True, "avg", True, {"eps": 1e-6})
    assert (t["context_length"], t["vocab_size"], t["tokenizer_mode"], t["pool_type"], t["no_causal_mask"]) == (
        80, 32000, "clips", "last", True)
    assert t["act_kwargs"] == {"approximate": "tanh"} and "act_kwargs" not in v  # vision GELU is exact
    assert oc["preprocess_cfg"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                    "interpolation": "bilinear", "resize_mode": "shortest"}
    assert mlp_ratio(3072, 768) == 4.0


def test_export_directory_layout(tiny):
    assert sorted(os.listdir(tiny.export)) == sorted([
        "open_clip_config.json", "open_clip_model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "caption_decoder.safetensors", "caption_decoder_config.json", "openvision_max_config.yml"])
    dec = json.loads((tiny.export / "caption_decoder_config.json").read_text())
    assert (dec["layers"], dec["width"], dec["caption_length"], dec["prefix_length"]) == (2, 32, 8, 16 + 79)
    assert not [p for p in tiny.export.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_imagenet_zero_shot_asset_matches_open_clip(open_clip):
    from open_clip import zero_shot_metadata as z
    data = json.loads((ROOT / "openvision_max" / "assets" / "imagenet_zeroshot.json").read_text())
    assert len(data["classnames"]) == 1000 and len(data["templates"]) == 81
    assert data["classnames"] == list(z.IMAGENET_CLASSNAMES)
    assert data["templates"] == [t("{}") for t in z.OPENAI_IMAGENET_TEMPLATES] + ["{}"]


# --- Parity with open_clip --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair(tiny, open_clip):
    import openvision_max
    oc_model, oc_preprocess = open_clip.create_model_from_pretrained(f"local-dir:{tiny.export}")
    oc_model.eval()
    return openvision_max.load_model(tiny.export), oc_model, oc_preprocess, open_clip.get_tokenizer(
        f"local-dir:{tiny.export}")


def test_tiny_embeddings_match_open_clip(tiny_pair):
    ours, oc_model, _, oc_tok = tiny_pair
    rng = np.random.default_rng(1)
    photos = [ours.preprocess(p) for p in sample_photos().values()]
    images = np.stack([*photos, *rng.standard_normal((4, 32, 32, 3)).astype(np.float32)])
    texts = ["a photo of an astronaut", "a cat", "Café au lait, 2 cups!", "rocket " * 100]
    ids = ours.tokenize(texts)
    oc_img, oc_txt = open_clip_embed(oc_model, images, oc_tok(texts))
    img_diff = np.abs(oc_img - ours.encode_image(images)).max()
    txt_diff = np.abs(oc_txt - ours.encode_text(ids)).max()
    print(f"tiny max abs difference: image {img_diff:.2e}, text {txt_diff:.2e}")
    assert img_diff < TOL and txt_diff < TOL
    assert ours.logit_scale == pytest.approx(float(oc_model.logit_scale.detach().exp()), rel=1e-6)


WORDS = ["a", "photo", "of", "the", "cat", "Dog", "ASTRONAUT", "rocket-launch", "coffee", "naïve", "café",
         "résumé", "São", "Paulo", "Zürich", "crème", "brûlée", "Ångström", "東京", "タワー", "straße", "e-mail",
         "U.S.A.", "3.14", "1,000", "42nd", "1990s", "$5", "50%", "#hashtag", "@user", "(brackets)", "[square]",
         "don't", "it's", "\"quoted\"", "well-known", "a/b", "x:y;z", "unbelievably", "antidisestablishment",
         "x" * 120, "emoji🙂", "tab\there", "new\nline", "  spaces  ", "Ω", "mañana", "...", "?!"]


def captions(n, seed=0):
    """Varied captions: accents, CJK, numbers, punctuation, unknown words, empty, and long ones (truncated)."""
    rng = np.random.default_rng(seed)
    out = ["", "a", "A photo of a cat.", "x" * 150]
    while len(out) < n:
        words = rng.choice(WORDS, size=int(rng.choice([1, 3, 8, 20, 60, 120])))
        out.append(str(rng.choice([" ", ", ", ". "])).join(words) + str(rng.choice(["", ".", "!", "?"])))
    return out


def test_token_ids_identical_to_open_clip(tiny_pair):
    ours, _, _, oc_tok = tiny_pair
    texts = captions(200)
    got, want = ours.tokenize(texts), oc_tok(texts).numpy()
    assert got.shape == want.shape == (200, 80)
    assert [i for i in range(200) if not np.array_equal(got[i], want[i])] == []
    assert (got[:, 78] == 2).sum() > 20 and (got[:, 78] == 0).sum() > 20  # truncated and padded rows
    assert (got == 100).any()  # [UNK]


def test_open_clip_cleans_text_first(tiny_pair):
    """open_clip's HFTokenizer runs ftfy.fix_text and html.unescape before WordPiece; our tokenizer does not.
    On text those change (curly quotes, HTML entities, ligatures) ids differ, and match after that cleaning."""
    from open_clip.tokenizer import _clean_whitespace

    ours, _, _, oc_tok = tiny_pair
    texts = ["“curly” quotes", "fish &amp; chips", "ﬁsh", "l&#39;amour"]
    want = oc_tok(texts).numpy()
    assert not np.array_equal(ours.tokenize(texts), want)
    np.testing.assert_array_equal(ours.tokenize([_clean_whitespace(t) for t in texts]), want)


@dataclasses.dataclass
class ZeroShotCase:
    """Images (uint8 [H, W, 3]) with class names and prompt templates: swap in a real dataset (the demo's
    held-out digits) here."""
    images: list
    classnames: list
    templates: list


def zero_shot_case():
    """Square photos and noise: on square images both preprocessings give identical pixels (non-square ones
    differ by up to a one-pixel shift, test_preprocessing_differs_slightly_on_other_aspect_ratios)."""
    squares = [im[:min(im.shape[:2]), :min(im.shape[:2])] for im in sample_photos().values()]
    rng = np.random.default_rng(3)
    noise = [rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for s in (32, 48, 64, 100)]
    return ZeroShotCase(squares + noise, ["astronaut", "cat", "cup of coffee", "rocket", "horse", "digit zero",
                                          "tench", "noise"], ["a photo of a {}.", "a bad photo of the {}.", "{}"])


def zero_shot_logits(embed_images, embed_texts, case):
    """[images, classes] cosine similarities with prompt-averaged, re-normalised class embeddings."""
    cls = np.stack([embed_texts([t.format(c) for t in case.templates]).mean(0) for c in case.classnames])
    cls /= np.linalg.norm(cls, axis=-1, keepdims=True)
    return embed_images(case.images) @ cls.T


def both_zero_shot_logits(tiny_pair, case):
    """(open_clip's, ours): each side end to end with its own preprocessing, tokenizer and encoders."""
    import torch
    from PIL import Image

    ours, oc_model, oc_pre, oc_tok = tiny_pair

    def oc_images(images):
        x = torch.stack([oc_pre(Image.fromarray(im)) for im in images])
        with torch.no_grad():
            return oc_model.encode_image(x, normalize=True).numpy()

    def oc_texts(texts):
        with torch.no_grad():
            return oc_model.encode_text(oc_tok(texts), normalize=True).numpy()

    return (zero_shot_logits(oc_images, oc_texts, case),
            zero_shot_logits(lambda ims: ours.encode_image(np.stack([ours.preprocess(im) for im in ims])),
                             lambda texts: ours.encode_text(ours.tokenize(texts)), case))


def test_zero_shot_argmax_matches_open_clip(tiny_pair):
    """End to end on each side: its own preprocessing, tokenizer and encoders."""
    case = zero_shot_case()
    want, got = both_zero_shot_logits(tiny_pair, case)
    assert np.abs(got - want).max() < TOL
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
    assert len(set(want.argmax(1))) > 1  # the case tells images apart (a random model favours few classes)


def test_preprocessing_matches_open_clip_on_square_images(tiny_pair):
    """resize_mode 'shortest' is our eval transform; on square images the pixels are identical."""
    from PIL import Image

    ours, _, oc_pre, _ = tiny_pair
    for im in zero_shot_case().images:
        pil = Image.fromarray(im)
        np.testing.assert_allclose(oc_pre(pil).permute(1, 2, 0).numpy(), ours.preprocess(pil), atol=1e-6)


def test_preprocessing_matches_open_clip_on_other_aspect_ratios(tiny_pair):
    """Our eval transform rounds as torchvision does (long side truncated, crop offset rounded)."""
    from PIL import Image

    ours, _, oc_pre, _ = tiny_pair
    for name, im in sample_photos().items():
        ref = oc_pre(Image.fromarray(im)).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(ref, ours.preprocess(im), atol=1e-6, err_msg=name)


def test_zero_shot_argmax_on_the_demos_held_out_digits_matches_open_clip(tiny_pair, tmp_path):
    """The demo's 500 held-out handwritten digits, its class names and templates, each side end to end."""
    import io

    import grain
    from PIL import Image

    from openvision_max.data import demo_data
    from openvision_max.data.records import DatasetInfo, Record

    directory = demo_data.ensure_demo_data(tmp_path, shapes_train=10, shapes_test_per_class=1)["digits_test"]
    info = DatasetInfo.read(directory)
    source = grain.sources.ArrayRecordDataSource(sorted(str(p) for p in directory.glob("*.array_record")))
    records = [Record.decode(source[i]) for i in range(len(source))]
    case = ZeroShotCase([np.asarray(Image.open(io.BytesIO(r.image)).convert("RGB")) for r in records],
                        info.classes, info.templates)
    want, got = both_zero_shot_logits(tiny_pair, case)
    assert len(case.images) == 500 and len(case.classnames) == 10
    assert np.abs(got - want).max() < TOL
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))


def test_caption_decoder_loads_into_open_clip_blocks(tiny, open_clip):
    """The recipe in docs/export.md: caption_decoder.safetensors into open_clip's Transformer with the prefix-LM
    mask gives our decoder's logits."""
    import functools

    import torch
    from open_clip.transformer import LayerNorm, Transformer
    from safetensors.torch import load_file

    d = json.loads((tiny.export / "caption_decoder_config.json").read_text())
    state = load_file(str(tiny.export / DECODER_WEIGHTS))
    blocks = Transformer(d["width"], d["layers"], d["heads"], d["mlp_ratio"],
                         act_layer=functools.partial(torch.nn.GELU, approximate="tanh"),
                         norm_layer=functools.partial(LayerNorm, eps=d["norm_eps"]))
    blocks.load_state_dict({k.removeprefix("transformer."): v for k, v in state.items()
                            if k.startswith("transformer.")})
    n = d["prefix_length"] + d["caption_length"]
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    mask = torch.from_numpy(np.where((j < d["prefix_length"]) | (j <= i), 0.0, -np.inf).astype(np.float32))

    rng = np.random.default_rng(2)
    img_tok = rng.standard_normal((2, d["image_tokens"], d["vision_width"])).astype(np.float32)
    txt_tok = rng.standard_normal((2, d["text_tokens"], d["text_width"])).astype(np.float32)
    with torch.no_grad():
        x = torch.cat([torch.from_numpy(img_tok) @ state["image_proj.weight"].T,
                       torch.from_numpy(txt_tok) @ state["text_proj.weight"].T,
                       state["queries"].expand(2, -1, -1)], dim=1)
        x = blocks(x, attn_mask=mask)[:, -d["caption_length"]:]
        x = torch.nn.functional.layer_norm(x, (d["width"],), state["ln_final.weight"], state["ln_final.bias"],
                                           d["norm_eps"])
        want = (x @ state["head.weight"].T).numpy()
    model = models.build(tiny.cfg)
    got = model.apply({"params": tiny.params}, img_tok, txt_tok, method=lambda m, a, b: m.decoder(a, b))
    assert np.abs(np.asarray(got) - want).max() < TOL


def test_b16_at_224_matches_open_clip(tmp_path, open_clip):
    """The B/16 model file (scan_layers as configured, decoder L) at 224 px, random parameters, fp32."""
    import time

    from safetensors.numpy import load_file

    import openvision_max

    cfg = load_config([str(CONFIGS / "B16.yml"), "image_size=224", "dtype=float32"], platform="cpu",
                      num_devices=1)
    params = random_params(cfg, std=0.02)  # NumPy: JAX's init of 250M parameters takes far longer on CPU
    start = time.perf_counter()
    write_export(params, cfg, tmp_path / "b16")
    print(f"B/16 export: {time.perf_counter() - start:.1f}s")
    oc_model, oc_pre = open_clip.create_model_from_pretrained(f"local-dir:{tmp_path / 'b16'}")
    oc_model.eval()
    ours = openvision_max.load_model(tmp_path / "b16")
    # load_model read every tower parameter back through the import mapping: bit for bit; the decoder too.
    assert_bit_equal(ours.params, {k: v for k, v in params.items() if k != "decoder"})
    decoder = mapping.decoder_from_open_clip(load_file(str(tmp_path / "b16" / DECODER_WEIGHTS)), cfg)
    assert_bit_equal(decoder, params["decoder"])
    image = ours.preprocess(sample_photos()["astronaut"])[None]
    texts = ["a photo of an astronaut", "a cat on a mat, sleeping."]
    oc_img, oc_txt = open_clip_embed(oc_model, image, open_clip.get_tokenizer(f"local-dir:{tmp_path / 'b16'}")(texts))
    img_diff = np.abs(oc_img - ours.encode_image(image)).max()
    txt_diff = np.abs(oc_txt - ours.encode_text(ours.tokenize(texts))).max()
    print(f"B/16 max abs difference: image {img_diff:.2e}, text {txt_diff:.2e}")
    assert img_diff < TOL and txt_diff < TOL


# --- Round trip and load_model ----------------------------------------------------------------------------


def test_round_trip_through_the_import_cli_is_bit_exact(tiny, tmp_path, capsys):
    from openvision_max.export import import_open_clip

    out = tmp_path / "imported"
    import_open_clip.main([str(tiny.export), *CONFIG_ARGS, f"output={out}"])
    assert "imported from caption_decoder.safetensors" in capsys.readouterr().out
    assert_bit_equal(checkpointing.load_parameters(out, abstract_params(tiny.cfg)), tiny.params)


@pytest.mark.parametrize("overrides", [["scan_layers=false"], ["contrastive_loss=sigmoid"]])
def test_round_trip_other_layouts(overrides, tmp_path):
    cfg = tiny_config(*TINY_EXPORT, *overrides)
    params = random_params(cfg, seed=4)
    if cfg.contrastive_loss == "sigmoid":
        params["b"] = np.float32(-7.5)
    write_export(params, cfg, tmp_path / "e")
    _, clip, decoder, _ = read_export(tmp_path / "e")
    assert_bit_equal(mapping.from_open_clip(clip, decoder, cfg), params)


def test_import_of_a_released_model_initialises_a_fresh_decoder(tiny, tmp_path, open_clip):
    import torch
    from safetensors.torch import load_file

    from openvision_max.export.import_open_clip import import_open_clip

    # A released OpenVision model: a PyTorch pickle, no decoder file, no config of ours.
    released = tmp_path / "released"
    shutil.copytree(tiny.export, released)
    torch.save(load_file(str(released / "open_clip_model.safetensors")), released / "open_clip_pytorch_model.bin")
    for name in ("open_clip_model.safetensors", DECODER_WEIGHTS, "openvision_max_config.yml"):
        (released / name).unlink()
    out, how = import_open_clip(released, tiny.cfg, tmp_path / "imported")
    assert how.startswith("freshly initialised (seed 0)")
    params = checkpointing.load_parameters(out, abstract_params(tiny.cfg))
    want = dict(tiny.params, decoder=jax.device_get(init_params(tiny.cfg, 0)["decoder"]))
    assert_bit_equal(params, want)


def test_load_model_reads_runs_checkpoints_steps_and_exports(tiny):
    import openvision_max

    images = np.random.default_rng(5).standard_normal((3, 32, 32, 3)).astype(np.float32)
    want = None
    for path in (tiny.run, tiny.run / "checkpoints", tiny.run / "checkpoints" / "7", tiny.export):
        model = openvision_max.load_model(path)
        assert model.tokenize(["a cat"]).dtype == np.int32
        got = model.encode_image(images)
        assert got.dtype == np.float32 and got.shape == (3, tiny.cfg.embed_dim)
        np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=1e-5)
        want = got if want is None else want
        np.testing.assert_array_equal(got, want)
    with pytest.raises(openvision_max.api.LoadError, match="is not a run directory"):
        openvision_max.load_model(tiny.run.parent)
    with pytest.raises(ValueError, match="normalised float images"):
        model.encode_image(np.zeros((1, 32, 32, 3), np.uint8))


def test_importing_the_package_does_not_import_jax():
    code = ("import sys, openvision_max; assert 'jax' not in sys.modules, 'jax imported';"
            "assert callable(openvision_max.load_model)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# --- Errors -----------------------------------------------------------------------------------------------


def run_cli(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return e.value.code, err


def test_export_of_parameters_that_do_not_fit_the_config(tiny, tmp_path, capsys):
    out = tmp_path / "e"
    code, err = run_cli(export_cli.main, [*CONFIG_ARGS, "vision.mlp_dim=128",
                                          f"load_parameters_path={tiny.run}", f"export_dir={out}"], capsys)
    assert code == 2
    assert "vision/transformer/blocks/mlp/fc1/kernel is (2, 32, 64), the model has (2, 32, 128)" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir()]


def test_export_input_errors(tiny, tmp_path, capsys):
    base = CONFIG_ARGS
    code, err = run_cli(export_cli.main, [*base, f"load_parameters_path={tmp_path}", f"export_dir={tmp_path / 'e'}"],
                        capsys)
    assert code == 2 and "no complete checkpoint at" in err
    code, err = run_cli(export_cli.main, [*base, f"load_parameters_path={tiny.run}"], capsys)
    assert code == 2 and "export_dir= is required" in err
    code, err = run_cli(export_cli.main, [*base, f"load_parameters_path={tiny.run}", f"export_dir={tiny.export}"],
                        capsys)
    assert code == 2 and "already exists and is not an empty directory" in err
    code, err = run_cli(export_cli.main, [*base, "export_dri=x"], capsys)
    assert code == 2 and "did you mean 'export_dir'" in err


def test_import_errors(tiny, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    from openvision_max.export import import_open_clip

    base = CONFIG_ARGS
    code, err = run_cli(import_open_clip.main, [str(tiny.export), *base, "vision.width=64",
                                                f"output={tmp_path / 'a'}"], capsys)
    assert code == 2 and "vision_cfg.width is 32, the config implies 64" in err
    broken = tmp_path / "broken"
    shutil.copytree(tiny.export, broken)
    state = load_file(str(broken / "open_clip_model.safetensors"))
    state["transformer.resblocks.1.mlp.c_fc.weight"] = state["transformer.resblocks.1.mlp.c_fc.weight"][:32]
    save_file(state, str(broken / "open_clip_model.safetensors"))
    code, err = run_cli(import_open_clip.main, [str(broken), *base, f"output={tmp_path / 'b'}"], capsys)
    assert code == 2
    assert "transformer.resblocks.1.mlp.c_fc.weight has shape [32, 32], the config expects [64, 32]" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_run_config_is_read_back_for_inference():
    """A multi-stage run's config.yml: the stage a checkpoint belongs to, on one CPU device, training-only
    settings (mesh, remat, GPU attention) replaced."""
    from openvision_max.config import config_to_dict, load_stages
    from openvision_max.config.run_config import inference_config, stage_of

    stages = load_stages([str(CONFIGS / "B16.yml"), "ici_fsdp_parallelism=8", "remat_policy=minimal_offloaded",
                          "attention=cudnn", "dataset_type=grain", "train_data=[/elsewhere/train]", "eval_only=true",
                          "evals=[{name: coco, type: retrieval, path: /elsewhere/coco.json}]"],
                         platform="gpu", num_devices=8)
    resolved = {"stages_resolved": [config_to_dict(c) for c in stages]}
    first_steps = stages[0].steps
    assert stage_of(resolved, first_steps)["image_size"] == 160
    assert stage_of(resolved, first_steps + 1)["image_size"] == 224
    assert stage_of(resolved, None)["image_size"] == 384
    cfg = inference_config(stage_of(resolved, first_steps + 1), dtype="bfloat16", platform="cpu")
    assert (cfg.image_size, cfg.dtype, cfg.attention, cfg.derived.num_devices) == (224, "bfloat16", "dot_product", 1)
    assert cfg.derived.vision_remat_policy == "none" and cfg.stages == [] and cfg.evals == []


def test_eval_transform_matches_torchvision_on_non_square_photos():
    """open_clip's `shortest` preprocessing (torchvision Resize + CenterCrop) sees our eval pixels exactly."""
    import io

    from PIL import Image
    from torchvision import transforms as T

    from openvision_max.data.transforms import eval_image

    from photo_data import photo_bytes
    for name in ("chelsea", "coffee", "rocket"):
        img = Image.open(io.BytesIO(photo_bytes(name, "PNG", max_side=500))).convert("RGB")
        assert img.width != img.height
        for size in (32, 224):
            ref = T.CenterCrop(size)(T.Resize(size, interpolation=T.InterpolationMode.BILINEAR)(img))
            np.testing.assert_array_equal(eval_image(img, size), np.asarray(ref))


# --- Paths as a user gives them ---------------------------------------------------------------------------


def test_relative_paths_from_another_working_directory(tiny, tmp_path, monkeypatch, capsys):
    """Relative load_parameters_path / export_dir (export CLI, eval_only) and load_model resolve against the
    working directory; the export needs no config file for a run directory, and accepts the run's config.yml;
    what it writes has the umask's modes; a path that does not exist is one line (CLI) or a LoadError (API)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    import openvision_max
    from openvision_max.data.records import Record, shard_name
    from openvision_max.training.main import main as train_main

    from photo_data import photo_bytes

    monkeypatch.chdir(tmp_path)
    run = os.path.relpath(tiny.run, tmp_path)  # "../.../run"
    export_cli.main([f"load_parameters_path={run}", "export_dir=from-run"])  # no config file
    export_cli.main([f"{run}/config.yml", f"load_parameters_path={run}/checkpoints", "export_dir=from-yml"])
    for name in ("from-run", "from-yml"):
        assert (tmp_path / name / WEIGHTS).read_bytes() == (tiny.export / WEIGHTS).read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "from-run").stat().st_mode & 0o777 == 0o777 & ~umask
    assert {f.stat().st_mode & 0o777 for f in (tmp_path / "from-run").iterdir()} == {0o666 & ~umask}

    model = openvision_max.load_model(run)
    assert model.embed_dim == tiny.cfg.embed_dim
    with pytest.raises(openvision_max.api.LoadError, match="nope is not a directory"):
        openvision_max.load_model("nope")

    (tmp_path / "val").mkdir()
    writer = ArrayRecordWriter(str(tmp_path / "val" / shard_name("val", 0, 1)), "group_size:1")
    for i, photo in enumerate(("chelsea", "coffee")):
        writer.write(Record(f"k{i}", photo_bytes(photo, "PNG", 64), label=i).encode())
    writer.close()
    evals = "evals=[{name: v, type: zeroshot, path: val, class_names: [cat, coffee]}]"
    train_main([*CONFIG_ARGS, "eval_only=true", f"load_parameters_path={run}", "base_output_directory=out",
                "run_name=ev", evals])
    assert f"run directory: {tmp_path / 'out' / 'ev'}" in capsys.readouterr().out
    assert "eval/v/top1" in (tmp_path / "out" / "ev" / "metrics.jsonl").read_text()

    code, err = run_cli(export_cli.main, [*CONFIG_ARGS, "load_parameters_path=nope", "export_dir=x"], capsys)
    assert code == 2 and f"{tmp_path / 'nope'} does not exist" in err
    code, err = run_cli(export_cli.main, ["load_parameters_path=nope", "export_dir=x"], capsys)
    assert code == 2 and "is not in a run directory" in err
    code, err = run_cli(train_main, [*CONFIG_ARGS, "eval_only=true", "load_parameters_path=nope", evals], capsys)
    assert code == 2 and "does not exist" in err
    assert not (tmp_path / "x").exists()
