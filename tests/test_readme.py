"""The README's command blocks, run on tiny inputs.

Every command in a ```bash block of README.md must have an entry in `VARIANTS` below (the first test fails
on a command without one), which says how it runs here: the README's own arguments with a tiny model, a step
or two, and the README's `/data/...` paths pointing into a temporary directory. The Python API block runs as
written, on the run an earlier command made. `make demo` and `make test` are what CI itself runs.
"""

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest
from openvision_max.mesh.host_devices import xla_flags

from conftest import DEMO_CACHE, ROOT, TINY

README = (ROOT / "README.md").read_text()
# What every training command of the README adds: the tiny model, one step, synthetic data unless it asks
# for grain, no evals. Later arguments win, so these shrink the README's batch and model. One learning-rate
# schedule for all: the schedule's constants are part of the compiled step, so with the stages' own (each
# stage of a model file has its base_lr and warmup) every stage and command compiled a program of its own;
# with these the model files' tiny steps are one program, compiled once and then read from the cache.
TRAIN_TINY = [*TINY, "steps=1", "global_batch_size=8", "log_period=1", "evals=[]", "base_lr=1e-4",
              "warmup_steps=0"]
# The model files carry a three-stage recipe: one command runs all three (as documented), the others one stage
# (stage transitions have their own tests in test_train_binary.py).
ONE_STAGE = "stage=finetune_224"
# FSDP over the 128 chips of the README's v5p-256 needs every sharded dimension divisible by 128.
WIDE = ["embed_dim=128", *(f"{t}.{k}={v}" for t in ("vision", "text", "decoder")
                           for k, v in (("width", 128), ("mlp_dim", 256)))]


def readme_commands() -> list[str]:
    """Each command of the README's bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                commands.append(" ".join(line.split()))
    return commands


@dataclasses.dataclass
class Variant:
    group: str                 # the test that runs it (commands of a group share a working directory)
    extra: tuple = ()          # arguments appended to the README's
    data: bool = False         # README paths under /data/ go to <tmp>/data/
    replace: tuple = ()        # (README text, what runs here instead), e.g. a shorter shard range


VARIANTS = {
    "python train.py configs/L14.yml global_batch_size=4096 ici_fsdp_parallelism=-1": Variant("train", (
        "dataset_type=synthetic", *TRAIN_TINY, ONE_STAGE)),
    "python -m openvision_max.summary configs/B16.yml image_size=224": Variant("train"),
    "python train.py configs/B16.yml image_size=160 global_batch_size=1024 vision.depth=6 dtype=float32":
        Variant("train", ("dataset_type=synthetic", *TRAIN_TINY, ONE_STAGE, "run_name=b16")),
    "python train.py configs/L14.yml run_name=l14 base_output_directory=runs": Variant("train", (
        "dataset_type=synthetic", *TRAIN_TINY)),
    # OpenVision 2's model files on the tiny model: the recipe's keep ratios (0.35, 0.25) on 16 patches.
    "python train.py configs/ov2_L14.yml run_name=ov2_l14": Variant("train", (
        "dataset_type=synthetic", *TRAIN_TINY, ONE_STAGE)),
    "python train.py configs/ov2_So400m14.yml run_name=ov2_so400m": Variant("train", (
        "dataset_type=synthetic", *TRAIN_TINY, ONE_STAGE)),
    "tensorboard --logdir runs/": Variant("train", ("--inspect",)),  # prints what it would serve, and exits
    "python -m openvision_max.goodput runs/l14": Variant("train"),  # on the l14 run above (three stages)
    "python -m openvision_max.export configs/B16.yml image_size=224 load_parameters_path=runs/b16 "
    "export_dir=exports/b16-224": Variant("train", TINY),
    "python -m openvision_max.import_open_clip exports/b16-224 configs/B16.yml image_size=224 "
    "output=runs/b16-imported": Variant("train", TINY),
    "python -m openvision_max.data.convert --format webdataset --input '/data/recap/{00000..00099}.tar' "
    "--output /data/recap-ar --workers 16 --recaption-field re_caption": Variant(
        "data", ("--workers", "2"), data=True, replace=(("{00000..00099}", "{00000..00001}"),)),
    "python -m openvision_max.data.convert --format table --input pairs.parquet --output /data/pairs-ar "
    "--image-column image --alt-text-column alt_text --recaption-column recaption": Variant("data", data=True),
    "python -m openvision_max.data.convert --format imagefolder --input /data/imagenet/val --output "
    "/data/in1k-val": Variant("data", data=True),
    "python train.py configs/L14.yml dataset_type=grain train_data='[/data/recap-ar]' grain_worker_count=16":
        Variant("data", (*TRAIN_TINY, ONE_STAGE, "grain_worker_count=2"), data=True),
    "python train.py configs/L14.yml compile_topology=v5p-256 global_batch_size=16384 image_size=224":
        Variant("aot", (*TINY, *WIDE, "global_batch_size=256", "stage=finetune_224")),
    # Meant for a v5p-8 slice: here compiled for one (AOT), the tiny model at 4 per chip, flash kernels by Mosaic.
    "python train.py configs/v5p-8/L14.yml stage=finetune_224 global_batch_size=256": Variant("v5p-8", (
        *TINY, "global_batch_size=16", "compile_topology=v5p-8")),
    # The harness on the tiny model: two measured steps each side; one AOT point (one value per swept key).
    "python -m openvision_max.benchmark configs/B16.yml image_size=224 vision.depth=2 text.depth=2 "
    "global_batch_size=8 --mode measure --vs open_clip": Variant("bench", (*TINY, "--steps", "1", "--warmup", "1")),
    "python -m openvision_max.benchmark configs/L14.yml stage=finetune_224 --mode aot --topology v5p-8 --sweep "
    "remat_policy=full,save_qkv_proj per_device_batch_size=32,64 --pick": Variant("bench", replace=(
        ("stage=finetune_224", " ".join(["stage=finetune_224", *TINY, "scan_layers=false"])),
        ("remat_policy=full,save_qkv_proj per_device_batch_size=32,64", "remat_policy=full per_device_batch_size=2"),
    )),
    # The Makefile target's own command (test_demo_ov2_command checks the recipe), three steps, on the demo sets
    # the suite shares (conftest.DEMO_CACHE); the evals are the demo's, on its whole held-out sets.
    "make demo-ov2": Variant("demo", ("steps=3", "log_period=1", "grain_worker_count=0"),
                             replace=(("make demo-ov2", "python train.py configs/demo_ov2.yml"),)),
    # Writes the manifest (the config resolved for 2 x v5p-128 first); nothing runs on a cluster.
    "python -m openvision_max.launch gke --tpu v5p-128 --slices 2 --image IMAGE --name l14-run --bucket "
    "gs://my-bucket -- configs/L14.yml global_batch_size=16384": Variant("gke"),
}


def test_every_readme_command_has_a_tiny_variant():
    commands = readme_commands()
    assert commands[:2] == ["make demo", "make test"]
    assert sorted(set(commands[2:])) == sorted(VARIANTS), "README commands and VARIANTS differ"


def run(command: str, cwd, data_root=None, extra=()) -> subprocess.CompletedProcess:
    """The README command with its variant's arguments (and `extra`), as a user's shell would run it, in `cwd`."""
    variant = VARIANTS[command]
    if variant.data:
        command = command.replace("/data/", f"{data_root}/data/")
    for old, new in variant.replace:
        command = command.replace(old, new)
    argv = [*shlex.split(command), *variant.extra, *extra]
    if argv[0] == "python":
        argv[0] = sys.executable
        if argv[1] == "train.py":
            argv[1] = str(ROOT / "train.py")
    elif argv[0] == "tensorboard":
        argv[0] = str(ROOT / ".venv" / "bin" / "tensorboard") if (ROOT / ".venv/bin/tensorboard").exists() \
            else "tensorboard"
    # A user's shell: one CPU device, not the 8 fake ones of this test process.
    env = {**os.environ, "XLA_FLAGS": xla_flags(os.environ.get("XLA_FLAGS"), 1)}
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    print(f"{time.perf_counter() - start:.1f} s: {command}")
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def workspace(tmp_path):
    """A working directory as a user's checkout: configs/ and train.py beside the runs."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    return tmp_path


