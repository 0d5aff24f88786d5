import os
import subprocess
import sys

import pytest
import yaml

from openvision_max.config import all_keys, config_to_dict, load_config
from openvision_max.config.schema import ConfigError

from conftest import CONFIGS, ROOT, tiny_config

REQUIRED_KEYS = """run_name base_output_directory seed global_batch_size steps image_size patch_size dtype attention
remat_policy scan_layers ici_data_parallelism ici_fsdp_parallelism ici_tensor_parallelism dcn_data_parallelism
dcn_fsdp_parallelism dcn_tensor_parallelism dataset_type log_period checkpoint_period compile_topology
compile_topology_num_slices eval_only load_parameters_path""".split()


def load(*args, num_devices=1, platform="cpu"):
    return load_config([str(CONFIGS / "base.yml"), *args], platform=platform, num_devices=num_devices)


def test_required_keys_exist():
    assert set(REQUIRED_KEYS) <= set(all_keys())


def test_base_yml_documents_every_key():
    """Every schema key is in base.yml with a comment on its line."""
    lines = (CONFIGS / "base.yml").read_text().splitlines()
    data = yaml.safe_load((CONFIGS / "base.yml").read_text())
    for key in all_keys():
        node = data
        for part in key.split("."):
            assert part in node, f"{key} missing from base.yml"
            node = node[part]
        leaf = key.split(".")[-1]
        line = next(ln for ln in lines if ln.strip().startswith(leaf + ":"))
        assert "#" in line, f"{key} has no comment in base.yml"


@pytest.mark.parametrize("name", ["Ti16", "S16", "B16", "L14", "So400m14", "H14", "demo"])
def test_model_files_load(name):
    cfg = load_config([str(CONFIGS / f"{name}.yml")], platform="cpu", num_devices=1)
    assert cfg.image_size % cfg.patch_size == 0


PERFORMANCE_KEYS = {"attention", "remat_policy", "scan_layers", "ici_data_parallelism", "ici_fsdp_parallelism"}


@pytest.mark.parametrize("path", sorted((CONFIGS / "v5p-8").glob("*.yml")), ids=lambda p: p.stem)
def test_topology_files_change_only_how_the_step_runs(path):
    """configs/v5p-8/<model>.yml is <model>.yml with the speed keys of docs/performance.md: the same model,
    recipe and stages, so that a run can switch between them (and resume across them)."""
    tuned = config_to_dict(load_config([str(path)], platform="cpu", num_devices=4))
    plain = config_to_dict(load_config([str(CONFIGS / path.name)], platform="cpu", num_devices=4))
    keys = (tuned.keys() | plain.keys()) - {"derived", "run_name"}
    differ = {k for k in keys if tuned.get(k) != plain.get(k)}
    assert differ == PERFORMANCE_KEYS
    assert (tuned["attention"], tuned["remat_policy"], tuned["scan_layers"]) == ("flash", "none", False)
    assert list(tuned["derived"]["ici_mesh_shape"]) == [4, 1, 1] != list(plain["derived"]["ici_mesh_shape"])


def test_overrides_types_and_nesting():
    cfg = load("vision.depth=3", "base_lr=1e-3", "scan_layers=false", "run_name=123",
               "logical_axis_rules=[[embed, fsdp], [mlp, [tensor]]]")
    assert cfg.vision.depth == 3 and cfg.base_lr == 1e-3 and cfg.scan_layers is False
    assert cfg.run_name == "123"
    assert cfg.logical_axis_rules == [("embed", "fsdp"), ("mlp", ["tensor"])]
    assert cfg.derived.peak_learning_rate == pytest.approx(1e-3 * 256 / 256)


def test_unknown_key_names_key_and_suggestions():
    with pytest.raises(ConfigError, match=r"'global_batch_sise'.*did you mean 'global_batch_size'"):
        load("global_batch_sise=8")
    with pytest.raises(ConfigError, match=r"'vision.widht'.*'vision.width'"):
        load("vision.widht=8")


