"""The dataset converters: webdataset, table and imagefolder into ArrayRecord shards (openvision_max.data.convert)."""

import hashlib
import io
import json
import os
import pathlib
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
from array_record.python.array_record_module import ArrayRecordReader

from openvision_max.data import convert
from openvision_max.data.records import DatasetInfo, Record

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from photo_data import SKIPPED, make_photo_webdataset, photo_bytes, png  # noqa: E402


def run(capsys, *argv):
    """main() in-process; returns (exit status, the JSON report or None, stderr)."""
    try:
        status = convert.main([*map(str, argv), "--quiet"])
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return status, json.loads(lines[-1]) if lines else None, err


def read_dataset(directory: pathlib.Path) -> tuple[DatasetInfo, list[Record]]:
    import grain

    info = DatasetInfo.read(directory)
    source = grain.sources.ArrayRecordDataSource([str(directory / s) for s in info.shards])
    return info, [Record.decode(source[i]) for i in range(len(source))]


def digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_webdataset_photos(tmp_path, capsys):
    tar, expected = make_photo_webdataset(tmp_path)
    status, report, _ = run(capsys, "--format", "webdataset", "--input", tmp_path / "*.tar",
                            "--output", tmp_path / "out")
    assert status == 0
    assert report == {"written": 6, "skipped": SKIPPED}
    info, records = read_dataset(tmp_path / "out")
    assert (info.source_format, info.num_records, info.skipped) == ("webdataset", 6, SKIPPED)
    assert info.shards == ["data-00000-of-00001.array_record"]
    assert info.recaption_fallbacks == 1  # the horse has no .json
    assert [r.key for r in records] == sorted(expected)  # order of first appearance in the tar
    for r in records:
        want = expected[r.key]
        assert r.image == want["image"]  # stored as is, not re-encoded
        assert (r.text("alt_text"), r.text("recaption"), r.label) == (want["alt_text"], want["recaption"], -1)
    # The out-of-order sample (chelsea, PNG) kept its recaption from the .json that came later in the tar.
    assert records[1].text("recaption").startswith("A close-up of a tabby cat")
    # Exactly the ArrayRecord options grain wants: one record per chunk.
    assert "group_size:1," in ArrayRecordReader(str(tmp_path / "out" / info.shards[0])).writer_options_string()


def test_webdataset_resume(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    for i in range(3):
        make_photo_webdataset(tmp_path / "in", name=f"part-{i}.tar", key_prefix=f"p{i}-")
    out = tmp_path / "out"
    argv = ["--format", "webdataset", "--input", tmp_path / "in" / "part-*.tar", "--output", out]
    status, report, err = run(capsys, *argv, "--workers", "2")  # the process-pool path
    total = {"written": 18, "skipped": {k: 3 * v for k, v in SKIPPED.items()}}
    assert (status, report, err) == (0, total, "")
    shards = [out / f"data-{i:05d}-of-00003.array_record" for i in range(3)]
    before = {s: (s.stat().st_mtime_ns, digest(s)) for s in shards}

    status, report, err = run(capsys, *argv)  # finished: nothing redone, and it says so
    assert (status, report, err) == (0, total, "up to date: 3 shards reused\n")
    assert {s: (s.stat().st_mtime_ns, digest(s)) for s in shards} == before

    shards[1].unlink()  # as if the run had died before finishing shard 1
    (out / ".data-00001-of-00003.array_record.partial-999999").write_bytes(b"half a shard")  # a killed run's
    os.utime(shards[0], ns=(1, 1))  # an old mtime makes any rewrite of shard 0 visible
    status, report, err = run(capsys, *argv)
    assert (status, report) == (0, total)  # totals include the shards that were not rewritten
    assert err == "resumed: 2 shards reused, 1 converted\n"
    assert shards[0].stat().st_mtime_ns == 1 and shards[2].stat().st_mtime_ns == before[shards[2]][0]
    assert digest(shards[1]) == before[shards[1]][1]  # rewritten identically
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary files left
    assert DatasetInfo.read(out).num_records == 18


def test_webdataset_truncated_and_bad_members(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    tar, _ = make_photo_webdataset(tmp_path / "src")
    data = tar.read_bytes()
    with tarfile.open(tar) as t:
        rocket = t.getmember("000000003.jpg")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: rocket.offset_data + rocket.size // 2])  # ends inside the rocket's JPEG
    status, report, _ = run(capsys, "--format", "webdataset", "--input", cut, "--output", tmp_path / "cut")
    assert (status, report) == (0, {"written": 3, "skipped": {"truncated_member": 1}})
    assert [r.key for r in read_dataset(tmp_path / "cut")[1]] == ["000000000", "000000001", "000000002"]

    odd = tmp_path / "odd.tar"
    image = photo_bytes("coffee", "JPEG", 48)
    with tarfile.open(odd, "w") as t:
        for name, payload in [("a.jpg", image), ("a.txt", b"ok"), ("a.json", b"{not json"),
                              ("b.jpg", image), ("b.txt", b"caf\xe9"),
                              ("c.txt", b"no image"),
                              ("d.webp", image), ("d.json", b'{"re_caption": "x"}'),
                              ("e.jpg", image), ("e.txt", b"fine"), ("e.json", b'{"llava": "long text."}')]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))
    status, report, _ = run(capsys, "--format", "webdataset", "--input", odd, "--output", tmp_path / "odd",
                            "--recaption-field", "llava")
    assert (status, report) == (0, {"written": 1, "skipped": {"bad_json": 1, "missing_caption": 1,
                                                              "missing_image": 1, "non_utf8_text": 1}})
    [record] = read_dataset(tmp_path / "odd")[1]
    assert (record.key, record.recaption) == ("e", b"long text.")


