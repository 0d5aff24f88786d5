"""Retrieval Recall@K: hand-built cases with known ranks, a brute-force reference, the loaders end to end."""

import json

import jax
import numpy as np
import pytest

from openvision_max.evals import retrieval

from conftest import tiny_config

N, CAPTIONS = 12, 5  # images, captions per image (caption j belongs to image j // 5)


def embeddings(sims):
    """Unit-norm embeddings whose image-text similarities are exactly `sims` [N, M]: images are one-hot,
    text j is column j of `sims` plus a last coordinate that fills its norm to 1."""
    n, m = sims.shape
    images = np.eye(n, n + 1, dtype=np.float32)
    texts = np.zeros((m, n + 1), np.float32)
    texts[:, :n] = sims.T
    texts[:, n] = np.sqrt(1 - (sims ** 2).sum(0))
    return images, texts


OWNER = np.repeat(np.arange(N), CAPTIONS)


def test_text_to_image_ranks_built_in():
    """Caption 0 of each image scores 0.9 with it, captions 1-4 score 0.5 and are beaten by 1, 4, 6 and 11
    other images at 0.6 (background 0.1). Text->image ranks per image are 0, 1, 4, 6, 11; every image's
    best caption (0.9) beats all wrong ones, so image->text is perfect. (Values scaled by 0.1.)"""
    sims = np.full((N, N * CAPTIONS), 0.1)
    beaten_by = [0, 1, 4, 6, 11]
    for j in range(N * CAPTIONS):
        c, k = divmod(j, CAPTIONS)
        sims[c, j] = 0.9 if k == 0 else 0.5
        for d in range(1, beaten_by[k] + 1):
            sims[(c + d) % N, j] = 0.6
    got = retrieval.recalls(*embeddings(sims * 0.1), OWNER)
    assert got == {"i2t_r1": 1.0, "i2t_r5": 1.0, "i2t_r10": 1.0, "t2i_r1": 0.2, "t2i_r5": 0.6, "t2i_r10": 0.8}


def test_image_to_text_ranks_built_in():
    """Image i's captions all score s_i = 0.3 + 0.05 i with it; image i also scores s_i + 0.01 with 11 - i
    captions of stronger images, which still lose those captions' own text->image ranking (s_i + 0.01 is below
    their s). Image->text ranks are 11, 10, ..., 0; text->image is perfect."""
    s = 0.3 + 0.05 * np.arange(N)
    sims = np.full((N, N * CAPTIONS), 0.1)
    for j in range(N * CAPTIONS):
        sims[OWNER[j], j] = s[OWNER[j]]
    for i in range(N):
        stronger = np.flatnonzero(OWNER > i)[:N - 1 - i]
        sims[i, stronger] = s[i] + 0.01
    got = retrieval.recalls(*embeddings(sims * 0.1), OWNER, block=5)  # several blocks, the last one padded
    assert got == pytest.approx({"i2t_r1": 1 / 12, "i2t_r5": 5 / 12, "i2t_r10": 10 / 12,
                                 "t2i_r1": 1.0, "t2i_r5": 1.0, "t2i_r10": 1.0}, abs=0)


def test_ties_count_against_the_model():
    collapsed = np.ones((N, 8), np.float32) / np.sqrt(8)
    got = retrieval.recalls(collapsed, np.ones((N * CAPTIONS, 8), np.float32) / np.sqrt(8), OWNER)
    assert set(got.values()) == {0.0}


def test_recall_at_k_only_where_a_query_can_miss():
    """6 images x 2 captions: an image has 10 wrong captions (R@10 can miss), a caption 5 wrong images (R@10
    cannot). All similarities tie, so every rank is its worst and each reported recall is 0."""
    owner = np.repeat(np.arange(6), 2)
    got = retrieval.recalls(*embeddings(np.full((6, 12), 0.05)), owner)
    assert got == dict.fromkeys(["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5"], 0.0)


def brute_force(image_emb, text_emb, owner, k):
    """Independent reference: full similarity matrix, sort, position of the first correct item."""
    sims = image_emb @ text_emb.T
    i2t = [np.flatnonzero(owner[np.argsort(-sims[i], kind="stable")] == i)[0] < k for i in range(len(sims))]
    t2i = [np.flatnonzero(np.argsort(-sims[:, j], kind="stable") == owner[j])[0] < k for j in range(len(owner))]
    return float(np.mean(i2t)), float(np.mean(t2i))