def commands_of(group: str) -> list[str]:
    return [c for c in readme_commands()[2:] if VARIANTS[c].group == group]


def test_training_export_import_and_api_commands(tmp_path):
    cwd = workspace(tmp_path)
    out = {c: run(c, cwd) for c in commands_of("train")}
    summary = json.loads(out["python -m openvision_max.summary configs/B16.yml image_size=224"].stdout)
    assert summary  # the JSON object of parameters and FLOPs
    assert (cwd / "runs" / "l14" / "metrics.jsonl").is_file()
    assert (cwd / "exports" / "b16-224" / "open_clip_config.json").is_file()
    assert (cwd / "runs" / "b16-imported" / "config.yml").is_file()
    assert "loss" in out["tensorboard --logdir runs/"].stdout
    # OpenVision 2's model files: the caption loss alone, on their keep ratios of the tiny model's 16 patches.
    for command, kept in (("python train.py configs/ov2_L14.yml run_name=ov2_l14", 5),
                          ("python train.py configs/ov2_So400m14.yml run_name=ov2_so400m", 4)):
        assert f"caption_loss (teacher-forced, decoder reads {kept} of 16 patch tokens)" in out[command].stdout
    goodput = out["python -m openvision_max.goodput runs/l14"].stdout
    assert goodput.startswith("goodput of runs/l14: 1 run of the directory (0 interrupted), 3 steps")
    assert "productive" in goodput

    # The Python API block, as written, on the run the B16 command made.
    api = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    images = "images = [np.zeros((40, 30, 3), np.uint8), np.full((30, 40, 3), 200, np.uint8)]"
    code = f"import numpy as np\n{images}\n{api}\nassert probs.shape == (2, 2)\n"
    subprocess.run([sys.executable, "-c", code], cwd=cwd, check=True, timeout=300)