def _table_rows(tmp_path):
    """Six rows: four good (relative path, absolute path), one missing file, one blank alt-text."""
    (tmp_path / "img").mkdir()
    photos = {name: photo_bytes(name, "JPEG", 64) for name in ("astronaut", "chelsea", "coffee", "rocket")}
    for name, data in photos.items():
        (tmp_path / "img" / f"{name}.jpg").write_bytes(data)
    rows = [(f"img/{n}.jpg", f"a photo of {n}", f"A photo. It shows {n}.") for n in photos]
    rows[1] = (str(tmp_path / "img" / "chelsea.jpg"), rows[1][1], "")  # absolute path; blank recaption
    rows += [("img/nowhere.jpg", "lost", "Lost."), ("img/coffee.jpg", " ", "Blank alt-text.")]
    return photos, rows


def test_table_csv_paths(tmp_path, capsys):
    photos, rows = _table_rows(tmp_path)
    lines = ["path,caption,long_caption"] + [",".join(r) for r in rows]
    (tmp_path / "pairs.csv").write_bytes(("\n".join(lines) + "\n").encode() + b"img/rocket.jpg,bad \xff byte,x\n")
    status, report, _ = run(capsys, "--format", "table", "--input", tmp_path / "pairs.csv", "--output",
                            tmp_path / "out", "--image-column", "path", "--alt-text-column", "caption",
                            "--recaption-column", "long_caption", "--records-per-shard", "3")
    assert (status, report) == (0, {"written": 4, "skipped": {"empty_caption": 1, "missing_image": 1,
                                                              "non_utf8_text": 1}})
    info, records = read_dataset(tmp_path / "out")
    assert len(info.shards) == 3 and info.recaption_fallbacks == 1
    assert [r.key for r in records] == ["0", "1", "2", "3"]
    assert [r.image for r in records] == list(photos.values())
    assert records[0].text("recaption") == "A photo. It shows astronaut."
    assert records[1].recaption == records[1].alt_text == b"a photo of chelsea"  # blank -> alt-text


def test_table_parquet_bytes(tmp_path, capsys):
    photos, _ = _table_rows(tmp_path)
    names = list(photos)
    table = pa.table({
        "id": [f"id-{n}" for n in names] + ["id-none"],
        "image": [photos[n] for n in names] + [photos["coffee"]],
        "alt_text": [f"a photo of {n}" for n in names] + [None],
        "recaption": [f"It is {n}. Really!" for n in names] + ["x"],
    })
    pq.write_table(table, tmp_path / "pairs.parquet", row_group_size=2)
    status, report, _ = run(capsys, "--format", "table", "--input", tmp_path / "pairs.parquet",
                            "--output", tmp_path / "out", "--key-column", "id", "--records-per-shard", "3")
    assert (status, report) == (0, {"written": 4, "skipped": {"missing_caption": 1}})
    _, records = read_dataset(tmp_path / "out")
    assert [r.key for r in records] == [f"id-{n}" for n in names]
    assert [r.image for r in records] == [photos[n] for n in names]
    assert records[2].text("recaption") == "It is coffee. Really!"