def test_wrong_type_names_key_type_value():
    with pytest.raises(ConfigError, match=r"'global_batch_size' expects int, got 'abc'"):
        load("global_batch_size=abc")
    with pytest.raises(ConfigError, match=r"'dtype' expects one of 'bfloat16', 'float32', got 'fp8'"):
        load("dtype=fp8")
    with pytest.raises(ConfigError, match=r"'scan_layers' expects bool"):
        load("scan_layers=7")


@pytest.mark.parametrize("args, message", [
    (["vision.width=100", "vision.num_heads=3"], "vision.width=100 is not divisible by vision.num_heads=3"),
    (["image_size=225"], "image_size=225 is not divisible by patch_size=16"),
    (["global_batch_size=12", "ici_data_parallelism=8", "ici_fsdp_parallelism=1"],
     "global_batch_size=12 is not divisible by the 8 devices"),
    (["ici_data_parallelism=3", "ici_fsdp_parallelism=1"], "uses 3 devices but 8 are available"),
    (["ici_data_parallelism=-1", "ici_fsdp_parallelism=-1"], "at most one ici"),
    (["attention=cudnn"], "attention='cudnn' is not available on cpu; available: dot_product, flash"),
    (["decoder.attention=cudnn"], "decoder.attention='cudnn' is not available on cpu"),
    (["vision.attention=flash", "vision.width=1040", "vision.num_heads=4"],
     "vision has 260"),
    (["remat_policy=minimal_offloaded"], "offloads to host memory"),
    (["logical_axis_rules=[[embed, model]]"], "'model', which is not a mesh axis"),
])
def test_impossible_combinations(args, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(*args, num_devices=8)


def test_attention_per_tower_defaults_to_the_top_level_key():
    from openvision_max.models.openvision import stack_config
    cfg = load("decoder.attention=flash")
    assert (cfg.derived.vision_attention, cfg.derived.text_attention, cfg.derived.decoder_attention) == (
        "dot_product", "dot_product", "flash")
    assert stack_config(cfg, "decoder", gelu_tanh=True).attention == "flash"
    assert dict(stack_config(cfg, "decoder", gelu_tanh=True).attention_options)["block_q"] == 128
    assert stack_config(cfg, "vision", gelu_tanh=False).attention_options == ()
    cfg = load("attention=flash", "text.attention=dot_product")
    assert (cfg.derived.vision_attention, cfg.derived.text_attention, cfg.derived.decoder_attention) == (
        "flash", "dot_product", "flash")


def test_mesh_fill_and_dcn():
    cfg = load("ici_data_parallelism=2", "ici_fsdp_parallelism=-1", "ici_tensor_parallelism=2", num_devices=8)
    assert cfg.derived.ici_mesh_shape == (2, 2, 2) and cfg.derived.batch_shards == 4
    cfg = load("dcn_data_parallelism=2", num_devices=8)
    assert cfg.derived.dcn_mesh_shape == (2, 1, 1) and cfg.derived.ici_mesh_shape == (1, 4, 1)


def test_missing_keys_and_bad_files(tmp_path):
    partial = tmp_path / "partial.yml"
    partial.write_text("steps: 3\n")
    with pytest.raises(ConfigError, match="missing key"):
        load_config([str(partial)], platform="cpu", num_devices=1)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config([str(tmp_path / "nope.yml")], platform="cpu", num_devices=1)
    child = tmp_path / "child.yml"
    child.write_text(f"base_config: {CONFIGS / 'base.yml'}\nnot_a_key: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'not_a_key' in .*child.yml"):
        load_config([str(child)], platform="cpu", num_devices=1)


def test_tiny_config_is_valid():
    assert tiny_config().derived.num_patches == 16


@pytest.mark.parametrize("args, needle", [
    (["not_a_key=1"], "not_a_key"),
    (["global_batch_size=abc"], "'global_batch_size' expects int"),
])
def test_cli_exits_2_with_one_line(args, needle):
    # As from a user's shell: no JAX_PLATFORMS, so libtpu (installed for AOT) must stay quiet on its own.
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), str(CONFIGS / "L14.yml"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_paths_are_made_absolute_where_they_enter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load("base_output_directory=runs", "load_parameters_path=runs/a/checkpoints/40",
               "export_dir=~/exports/a", "data_cache_dir=cache",
               "train_data=[demo:shapes, data/ar, 'gs://bucket/ar/*.array_record', /abs/x]",
               "evals=[{name: v, type: zeroshot, path: val}, {name: r, type: retrieval, path: c.json, image_dir: im}]")
    assert cfg.base_output_directory == str(tmp_path / "runs")
    assert cfg.load_parameters_path == str(tmp_path / "runs/a/checkpoints/40")
    assert cfg.export_dir == os.path.expanduser("~/exports/a") and cfg.data_cache_dir == str(tmp_path / "cache")
    assert cfg.train_data == ["demo:shapes", str(tmp_path / "data/ar"), "gs://bucket/ar/*.array_record", "/abs/x"]
    assert [e["path"] for e in cfg.evals] == [str(tmp_path / "val"), str(tmp_path / "c.json")]
    assert cfg.evals[1]["image_dir"] == str(tmp_path / "im")
    assert load("load_parameters_path=").load_parameters_path == ""


@pytest.mark.parametrize("stage", ["", "finetune_224"])
def test_a_runs_config_yml_is_a_config(tmp_path, stage):
    """The resolved config.yml the trainer writes (one stage, or every stage of a multi-stage run) loads back
    to the same configs, and overrides still apply."""
    from openvision_max.config import config_to_dict, load_stages
    from openvision_max.training.main import run_directory

    args = [str(CONFIGS / "L14.yml"), f"base_output_directory={tmp_path}", "run_name=r", *([f"stage={stage}"]
                                                                                             if stage else [])]
    stages = load_stages(args, platform="cpu", num_devices=1)
    assert len(stages) == (1 if stage else 3)
    written = run_directory(stages) / "config.yml"
    again = load_stages([str(written)], platform="cpu", num_devices=1)

    def resolved(c):  # `stages` of a reloaded multi-stage run lists each stage's whole config instead
        return {k: v for k, v in config_to_dict(c).items() if k != "stages"}
    assert [resolved(c) for c in again] == [resolved(c) for c in stages]
    smaller = load_stages([str(written), "global_batch_size=64"], platform="cpu", num_devices=1)
    assert {c.global_batch_size for c in smaller} == {64}


def test_slices_found_at_run_time_fill_the_dcn_axes():
    from openvision_max.config import load_stages
    from openvision_max.config.loading import read_run_keys
    from openvision_max.config.schema import finalize

    def at_run_time(*args, slices):  # what load_stages does with the slices it finds on the devices
        keys = read_run_keys([str(CONFIGS / "base.yml"), *args])
        return finalize(keys, platform="tpu", num_devices=16, num_slices=slices)

    cfg = at_run_time(slices=2)  # dcn_data_parallelism: -1 in base.yml
    assert cfg.derived.dcn_mesh_shape == (2, 1, 1) and cfg.derived.ici_mesh_shape == (1, 8, 1)
    with pytest.raises(ConfigError, match=r"dcn parallelism \{'data': 1, 'fsdp': 4, 'tensor': 1\} uses 4 slices but "
                                          r"the job has 2"):
        at_run_time("dcn_data_parallelism=1", "dcn_fsdp_parallelism=4", slices=2)
    assert load_stages([str(CONFIGS / "base.yml")], platform="cpu", num_devices=8)[0].derived.dcn_mesh_shape == \
        (1, 1, 1)
