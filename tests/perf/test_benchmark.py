"""The MFU harness: sweeps cached point by point, --pick, measured MFU and step time on CPU, the family table's
files, usage errors. An AOT point through the command line: tests/test_readme.py::test_benchmark_commands."""

import json
import statistics

import numpy as np
import pytest

from openvision_max.perf import benchmark, family

from conftest import CONFIGS, TINY

# One of the 8 fake devices: the cheapest compile (the harness's mesh code is the trainer's, tested elsewhere).
MEASURE = [str(CONFIGS / "base.yml"), *TINY, "--mode", "measure", "--devices", "1", "--steps", "4", "--warmup", "1"]


def test_a_sweep_caches_each_point_and_a_rerun_measures_none(tmp_path, capsys, monkeypatch):
    """2 x 2 points measured on this CPU: four JSON files; each step time is the median of the timed steps and
    the MFU in (0, 1]; a rerun reads all four back and runs nothing; --pick names the best fitting point."""
    argv = [*MEASURE, "--sweep", "remat_policy=none,full", "seed=0,1", "--output-dir", str(tmp_path), "--pick"]
    first = benchmark.main(argv)
    files = sorted(tmp_path.glob("*.json"))
    assert first.ran == 4 and first.cached == 0 and len(files) == 4
    assert {tuple(r["point"].items()) for r in first.results} == {
        (("remat_policy", p), ("seed", s)) for p in ("none", "full") for s in ("0", "1")}
    for r in first.results:
        assert len(r["step_times_s"]) == 4 and r["step_seconds"] == statistics.median(r["step_times_s"])
        assert 0 < r["measured_mfu"] <= 1
        assert r["samples_per_second"] == pytest.approx(8 / r["step_seconds"])
        assert r["dot_forms"] and all(" -> " in form for form in r["dot_forms"])
    out = capsys.readouterr().out
    assert "4 point(s): 4 run, 0 from the cache" in out
    assert "float32: peak from the measured matmul peak" in out and "best shape" in out
    best = max(first.results, key=lambda r: r["measured_mfu"])
    assert f"pick base @32: {benchmark.format_row(best)}" in out

    def must_not_run(*_):
        raise AssertionError("a cached point was measured again")
    monkeypatch.setattr(benchmark, "run_point", must_not_run)
    again = benchmark.main(argv)
    assert again.ran == 0 and again.cached == 4 and again.results == first.results
    assert sorted(tmp_path.glob("*.json")) == files


def test_pick_takes_the_fitting_point_with_the_highest_mfu():
    def point(model, mfu, fits, res=224):
        return {"model": model, "image_size": res, "mode": "aot", "modelled_mfu": mfu, "fits": fits}
    results = [point("L14", 0.50, False), point("L14", 0.41, True), point("L14", 0.45, True),
               point("L14", 0.60, True, res=336), point("B16", None, True), point("B16", 0.30, True)]
    best = benchmark.pick(results)
    assert best == {"L14 @224": results[2], "L14 @336": results[3], "B16 @224": results[5]}


def test_dot_forms_name_the_operand_and_result_types():
    import jax
    import jax.numpy as jnp
    a = jax.ShapeDtypeStruct((4, 8), jnp.bfloat16)

    def f(x):
        return jnp.dot(x, x.T, preferred_element_type=jnp.float32), jnp.dot(x, x.T)
    forms = benchmark.dot_forms(jax.jit(f).lower(a).as_text())
    assert forms == {"bf16 x bf16 -> f32": 1, "bf16 x bf16 -> bf16": 1}


def test_the_family_table_writes_markdown_json_and_a_readable_png(tmp_path):
    from PIL import Image
    rows = []
    for model, res, mfu, gflop in (("Ti16", 224, 0.21, 200.0), ("B16", 224, 0.38, 600.0), ("B16", 384, 0.44, 1800.0)):
        rows.append({"model": model, "image_size": res, "per_device_batch_size": 128, "recipe_per_device_batch": 128,
                     "memory_bytes": 12e9, "fits": True, "modelled_step_seconds": 0.1, "modelled_mfu": mfu,
                     "modelled_samples_per_second": 5120.0,
                     "aot": {"model_flops_per_device": gflop * 1e9 * 128, "num_devices": 4, "global_batch_size": 512}})
    table = family.write(rows, tmp_path, "v5p-8")
    assert table.splitlines()[0].endswith("(modelled, not measured)")
    assert "| B16 | 384 | 128 (128) | 12.0 GB | yes | 0.100 s | 44.0% | 1280.0 | 1800.0 |" in table
    assert (tmp_path / "mfu.md").read_text() == table
    assert json.loads((tmp_path / "mfu.json").read_text()) == rows
    image = Image.open(tmp_path / "mfu.png")
    assert image.format == "PNG" and image.size == (800, 500)
    pixels = np.asarray(image.convert("L"))
    assert pixels.min() < 100 < pixels.max()  # drawn on, not blank


def test_the_family_rows_are_each_models_recipe_stage():
    rows = family.entries(all_resolutions=False, patch8=True)
    assert [(e.model, e.image_size, e.patch_size) for e in rows] == [
        (m, 224, None) for m in family.MODELS] + [(m, 224, 8) for m in family.PATCH8]
    assert {e.recipe_per_device for e in rows} == {128}  # 16,384 over the recipe's 128 chips
    every = family.entries(all_resolutions=True, patch8=False)
    assert [(e.model, e.image_size) for e in every if e.model == "L14"] == [("L14", 84), ("L14", 224), ("L14", 336)]
    assert {e.recipe_per_device for e in every if e.image_size in (84, 160)} == {256}


@pytest.mark.parametrize("args, message", [
    (["--mode", "aot"], "--mode aot needs --topology"),
    (["--vs", "open_clip", "--mode", "aot", "--topology", "v5p-8"], "--vs open_clip times real steps"),
    (["--sweep", "remat_policy"], "expected KEY=VALUE1,VALUE2"),
    (["--sweep", "seed=1,", ], "an empty value"),
    (["--steps", "0"], "--steps must be at least 1"),
])
def test_usage_errors_exit_2_with_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        benchmark.main([str(CONFIGS / "base.yml"), *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_bad_sweep_value_is_a_config_error_naming_the_point(capsys):
    with pytest.raises(SystemExit) as e:
        benchmark.main([*MEASURE, "--sweep", "remat_policy=none,sometimes"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config error" in err[0] and "(sweep point remat_policy=sometimes)" in err[0]