@pytest.mark.parametrize("block", [7, 64, 4096])
def test_random_embeddings_match_brute_force(block):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((40, 16)).astype(np.float32)
    owner = np.concatenate([np.arange(40), rng.integers(0, 40, 97)]).astype(np.int32)
    texts = images[owner] + 1.5 * rng.standard_normal((len(owner), 16)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    got = retrieval.recalls(images, texts, owner, ks=(1, 5, 10), block=block)
    for k in (1, 5, 10):
        assert (got[f"i2t_r{k}"], got[f"t2i_r{k}"]) == pytest.approx(brute_force(images, texts, owner, k), abs=1e-12)
    assert 0 < got["i2t_r1"] <= got["i2t_r5"] <= got["i2t_r10"] < 1
    assert 0 < got["t2i_r1"] <= got["t2i_r5"] <= got["t2i_r10"] < 1


def test_bad_inputs():
    images, texts = embeddings(np.full((N, N * CAPTIONS), 0.01))
    with pytest.raises(ValueError, match="images have no caption"):
        retrieval.recalls(images, texts, np.minimum(OWNER, N - 2))
    with pytest.raises(ValueError, match="must lie in"):
        retrieval.recalls(images, texts, OWNER + 1)


# --- Loaders and evaluate() on real photos ----------------------------------------------------------------

PHOTOS = {  # scikit-image sample photo -> hand-written captions
    "astronaut": ["an astronaut in a white space suit", "a woman astronaut posing with a flag",
                  "portrait of an astronaut"],
    "chelsea": ["a ginger cat looking to the side", "a tabby cat"],
    "coffee": ["a cup of coffee on a saucer", "coffee with a spoon, seen from above", "a red cup of coffee"],
    "rocket": ["a rocket on the launch pad", "a space shuttle before launch"],
    "camera": ["a man with a camera on a tripod", "black and white photo of a cameraman"],
}


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    import skimage.data
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    (root / "val2014").mkdir()
    for name in PHOTOS:
        Image.fromarray(getattr(skimage.data, name)()).save(root / "val2014" / f"{name}.jpg", quality=90)
    return root


def test_coco_captions_loader(photo_dir, tmp_path):
    names = list(PHOTOS)
    data = {"images": [{"id": 100 + i, "file_name": f"{n}.jpg"} for i, n in enumerate(names)],
            "annotations": [{"id": k, "image_id": 100 + names.index(n), "caption": c + " "}
                            for k, (n, c) in enumerate((n, c) for n in reversed(names) for c in PHOTOS[n])]}
    (tmp_path / "captions_val2017.json").write_text(json.dumps(data))
    ds = retrieval.load_coco_captions(tmp_path / "captions_val2017.json", photo_dir / "val2014")
    assert [p.name for p in ds.image_paths] == [f"{n}.jpg" for n in names]  # the images' order
    # Captions grouped by image (annotations listed them image by image in reverse), each stripped.
    assert ds.captions == [c for n in names for c in PHOTOS[n]]
    np.testing.assert_array_equal(ds.caption_image, [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4])


def karpathy_json(tmp_path, filepath):
    images = [{"filename": f"{n}.jpg", "split": "test", "sentences": [{"raw": c, "tokens": c.split()} for c in caps]}
              for n, caps in PHOTOS.items()]
    images.insert(2, {"filename": "missing.jpg", "split": "train", "sentences": [{"raw": "not in test"}]})
    for im in images:
        if filepath:
            im["filepath"] = filepath
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"dataset": "coco" if filepath else "flickr30k", "images": images}))
    return path


def test_karpathy_loader_coco_and_flickr_layouts(photo_dir, tmp_path):
    coco = retrieval.load_karpathy(karpathy_json(tmp_path, "val2014"), photo_dir)
    flickr = retrieval.load_karpathy(karpathy_json(tmp_path, None), photo_dir / "val2014", max_images=3)
    assert coco.name == "coco_test" and flickr.name == "flickr30k_test"
    assert all(p.is_file() for p in coco.image_paths) and len(coco.image_paths) == 5
    assert coco.captions == [c for caps in PHOTOS.values() for c in caps]
    np.testing.assert_array_equal(coco.caption_image, [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4])
    assert [p.name for p in flickr.image_paths] == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg"]
    assert len(flickr.captions) == 8


def test_evaluate_end_to_end_with_a_random_tiny_model(photo_dir, tmp_path):
    from openvision_max.evals.encoder import Encoder
    from openvision_max.training.params import abstract_params

    cfg = tiny_config("vocab_size=32000", "text.context_length=80")  # real BERT ids need the full vocabulary
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.2).astype(np.float32), abstract_params(cfg))
    ds = retrieval.load_karpathy(karpathy_json(tmp_path, "val2014"), photo_dir)
    got = retrieval.evaluate(Encoder(cfg, params, batch_size=4), ds, workers=2)
    # 5 images: a caption has 4 wrong images, so its R@5 and R@10 would be 1.0 for any model: left out.
    assert list(got) == ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1"]
    assert all(0 <= v <= 1 for v in got.values())
    assert got["i2t_r1"] <= got["i2t_r5"] <= got["i2t_r10"]
    for k in (1, 5, 10):  # fractions of the 5 image queries
        assert round(got[f"i2t_r{k}"] * 5, 6) % 1 == 0
    assert round(got["t2i_r1"] * 12, 6) % 1 == 0  # and of the 12 caption queries