def test_data_commands(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from photo_data import make_photo_webdataset, photo_bytes

    cwd = workspace(tmp_path)
    recap = tmp_path / "data" / "recap"
    recap.mkdir(parents=True)
    for i in range(2):  # two shards where the README has a hundred (the variant's range says {00000..00001})
        make_photo_webdataset(recap, name=f"{i:05d}.tar", key_prefix=f"s{i}-")
    (cwd / "img").mkdir()
    for i, photo in enumerate(("astronaut", "chelsea")):
        (cwd / "img" / f"{i}.jpg").write_bytes(photo_bytes(photo, "JPEG"))
    pq.write_table(pa.table({"image": ["img/0.jpg", "img/1.jpg"], "alt_text": ["a person", "a cat"],
                             "recaption": ["An astronaut.", "A cat on a couch."]}), cwd / "pairs.parquet")
    for cls, photo in (("n01", "coffee"), ("n02", "rocket")):
        (tmp_path / "data" / "imagenet" / "val" / cls).mkdir(parents=True)
        (tmp_path / "data" / "imagenet" / "val" / cls / "a.png").write_bytes(photo_bytes(photo, "PNG"))
    for command in commands_of("data"):
        run(command, cwd, data_root=tmp_path)
    runs = list((cwd / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "metrics.jsonl").is_file()


def test_benchmark_commands(tmp_path):
    pytest.importorskip("libtpu")
    cwd = workspace(tmp_path)
    measured, modelled = (run(c, cwd).stdout for c in commands_of("bench"))
    assert "ours / open_clip = " in measured and "measured step" in measured
    assert "modelled MFU" in modelled and "pick L14 (patch 8) @32:" in modelled  # TINY has patch 8
    row = modelled.splitlines()[0]
    assert "on v5p-8" in row and "modelled step" in row and "measured" not in row
    points = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "runs" / "benchmarks").glob("*/*.json")}
    aot, ours = points["L14"], points["B16"]
    assert aot["fits"] and 0 < aot["memory_bytes"] < aot["hbm_bytes"] and aot["global_batch_size"] == 2 * 4
    assert aot["modelled_step_seconds"] > 0 and 0 < aot["modelled_mfu"] <= 1
    assert 0 < ours["measured_mfu"] <= 1 and ours["vs_open_clip"]["ratio"] > 0


def test_aot_command(tmp_path):
    pytest.importorskip("libtpu")
    (command,) = commands_of("aot")
    proc = run(command, workspace(tmp_path))
    report = [json.loads(ln)["aot"] for ln in proc.stdout.splitlines() if ln.startswith('{"aot"')]
    assert [r["num_devices"] for r in report] == [128]


def test_v5p8_command(tmp_path):
    pytest.importorskip("libtpu")
    (command,) = commands_of("v5p-8")
    proc = run(command, workspace(tmp_path))
    (report,) = [json.loads(ln)["aot"] for ln in proc.stdout.splitlines() if ln.startswith('{"aot"')]
    # The file's pure data parallelism over the slice's 4 chips, and the step fits.
    assert report["num_devices"] == 4 and report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert report["memory"]["fits"] and report["modelled_step_seconds"] > 0


def test_demo_ov2_command(tmp_path):
    recipe = re.search(r"^demo-ov2:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert recipe == "$(PY) train.py configs/demo_ov2.yml"  # what the variant runs
    (command,) = commands_of("demo")
    # The shipped evals, each on the first 120 held-out images: zero-shot by caption likelihood scores every
    # class prompt against every image, which on all 1,500 took most of this test's time.
    import yaml
    shipped = yaml.safe_load((ROOT / "configs" / "demo_ov2.yml").read_text())["evals"]
    limited = [{**entry, "max_examples": 120} for entry in shipped]
    proc = run(command, workspace(tmp_path), extra=[f"data_cache_dir={DEMO_CACHE}", "evals=" + json.dumps(limited)])
    rows = [json.loads(x) for x in (tmp_path / "runs" / "demo_ov2" / "metrics.jsonl").read_text().splitlines()]
    evals = {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}
    assert evals["eval/digits/examples"] == 120 and 0 <= evals["eval/digits/top1"] <= 1
    assert evals["eval/shapes/examples"] == 120 and 0 <= evals["eval/shapes/top1"] <= 1
    assert evals["eval/digits_captions/loss"] > 0 and evals["eval/shapes_captions/loss"] > 0
    assert "eval/digits/top1" in proc.stdout


def test_gke_command(tmp_path):
    import yaml
    (command,) = commands_of("gke")
    proc = run(command, workspace(tmp_path))
    assert "kubectl apply -f l14-run.jobset.yaml" in proc.stdout and "xpk workload create" in proc.stdout
    manifest = yaml.safe_load((tmp_path / "l14-run.jobset.yaml").read_text())
    assert manifest["kind"] == "JobSet" and manifest["spec"]["replicatedJobs"][0]["replicas"] == 2
