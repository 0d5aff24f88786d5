"""The embedded demo datasets (openvision_max.data.demo_data): contents, determinism, caching, publishing."""

import hashlib
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from openvision_max.data import demo_data, demo_digits, demo_shapes
from openvision_max.data.records import DatasetInfo, Record
from openvision_max.data.tokenizer import sub_captions

SMALL = {"shapes_train": 400, "shapes_test_per_class": 3}


def read(directory):
    import grain

    info = DatasetInfo.read(directory)
    source = grain.sources.ArrayRecordDataSource([str(directory / s) for s in info.shards])
    return info, [Record.decode(source[i]) for i in range(len(source))]


def shard_digests(paths):
    return {name: [hashlib.sha256((p / s).read_bytes()).hexdigest() for s in DatasetInfo.read(p).shards]
            for name, p in paths.items()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_data.ensure_demo_data(tmp_path_factory.mktemp("demo"), **SMALL)


def test_shapes_test_classes_labels_captions(demo):
    info, records = read(demo["shapes_test"])
    assert len(info.classes) == 20 and info.classes[0] == "red circle" and len(set(info.classes)) == 20
    assert info.templates == demo_shapes.TEMPLATES and all(t.count("{}") == 1 for t in info.templates)
    assert info.num_records == len(records) == 20 * 3
    assert np.bincount([r.label for r in records]).tolist() == [3] * 20
    for r in records:
        colour, kind = info.classes[r.label].split()
        # "a red circle", "a small red circle" or "a red circle on a ... background": the class name itself
        assert f"{colour} {kind}" in r.text("alt_text"), r.text("alt_text")
        assert f"{colour} {kind}" in sub_captions(r.text("recaption"))[0]
        image = Image.open(io.BytesIO(r.image))
        assert (image.format, image.size, image.mode) == ("PNG", (64, 64), "RGB")


def test_shapes_train_scenes(demo):
    info, records = read(demo["shapes_train"])
    assert (info.num_records, info.classes, len(records)) == (400, [], 400)
    assert all(r.label == -1 for r in records)
    numbers = re.compile(r"\b(two|three)\b")
    single = [r for r in records if not numbers.search(r.text("alt_text")) and " and " not in r.text("alt_text")]
    assert 0.35 < len(single) / len(records) < 0.65  # plenty of one-shape scenes for zero-shot prompts
    names = [f"{c} {k}" for c in demo_shapes.COLOURS for k in demo_shapes.KINDS]
    assert sum(r.text("alt_text") in {f"a {n}" for n in names} for r in records) > 50  # the bare prompt form
    for r in records:
        sentences = sub_captions(r.text("recaption"))
        assert len(sentences) >= 3 and all(len(s.split()) >= 4 for s in sentences), sentences
        # Every sentence (each a possible sub-caption) names a coloured shape, not just the background.
        for sentence in sentences:
            assert any(f"{c} {k}" in sentence for c in demo_shapes.COLOURS for k in demo_shapes.KINDS), sentence


def test_digits(demo):
    train_info, train = read(demo["digits_train"])
    test_info, test = read(demo["digits_test"])
    assert (len(train), len(test)) == (1297, 500)
    assert test_info.classes == train_info.classes == ["zero", "one", "two", "three", "four", "five", "six",
                                                       "seven", "eight", "nine"]
    assert test_info.templates == demo_digits.TEMPLATES
    counts = np.bincount([r.label for r in test], minlength=10)
    assert counts.min() >= 48 and counts.max() <= 51  # stratified
    for r in train[:200] + test:
        word = test_info.classes[r.label]
        assert word in re.findall(r"[a-z]+", r.text("alt_text"))
        assert sub_captions(r.text("recaption"))[0] == f"A handwritten digit {word}"
    # The held-out images are not among the training images.
    train_images = {r.image for r in train}
    assert not any(r.image in train_images for r in test)


def test_deterministic_and_cached(demo, tmp_path, capsys):
    again = demo_data.ensure_demo_data(tmp_path / "again", **SMALL)
    assert shard_digests(again) == shard_digests(demo)

    mtimes = {n: (p / "dataset.json").stat().st_mtime_ns for n, p in again.items()}
    assert demo_data.main(["--output", str(tmp_path / "again"), "--shapes-train", "400",
                           "--shapes-test-per-class", "3"]) == 0
    assert json.loads(capsys.readouterr().out) == {"written": 400 + 60 + 1297 + 500, "skipped": {}}
    assert {n: (p / "dataset.json").stat().st_mtime_ns for n, p in again.items()} == mtimes  # nothing rebuilt

    # Asking for another size rebuilds that set only.
    demo_data.ensure_demo_data(tmp_path / "again", shapes_train=50, shapes_test_per_class=3)
    assert DatasetInfo.read(again["shapes_train"]).num_records == 50
    assert (again["digits_test"] / "dataset.json").stat().st_mtime_ns == mtimes["digits_test"]
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == sorted(again)  # no temp dirs left


def test_publish_racer_and_stale(tmp_path):
    def fake_set(name, source_format):
        d = tmp_path / name
        d.mkdir()
        DatasetInfo(source_format=source_format).write(d)
        return d

    final = tmp_path / "set"
    demo_data._publish(fake_set("a", "v/x"), final)  # first: moved into place
    assert DatasetInfo.read(final).source_format == "v/x"
    racer = fake_set("b", "v/x")
    demo_data._publish(racer, final)  # a racer's identical set: the one in place wins, racer left to delete
    assert racer.exists() and DatasetInfo.read(final).source_format == "v/x"
    demo_data._publish(fake_set("c", "v/y"), final)  # stale set replaced
    assert DatasetInfo.read(final).source_format == "v/y"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "set"]
