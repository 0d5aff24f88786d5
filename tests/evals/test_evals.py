"""Zero-shot evaluation: the metric on known answers, eval_only reproducing a run's own figures, eval path errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from openvision_max.data.locate import DataError
from openvision_max.data.records import Record, shard_name
from openvision_max.evals import zeroshot

from conftest import CONFIGS, DEMO_CACHE, JAX_CACHE_ENV, ROOT, tiny_config
from photo_data import png


class ColourEncoder:
    """Embeds an image by its mean colour and a prompt by the colour word it names: known answers."""
    image_size = 8
    batch_size = 4
    COLOURS = {"red": [1, 0, 0], "green": [0, 1, 0], "blue": [0, 0, 1], "white": [1, 1, 1],
               "yellow": [1, 1, 0], "magenta": [1, 0, 1], "cyan": [0, 1, 1]}

    def embed_images(self, images):
        x = images.reshape(len(images), -1, 3).mean(axis=1)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def embed_texts(self, texts):
        x = np.array([next(v for k, v in self.COLOURS.items() if k in t) for t in texts], np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def solid(colour) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), tuple(int(255 * c) for c in colour)).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path, samples, broken=False):
    """A shard of solid-colour images: samples are (label, colour); `broken` adds an unreadable record."""
    from array_record.python.array_record_module import ArrayRecordWriter
    w = ArrayRecordWriter(str(path), "group_size:1")
    for i, (label, colour) in enumerate(samples):
        w.write(Record(f"k{i}", solid(colour), label=label).encode())
    if broken:
        w.write(Record("broken", b"not an image", label=0).encode())
    w.close()
    return str(path)


def test_zeroshot_top1_on_known_answers(tmp_path):
    classes = ["red", "green", "blue", "white"]
    # (true label, image colour): 3 right, 1 wrong (a green image labelled blue), plus an unreadable record.
    samples = [(0, [1, 0, 0]), (1, [0, 1, 0]), (2, [0, 1, 0]), (3, [1, 1, 1])]
    path = write_shard(tmp_path / shard_name("val", 0, 1), samples, broken=True)
    out = zeroshot.evaluate(ColourEncoder(), [path], classes, ["a {} thing.", "a photo of {}."])
    assert out == {"top1": 0.75, "examples": 4.0}  # 4 classes: no top5, it would be 1.0 for any model
    out2 = zeroshot.evaluate(ColourEncoder(), [path], classes, ["{}"], max_examples=2)
    assert out2["examples"] == 2.0 and out2["top1"] == 1.0


def test_top5_only_with_more_than_5_classes(tmp_path):
    three = write_shard(tmp_path / "three.array_record", [(0, [1, 0, 0]), (1, [0, 1, 0]), (2, [0, 1, 0])])
    assert zeroshot.evaluate(ColourEncoder(), [three], ["red", "green", "blue"]) == {"top1": 2 / 3,
                                                                                     "examples": 3.0}
    # Seven classes. An orange image [1, .5, 0] ranks yellow, red, white, magenta, green, cyan, blue (no ties):
    # labelled green it is a top-5 hit only, labelled blue a miss.
    orange = [1, 0.5, 0]
    seven = write_shard(tmp_path / "seven.array_record",
                        [(0, [1, 0, 0]), (1, orange), (2, orange), (3, [1, 1, 1])])
    classes = ["red", "green", "blue", "white", "yellow", "magenta", "cyan"]
    assert zeroshot.evaluate(ColourEncoder(), [seven], classes) == {"top1": 0.5, "top5": 0.75, "examples": 4.0}


def test_class_embeddings_average_templates_and_renormalise():
    class Fixed:
        def embed_texts(self, texts):
            return np.array([[1.0, 0.0] if "a" in t.split()[0] else [0.0, 1.0] for t in texts], np.float32)
    emb = zeroshot.class_embeddings(Fixed(), ["x", "y"], ["a {}", "the {}"])
    np.testing.assert_allclose(emb, np.full((2, 2), 2 ** -0.5), rtol=1e-6)


def test_eval_only_reproduces_the_runs_own_zero_shot_figures(tmp_path):
    """A short demo run evaluates at its end; eval_only on its checkpoint must give the same figures."""
    common = [f"base_output_directory={tmp_path}", f"data_cache_dir={DEMO_CACHE}",
              "global_batch_size=16", "eval_batch_size=32"]
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", **JAX_CACHE_ENV}
    train = subprocess.run([sys.executable, str(ROOT / "train.py"), str(CONFIGS / "demo.yml"), "run_name=run",
                            "steps=3", "log_period=1", "grain_worker_count=0", *common],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    ev = subprocess.run([sys.executable, str(ROOT / "train.py"), str(CONFIGS / "demo.yml"), "run_name=ev",
                         "eval_only=true", f"load_parameters_path={tmp_path / 'run'}", *common],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]

    def evals(run):
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {k: v for r in rows for k, v in r.items() if k.startswith("eval/") and not k.endswith("seconds")}
    trained, evaluated = evals("run"), evals("ev")
    assert set(trained) >= {"eval/shapes/top1", "eval/shapes/top5", "eval/digits/top1", "eval/digits/top5"}
    assert trained == evaluated
    assert trained["eval/shapes/examples"] == 1000 and trained["eval/digits/examples"] == 500

    # eval_only on a COCO-format folder of real photos with hand-written captions: all six recalls.
    annotations, image_dir = coco_folder(tmp_path / "coco")
    spec = f"[{{name: coco, type: retrieval, format: coco, path: {annotations}, image_dir: {image_dir}}}]"
    ret = subprocess.run([sys.executable, str(ROOT / "train.py"), str(CONFIGS / "demo.yml"), "run_name=coco",
                          "eval_only=true", f"load_parameters_path={tmp_path / 'run'}", f"evals={spec}", *common],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert ret.returncode == 0, ret.stderr[-3000:]
    recalls = evals("coco")
    names = [f"eval/coco/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    # 6 images: a caption has 5 wrong images, so its R@10 would be 1.0 for any model and is left out.
    assert set(names) - set(recalls) == {"eval/coco/t2i_r10"}
    r = [recalls[f"eval/coco/i2t_r{k}"] for k in (1, 5, 10)]
    assert 0 <= r[0] <= r[1] <= r[2] <= 1
    assert 0 <= recalls["eval/coco/t2i_r1"] <= recalls["eval/coco/t2i_r5"] <= 1


CAPTIONS = {
    "astronaut": ["a woman astronaut in an orange suit", "an astronaut smiling in front of a flag"],
    "chelsea": ["a tabby cat looking to the side", "close up of a striped cat"],
    "coffee": ["a cup of coffee on a saucer", "a white coffee cup on a red table"],
    "rocket": ["a rocket on the launch pad", "a space rocket under a blue sky"],
    "camera": ["a man with a camera on a tripod", "black and white photo of a photographer"],
    "horse": ["the silhouette of a horse", "a black horse shape on white"],
}


def coco_folder(root):
    from photo_data import photo_bytes
    images = root / "val2017"
    images.mkdir(parents=True)
    data = {"images": [], "annotations": []}
    for i, (name, caps) in enumerate(CAPTIONS.items()):
        (images / f"{i:012d}.jpg").write_bytes(photo_bytes(name, "JPEG"))
        data["images"].append({"id": 100 + i, "file_name": f"{i:012d}.jpg"})
        data["annotations"] += [{"id": 1000 + 10 * i + j, "image_id": 100 + i, "caption": c}
                                for j, c in enumerate(caps)]
    annotations = root / "captions_val2017.json"
    annotations.write_text(json.dumps(data))
    return annotations, images


def test_imagenet_names_and_templates_ship_with_the_package(tmp_path):
    from openvision_max.evals.runner import EvalRunner
    (tmp_path / "val").mkdir()
    write = __import__("array_record.python.array_record_module", fromlist=["x"]).ArrayRecordWriter
    w = write(str(tmp_path / "val" / shard_name("val", 0, 1)), "group_size:1")
    w.write(Record("k", png(0), label=0).encode())
    w.close()
    cfg = tiny_config(f"evals=[{{name: in1k, type: zeroshot, path: {tmp_path / 'val'}, class_names: imagenet, "
                      "templates: imagenet}]")
    ev = EvalRunner(cfg).evals[0]
    assert len(ev.class_names) == 1000 and ev.class_names[0] == "tench"
    assert len(ev.templates) == 81 and "{}" in ev.templates


def eval_entry(path, extra=""):
    """The `evals=` override of one zero-shot eval named typo."""
    return f"evals=[{{name: typo, type: zeroshot, path: '{path}'{extra}}}]"


@pytest.mark.parametrize("path, extra, message", [
    ("nope", "", "eval typo: path {tmp}/nope does not exist"),
    ("val.array_record", ", class_names: [a, b]", "eval typo: path {tmp}/val.array_record does not exist"),
    ("val-*.array_record", "", "eval typo: path pattern {tmp}/val-*.array_record matches nothing"),
])
def test_a_missing_eval_path_says_so(tmp_path, path, extra, message):
    from openvision_max.evals.runner import EvalRunner
    cfg = tiny_config(eval_entry(tmp_path / path, extra))
    with pytest.raises(DataError) as e:
        EvalRunner(cfg)
    assert str(e.value) == message.format(tmp=tmp_path)


def test_a_dataset_without_classes_still_asks_for_class_names(tmp_path):
    from openvision_max.evals.runner import EvalRunner
    write_shard(tmp_path / shard_name("val", 0, 1), [(0, [1, 0, 0])])  # a shard, no dataset.json
    with pytest.raises(DataError, match="lists no classes in dataset.json; give class_names"):
        EvalRunner(tiny_config(eval_entry(tmp_path)))


def test_cli_exits_2_with_one_line_on_a_missing_eval_path(tmp_path):
    """Caught in preflight: no run directory is made and nothing is compiled."""
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), str(CONFIGS / "demo.yml"),
                           "dataset_type=synthetic", f"base_output_directory={tmp_path / 'runs'}",
                           eval_entry(tmp_path / "nope")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", **JAX_CACHE_ENV})
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [f"train.py: data error: eval typo: path {tmp_path / 'nope'} does not exist"], proc.stderr
    assert not (tmp_path / "runs").exists()
