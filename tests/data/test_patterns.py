"""Brace patterns ({00000..00099}, {a,b}) for converter inputs and train_data (openvision_max.data.patterns)."""

import pytest

from openvision_max.data import locate
from openvision_max.data.patterns import PatternError, expand_braces, match
from openvision_max.data.records import Record
from openvision_max.data.shards import ShardStats, ShardWriter


@pytest.mark.parametrize("pattern,expected", [
    ("s/{00000..00002}.tar", ["s/00000.tar", "s/00001.tar", "s/00002.tar"]),  # zero padding kept
    ("{8..10}", ["8", "9", "10"]),  # unpadded bounds: no padding
    ("{08..10}", ["08", "09", "10"]),
    ("{3..3}", ["3"]),
    ("{0..1}-{a,b}", ["0-a", "0-b", "1-a", "1-b"]),  # cartesian product, leftmost slowest
    ("{train,val}/*.tar", ["train/*.tar", "val/*.tar"]),  # globs survive for match()
    ("{a,{b,c}d}", ["a", "bd", "cd"]),  # nested
    ("x{,-old}", ["x", "x-old"]),
    ("plain", ["plain"]),
    ("{}{name}", ["{}{name}"]),  # no comma, no range: literal, as braceexpand keeps it
])
def test_expand_braces(pattern, expected):
    assert expand_braces(pattern) == expected


@pytest.mark.parametrize("pattern,message", [
    ("s/{5..1}.tar", "bad brace range {5..1} in s/{5..1}.tar"),
    ("s/{a..}.tar", "bad brace range {a..} in s/{a..}.tar"),
    ("s/{1..b}.tar", "bad brace range {1..b}"),
    ("s/{00000..00099.tar", "unbalanced '{' in s/{00000..00099.tar"),
    ("s/a}.tar", "unbalanced '}' in s/a}.tar"),
])
def test_bad_braces_are_one_error_naming_the_pattern(pattern, message):
    with pytest.raises(PatternError) as e:
        expand_braces(pattern)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_match_globs_each_expansion_and_needs_every_one(tmp_path):
    for name in ("a-00.tar", "a-01.tar", "b-00.tar", "b-07.tar"):
        (tmp_path / name).write_bytes(b"")
    assert match(f"{tmp_path}/{{b,a}}-*.tar") == [str(tmp_path / n) for n in
                                                  ("b-00.tar", "b-07.tar", "a-00.tar", "a-01.tar")]
    with pytest.raises(PatternError, match="no files match .*/c-{00..01}.tar"):
        match(f"{tmp_path}/c-{{00..01}}.tar")
    # One shard missing from an explicit range (a failed download) is an error, not silently skipped.
    with pytest.raises(PatternError, match=r"a-{00..02}.tar names 3 paths and 1 of them match no file, "
                                           r"e.g. .*/a-02.tar"):
        match(f"{tmp_path}/a-{{00..02}}.tar")


def _shard(path):
    with ShardWriter(path, {"test": path.name}) as w:
        w.write(Record(key=path.name, image=b"x"))
        w.commit(ShardStats(written=1))


def test_train_data_expands_braces(tmp_path):
    for d in ("set-0", "set-1"):
        (tmp_path / d).mkdir()
        for i in range(2):
            _shard(tmp_path / d / f"train-{i:05d}.array_record")
    shards = locate.resolve([f"{tmp_path}/set-0/train-{{00000..00001}}.array_record"], "")
    assert shards == [str(tmp_path / "set-0" / f"train-{i:05d}.array_record") for i in range(2)]
    # A pattern naming dataset directories stands for their shards, directory by directory.
    assert locate.resolve([f"{tmp_path}/set-{{1,0}}"], "") == [
        str(tmp_path / d / f"train-{i:05d}.array_record") for d in ("set-1", "set-0") for i in range(2)]
    for bad, message in [(f"{tmp_path}/set-{{0..2}}", "names 3 paths and 1 of them match no file"),
                         (f"{tmp_path}/set-{{2..0}}", "bad brace range {2..0}")]:
        with pytest.raises(locate.DataError, match=message):
            locate.resolve([bad], "")