def test_imagefolder(tmp_path, capsys):
    root = tmp_path / "root"
    for cls, photos in {"cat": ["chelsea"], "space": ["astronaut", "rocket"], "drink": ["coffee"]}.items():
        (root / cls).mkdir(parents=True)
        for p in photos:
            (root / cls / f"{p}.png").write_bytes(photo_bytes(p, "PNG", 48))
    (root / "cat" / "README.txt").write_text("not an image")
    (root / "drink" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    status, report, _ = run(capsys, "--format", "imagefolder", "--input", root, "--output", tmp_path / "out",
                            "--template", "a photo of a {}.")
    assert (status, report) == (0, {"written": 4, "skipped": {"undecodable_image": 1}})
    info, records = read_dataset(tmp_path / "out")
    assert info.classes == ["cat", "drink", "space"] and info.templates == ["a photo of a {}."]
    assert [(r.key, r.label) for r in records] == [("cat/chelsea.png", 0), ("drink/coffee.png", 1),
                                                   ("space/astronaut.png", 2), ("space/rocket.png", 2)]
    assert all(r.alt_text == r.recaption == b"" for r in records)


def test_usage_errors_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    # The real command line: exactly one line on stderr, nothing on stdout.
    proc = subprocess.run([sys.executable, "-m", "openvision_max.data.convert", "--format", "webdataset",
                           "--input", str(tmp_path / "nothing-*.tar"), "--output", str(out)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and str(tmp_path / "nothing-*.tar") in proc.stderr

    (tmp_path / "not.tar").write_bytes(b"plain text, not a tar archive" * 40)
    (tmp_path / "t.csv").write_text("image,text\na.jpg,hello\n")
    a_file = tmp_path / "file"
    a_file.write_text("")
    tar, _ = make_photo_webdataset(tmp_path)
    cases = [
        (["--format", "webdataset", "--input", tmp_path / "not.tar", "--output", out], "not.tar"),
        (["--format", "table", "--input", tmp_path / "t.csv", "--output", out], "alt_text"),
        (["--format", "imagefolder", "--input", tmp_path / "t.csv", "--output", out], "t.csv"),
        (["--format", "webdataset", "--input", tar, "--output", a_file / "sub"], str(a_file)),
        (["--format", "parquet", "--input", tar, "--output", out], "parquet"),
        (["--format", "webdataset", "--input", tar, "--output", out, "--template", "a photo"], "a photo"),
    ]
    for argv, named in cases:
        status, report, err = run(capsys, *argv)
        assert (status, report) == (2, None), argv
        assert err.count("\n") == 1 and named in err, err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # nothing written, nothing lost


def _tiny_tars(directory: pathlib.Path, indices) -> None:
    """`<i:05d>.tar` holding one tiny sample `k<i>` for each i: many shards, little work."""
    directory.mkdir()
    for i in indices:
        with tarfile.open(directory / f"{i:05d}.tar", "w") as t:
            for name, payload in [(f"k{i}.png", png(i, (8, 8))), (f"k{i}.txt", b"noise")]:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                t.addfile(info, io.BytesIO(payload))


def test_brace_patterns(tmp_path, capsys):
    """webdataset / img2dataset shard lists: {00000..00002} ranges (zero padding kept) and {a,b} lists."""
    _tiny_tars(tmp_path / "in", [0, 1, 2, 10])
    status, report, _ = run(capsys, "--format", "webdataset", "--input", f"{tmp_path}/in/{{00000..00002}}.tar",
                            "--output", tmp_path / "range")
    assert (status, report["written"]) == (0, 3)
    assert DatasetInfo.read(tmp_path / "range").inputs == [str(tmp_path / "in" / f"0000{i}.tar") for i in range(3)]
    status, report, _ = run(capsys, "--format", "webdataset", "--input", f"{tmp_path}/in/000{{10,00}}.tar",
                            "--output", tmp_path / "list")
    assert (status, report["written"]) == (0, 2)
    assert [r.key for r in read_dataset(tmp_path / "list")[1]] == ["k10", "k0"]  # in the order given
    out = tmp_path / "bad"
    for pattern, named in [("{00000..00003}", "{00000..00003}.tar names 4 paths and 1 of them match no file"),
                           ("{00003..00009}", "no files match"), ("{2..0}", "bad brace range {2..0}"),
                           ("{0..}", "bad brace range {0..}")]:
        status, report, err = run(capsys, "--format", "webdataset", "--input", f"{tmp_path}/in/{pattern}.tar",
                                  "--output", out)
        assert (status, report) == (2, None)
        assert err.count("\n") == 1 and named in err, err
    assert not out.exists()  # refused before anything was made


def _files(directory: pathlib.Path) -> dict[str, tuple[int, str]]:
    return {p.name: (p.stat().st_mtime_ns, digest(p)) for p in sorted(directory.iterdir())}


def test_another_source_is_refused_without_overwrite(tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        make_photo_webdataset(tmp_path / name, name="part-0.tar", key_prefix=f"{name}-")
    make_photo_webdataset(tmp_path / "a", name="part-1.tar", key_prefix="a1-")
    out = tmp_path / "out"
    a = ["--format", "webdataset", "--input", tmp_path / "a" / "part-*.tar", "--output", out]
    assert run(capsys, *a)[0] == 0
    (out / "notes.txt").write_text("the user's own file")
    before = _files(out)

    (tmp_path / "t.csv").write_text("image,alt_text,recaption\n")
    other_sources = [
        (["--format", "webdataset", "--input", tmp_path / "b" / "part-0.tar", "--output", out],
         f"{tmp_path / 'b' / 'part-0.tar'} is not among its 2 inputs"),
        (["--format", "webdataset", "--input", tmp_path / "a" / "part-0.tar", "--output", out],
         f"its 2 inputs include {tmp_path / 'a' / 'part-1.tar'}, not given now"),
        ([*a, "--recaption-field", "llava"], '--recaption-field "re_caption", now "llava"'),
        ([*a, "--prefix", "recap"], '--prefix "data", now "recap"'),
        (["--format", "table", "--input", tmp_path / "t.csv", "--output", out], "format webdataset, now table"),
    ]
    for argv, difference in other_sources:
        status, report, err = run(capsys, *argv)
        assert (status, report) == (2, None), argv
        assert err == (f"python -m openvision_max.data.convert: error: {out} already holds a dataset converted "
                       f"from another source ({difference}); pass --overwrite to replace it\n")
        assert _files(out) == before  # nothing touched

    status, report, err = run(capsys, *other_sources[0][0], "--overwrite")
    assert (status, report, err) == (0, {"written": 6, "skipped": SKIPPED}, "")  # no warning of foreign shards
    assert sorted(p.name for p in out.iterdir()) == ["data-00000-of-00001.array_record",
                                                      "data-00000-of-00001.array_record.json", "dataset.json",
                                                      "notes.txt"]  # the old shards went, the user's file stayed
    info, records = read_dataset(out)
    assert info.inputs == [str(tmp_path / "b" / "part-0.tar")] and records[0].key.startswith("b-")


def test_dataset_json_without_inputs_still_compares(tmp_path, capsys):
    """A dataset.json from before `inputs`/`options` were recorded: compared by format and shard names."""
    make_photo_webdataset(tmp_path, name="a.tar")
    make_photo_webdataset(tmp_path, name="b.tar")
    out = tmp_path / "out"
    assert run(capsys, "--format", "webdataset", "--input", tmp_path / "a.tar", "--output", out)[0] == 0
    meta = json.loads((out / "dataset.json").read_text())
    del meta["inputs"], meta["options"]
    (out / "dataset.json").write_text(json.dumps(meta))
    assert DatasetInfo.read(out).inputs is None
    status, _, err = run(capsys, "--format", "webdataset", "--input", tmp_path / "a.tar", "--output", out)
    assert (status, err) == (0, "up to date: 1 shard reused\n")
    (out / "dataset.json").write_text(json.dumps(meta))
    status, _, err = run(capsys, "--format", "webdataset", "--input", tmp_path / "*.tar", "--output", out)
    assert status == 2
    assert "(1 shards from data-00000-of-00001.array_record, now 2 shards from data-00000-of-00002" in err


def test_progress_off_a_terminal_is_bounded_and_ends_once(tmp_path):
    """stderr captured (not a tty): tqdm's lines are bounded, and the final state appears exactly once."""
    _tiny_tars(tmp_path / "in", range(45))
    proc = subprocess.run([sys.executable, "-m", "openvision_max.data.convert", "--format", "webdataset",
                           "--input", str(tmp_path / "in" / "*.tar"), "--output", str(tmp_path / "out"),
                           "--workers", "1"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0 and json.loads(proc.stdout) == {"written": 45, "skipped": {}}
    lines = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    assert [ln for ln in lines if "45/45" in ln] == [lines[-1]]  # once, and last
    assert "written=45" in lines[-1]
    assert len(lines) <= convert.LOG_PROGRESS_LINES + 1, lines  # the start, every 5 %, the end
