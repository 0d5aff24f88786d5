"""The grain input pipeline: formats, determinism across restarts and hosts, bad records."""

import json
import subprocess
import sys

import numpy as np
import pytest

from openvision_max.data import tokenizer as tk

from conftest import JAX_CACHE_ENV, ROOT, tiny_config
from photo_data import write_dataset

N_RECORDS = 24
BAD = {"k-bad-image": "undecodable_image", "k-empty": "empty_caption", "k-utf8": "non_utf8_text"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("grain") / "ds"
    write_dataset(d)
    return d


def pipeline(dataset, *overrides, process_index=0, process_count=1, batch=4):
    from openvision_max.data.grain_pipeline import GrainIterator
    from openvision_max.mesh.sharding import create_mesh
    cfg = tiny_config("dataset_type=grain", f"train_data=[{dataset}]", f"global_batch_size={batch}",
                      "text.context_length=80", "decoder.caption_length=32", "grain_worker_count=0",
                      "grain_read_threads=2", *overrides)
    return GrainIterator(cfg, create_mesh(cfg), process_index=process_index, process_count=process_count)


def test_batches_have_the_contract_shapes_and_token_formats(dataset):
    it = pipeline(dataset)
    batch = next(it)
    assert batch["images"].shape == (4, 32, 32, 3) and batch["images"].dtype == np.uint8
    texts = np.asarray(batch["texts"])
    assert texts.shape == (8, 80) and texts.dtype == np.int32
    assert (texts[:, 0] == tk.BOS_ID).all() and (texts[:, -1] == tk.CLS_ID).all()
    targets, mask = np.asarray(batch["caption_targets"]), np.asarray(batch["caption_mask"])
    assert targets.shape == mask.shape == (4, 32)
    # Row i of the first half is image i's alt-text; the second half its sub-caption (one sentence).
    tok = tk.Tokenizer()
    keys = it.last_keys
    alt = tok.encoder_ids([f"a picture number {int(k[1:])}" for k in keys], 80)
    np.testing.assert_array_equal(texts[:4], alt)
    for i, k in enumerate(keys):
        options = tok.encoder_ids(tk.sub_captions(f"A noisy picture. It has number {int(k[1:])}! The end."), 80)
        assert any((texts[4 + i] == o).all() for o in options)
        full, full_mask = tok.decoder_targets([f"A noisy picture. It has number {int(k[1:])}! The end."], 32)
        np.testing.assert_array_equal(targets[i], full[0])
        np.testing.assert_array_equal(mask[i], full_mask[0])
    it.close()


def keys_over(it, steps: int) -> list[str]:
    out = []
    for _ in range(steps):
        next(it)
        out += it.last_keys
    return out


def test_epochs_cover_every_record_once_and_reshuffle(dataset):
    it = pipeline(dataset)
    seen = keys_over(it, 3 * N_RECORDS // 4)
    epochs = [seen[i * N_RECORDS:(i + 1) * N_RECORDS] for i in range(3)]
    for e in epochs:
        assert sorted(e) == sorted(f"k{i:03d}" for i in range(N_RECORDS))
    assert epochs[0] != epochs[1] != epochs[2]
    it.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_run_sees_the_same_records(dataset, workers):
    steps = 3 * N_RECORDS // 4  # 3 epochs of 4-record batches
    full = pipeline(dataset, f"grain_worker_count={workers}")
    expected = keys_over(full, steps)
    expected_last = np.asarray(next(full)["images"])
    full.close()
    first = pipeline(dataset, f"grain_worker_count={workers}")
    seen = keys_over(first, 7)
    state = json.loads(json.dumps(first.get_state()))  # as it travels in checkpoint metadata
    first.close()
    resumed = pipeline(dataset, f"grain_worker_count={workers}")
    resumed.set_state(state)
    seen += keys_over(resumed, steps - 7)
    assert seen == expected
    # Same augmentation too: it is seeded by (seed, record, epoch).
    np.testing.assert_array_equal(np.asarray(next(resumed)["images"]), expected_last)
    resumed.close()


def test_two_hosts_read_disjoint_records_covering_the_epoch(dataset):
    hosts = [pipeline(dataset, process_index=i, process_count=2, batch=4) for i in range(2)]
    # Each host makes 2 of the 4 examples of a global batch: one epoch = 6 batches.
    seen = [[] for _ in hosts]
    for h, it in enumerate(hosts):
        for _ in range(N_RECORDS // 4):
            seen[h] += [e["key"] for e in it.host_examples()]
        it.close()
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"k{i:03d}" for i in range(N_RECORDS))


def test_bad_records_are_skipped_and_counted(tmp_path):
    d = tmp_path / "bad"
    write_dataset(d, n=9, shards=1, bad=True)
    it = pipeline(d, batch=3)
    keys = keys_over(it, 3)  # 9 good records: one epoch
    assert sorted(keys) == sorted(f"k{i:03d}" for i in range(9))
    assert it.metrics() == {f"data/skipped_{r}": 1.0 for r in BAD.values()}
    it.close()


def run_train(*args):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), str(ROOT / "configs/demo.yml"), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", **JAX_CACHE_ENV})


@pytest.mark.parametrize("data,message", [
    ("[/nonexistent/shards-*.array_record]", "no files match /nonexistent/shards-*.array_record"),
    ("[{bad}]", "cannot open shard {bad}"),
])
def test_bad_paths_fail_before_training_with_one_line(tmp_path, data, message):
    bad = tmp_path / "broken.array_record"
    bad.write_bytes(b"this is not an array record file")
    r = run_train("dataset_type=grain", "train_data=" + data.format(bad=bad), f"base_output_directory={tmp_path}",
                  "evals=[]")
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and message.format(bad=bad) in lines[0], r.stderr
    assert "step " not in r.stdout


def test_converted_photo_webdataset_reads_back_through_the_pipeline(tmp_path, capsys):
    from openvision_max.data import convert

    from photo_data import SKIPPED, make_photo_webdataset
    tar, expected = make_photo_webdataset(tmp_path)
    assert convert.main(["--format", "webdataset", "--input", str(tar), "--output", str(tmp_path / "out"),
                         "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report == {"written": len(expected), "skipped": SKIPPED}
    it = pipeline(tmp_path / "out", "image_size=64", batch=len(expected))
    batch = next(it)
    assert sorted(it.last_keys) == sorted(expected)
    assert batch["images"].shape == (len(expected), 64, 64, 3) and batch["images"].dtype == np.uint8
    assert np.asarray(batch["images"]).std() > 10  # real pixels, not a blank canvas
    texts = np.asarray(batch["texts"])
    assert texts.shape == (2 * len(expected), 80) and texts.dtype == np.int32
    tok = tk.Tokenizer()
    np.testing.assert_array_equal(texts[:len(expected)],
                                  tok.encoder_ids([expected[k]["alt_text"] for k in it.last_keys], 80))
    targets, mask = tok.decoder_targets([expected[k]["recaption"] for k in it.last_keys], 32)
    np.testing.assert_array_equal(np.asarray(batch["caption_targets"]), targets)
    np.testing.assert_array_equal(np.asarray(batch["caption_mask"]), mask)
    it.close()


def test_a_bucket_pattern_says_to_mount_it():
    from openvision_max.data import locate
    with pytest.raises(locate.DataError, match=r"gs://b/train-\*.array_record: shards are read from local paths; "
                                               "for a bucket, mount it with GCS FUSE"):
        locate.resolve(["gs://b/train-*.array_record"], "")
