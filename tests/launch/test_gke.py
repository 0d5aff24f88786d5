"""`python -m openvision_max.launch gke`: JobSet manifests for TPU slices and GPU nodes, checked offline.

What is validated here, and against what:
- The pod templates and the Jobs each replicatedJob makes, as core/v1 PodTemplate and batch/v1 Job, against
  the Kubernetes 1.37 OpenAPI schema bundled in `kubernetes-validate` (strict: unknown fields fail).
- The whole JobSet against the `openAPIV3Schema` of the JobSet CRD (jobset.x-k8s.io/v1alpha2), vendored in
  tests/launch/data/ from kubernetes-sigs/jobset (Apache-2.0; see data/README.md), with `jsonschema`, plus a
  walk that fails on any field the schema does not declare (the API server prunes or rejects those).
- Not offline: the CRD's CEL rules (`x-kubernetes-validations`, e.g. immutability and name-length rules),
  the JobSet controller's webhooks and defaulting, GKE's TPU/GCS FUSE webhooks, the node labels that exist in a
  given cluster, and the libtpu/megascale start-up on real slices: these need a cluster.
"""

import argparse
import gzip
import json
import os
import pathlib
import subprocess
import sys

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import ROOT, TINY
from openvision_max.launch import __main__ as launcher
from openvision_max.launch import gke

LAUNCH = [sys.executable, "-m", "openvision_max.launch"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(ROOT), str(ROOT / "kernels"), *filter(None, [os.environ.get("PYTHONPATH")])])}
JOBSET_SCHEMA = pathlib.Path(__file__).parent / "data" / "jobset-v1alpha2.schema.json.gz"
K8S_VERSION = "1.37.0"
# A config every target here accepts: the tiny model at a batch that 4 x 256 devices divide.
COMMAND = ["configs/base.yml", *TINY, "global_batch_size=4096"]
EXAMPLE = ROOT / "docker" / "gke-jobset.yaml"
EXAMPLE_ARGV = ["gke", "--tpu", "v5p-128", "--slices", "2", "--image",
                "us-docker.pkg.dev/PROJECT/openvision/openvision-max-tpu:0.1.0", "--name", "openvision-l14",
                "--bucket", "gs://my-bucket", "--", "configs/L14.yml"]


def manifest_for(*argv: str, command=COMMAND) -> tuple[dict, list[str], argparse.Namespace]:
    args = launcher.parser().parse_args(["gke", *argv])
    manifest, container_args = gke.build(args, list(command))
    return manifest, container_args, args


def pod_of(manifest: dict) -> dict:
    return manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]


def env_of(manifest: dict) -> dict:
    out = {}
    for e in pod_of(manifest)["spec"]["containers"][0]["env"]:
        out[e["name"]] = e.get("value", e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath"))
    return out


# (argv, hosts per slice, chips per host, accelerator label, topology label, slices)
TPU_CASES = {
    "v5p-8": (["--tpu", "v5p-8"], 1, 4, "tpu-v5p-slice", "2x2x1", 1),
    "v5p-128x1": (["--tpu", "v5p-128"], 16, 4, "tpu-v5p-slice", "4x4x4", 1),
    "v5p-128x2": (["--tpu", "v5p-128", "--slices", "2"], 16, 4, "tpu-v5p-slice", "4x4x4", 2),
    "v6e-256x4": (["--tpu", "v6e-256", "--slices", "4"], 64, 4, "tpu-v6e-slice", "16x16", 4),
    "v4-32": (["--tpu", "v4-32"], 4, 4, "tpu-v4-podslice", "2x2x4", 1),
}


@pytest.mark.parametrize("case", sorted(TPU_CASES))
def test_tpu_manifest_field_by_field(case):
    argv, hosts, chips, accelerator, grid, slices = TPU_CASES[case]
    m, container_args, _ = manifest_for(*argv, "--image", "img:1", "--name", "run-a", "--bucket", "gs://b")
    assert m["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and m["kind"] == "JobSet"
    assert m["metadata"]["name"] == "run-a"
    assert m["metadata"]["annotations"] == {"alpha.jobset.sigs.k8s.io/exclusive-topology":
                                            "cloud.google.com/gke-nodepool"}
    spec = m["spec"]
    assert spec["network"] == {"enableDNSHostnames": True, "publishNotReadyAddresses": True}
    assert spec["failurePolicy"] == {"maxRestarts": gke.DEFAULT_MAX_RESTARTS}
    [rj] = spec["replicatedJobs"]
    assert rj["name"] == "slice" and rj["replicas"] == slices
    job = rj["template"]["spec"]
    assert job["parallelism"] == job["completions"] == hosts
    assert job["completionMode"] == "Indexed" and job["backoffLimit"] == 0
    pod = job["template"]
    assert pod["metadata"]["annotations"] == {"gke-gcsfuse/volumes": "true"}
    ps = pod["spec"]
    assert ps["restartPolicy"] == "Never" and ps["terminationGracePeriodSeconds"] == gke.DEFAULT_GRACE_S
    assert ps["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": accelerator,
                                  "cloud.google.com/gke-tpu-topology": grid}
    [c] = ps["containers"]
    assert c["image"] == "img:1"
    assert c["resources"]["limits"] == c["resources"]["requests"] == {"google.com/tpu": chips}
    assert c["args"] == container_args == [*COMMAND, "run_name=run-a", "base_output_directory=gs://b/runs"]
    assert "command" not in c   # the image's entrypoint is the binary
    [fuse] = [v for v in ps["volumes"] if "csi" in v]
    assert fuse["csi"]["driver"] == "gcsfuse.csi.storage.gke.io"
    assert fuse["csi"]["volumeAttributes"]["bucketName"] == "b"
    assert {"name": fuse["name"], "mountPath": "/data", "readOnly": True} in c["volumeMounts"]
    env = env_of(m)
    assert "JAX_COORDINATOR_ADDRESS" not in env   # TPU hosts find each other (distributed.py's automatic path)
    if slices > 1:
        assert env["MEGASCALE_NUM_SLICES"] == "metadata.labels['jobset.sigs.k8s.io/replicatedjob-replicas']"
        assert env["MEGASCALE_SLICE_ID"] == "metadata.labels['jobset.sigs.k8s.io/job-index']"
        assert env["MEGASCALE_COORDINATOR_ADDRESS"] == "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME)"
        assert env["MEGASCALE_PORT"] == "8080"
    else:
        assert not [k for k in env if k.startswith("MEGASCALE")]
    # hosts x chips x slices is the device count the config was resolved for
    from openvision_max.config import topology
    assert hosts * chips * slices == topology.device_count(argv[1], slices)


def test_gpu_manifest_passes_the_coordinator_and_process_ids():
    m, container_args, _ = manifest_for("--gpu", "a3-highgpu-8g", "--nodes", "4", "--image", "img:1", "--name",
                                        "gpu-run")
    [rj] = m["spec"]["replicatedJobs"]
    assert rj["replicas"] == 1 and rj["template"]["spec"]["parallelism"] == rj["template"]["spec"]["completions"] == 4
    ps = pod_of(m)["spec"]
    assert ps["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb",
                                  "node.kubernetes.io/instance-type": "a3-highgpu-8g"}
    assert ps["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 8}
    assert "annotations" not in m["metadata"] and "annotations" not in pod_of(m)["metadata"]   # no bucket, no FUSE
    env = env_of(m)
    assert env["JAX_COORDINATOR_ADDRESS"] == "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME):1234"
    assert env["JAX_NUM_PROCESSES"] == "4"
    assert env["JAX_PROCESS_ID"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert container_args == [*COMMAND, "run_name=gpu-run"]


def all_manifests() -> dict[str, dict]:
    out = {case: manifest_for(*argv, "--image", "img:1", "--name", "run-a", "--bucket", "gs://b")[0]
           for case, (argv, *_rest) in TPU_CASES.items()}
    out["gpu"] = manifest_for("--gpu", "a3-highgpu-8g", "--nodes", "2", "--image", "img:1", "--name", "g",
                              "--service-account", "trainer")[0]
    return out


def test_pod_and_job_templates_pass_the_kubernetes_openapi_schema():
    for case, m in all_manifests().items():
        job = m["spec"]["replicatedJobs"][0]["template"]
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": pod_of(m)}, K8S_VERSION, strict=True)
        kubernetes_validate.validate({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "t"}, **job},
                                     K8S_VERSION, strict=True)
    bad = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": pod_of(m)}
    bad["template"]["spec"]["containers"][0]["resource"] = {}   # the validator does catch a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def undeclared_fields(instance, schema, where="") -> list[str]:
    """Paths of object keys that `schema` (an OpenAPI v3 structural schema) does not declare."""
    found = []
    if isinstance(instance, dict) and "properties" in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"):
        for key, value in instance.items():
            if key in schema["properties"]:
                found += undeclared_fields(value, schema["properties"][key], f"{where}.{key}")
            elif not schema.get("additionalProperties"):
                found.append(f"{where}.{key}")
    elif isinstance(instance, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, value in instance.items():
            found += undeclared_fields(value, schema["additionalProperties"], f"{where}.{key}")
    elif isinstance(instance, list) and "items" in schema:
        for i, value in enumerate(instance):
            found += undeclared_fields(value, schema["items"], f"{where}[{i}]")
    return found


def test_jobsets_pass_the_vendored_jobset_crd_schema():
    schema = json.loads(gzip.decompress(JOBSET_SCHEMA.read_bytes()))
    validator = jsonschema.Draft7Validator(schema)
    for case, m in all_manifests().items():
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(m)]
        assert not errors, (case, errors)
        assert undeclared_fields(m, schema) == [], case
    m = all_manifests()["v5p-128x2"]
    m["spec"]["failurePolicy"]["maxRestart"] = 3
    assert undeclared_fields(m, schema) == [".spec.failurePolicy.maxRestart"]
    m["spec"]["replicatedJobs"][0]["replicas"] = "two"
    assert not validator.is_valid(m)


def run_cli(*argv, cwd):
    return subprocess.run([*LAUNCH, *argv], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("override, named", [
    ("vision.widht=32", "'vision.widht'"),
    ("global_batch_size=102", "global_batch_size=102 is not divisible by the 4 devices"),
    ("run_name=other", "run_name is set by the launcher"),
    ("compile_topology=v5p-8", "compile_topology is set by the launcher"),
])
def test_a_bad_override_exits_2_with_one_line_and_writes_nothing(tmp_path, override, named):
    for extra in (["--dry-run"], ["--output", str(tmp_path / "out.yaml")]):
        proc = run_cli("gke", "--tpu", "v5p-8", "--image", "i", "--name", "n", *extra, "--",
                       str(ROOT / "configs" / "base.yml"), *TINY, override, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1 and named in proc.stderr, proc.stderr
        assert list(tmp_path.iterdir()) == []


def test_dry_run_prints_the_manifest_and_a_run_writes_it_and_prints_the_commands(tmp_path):
    argv = ["gke", "--tpu", "v5p-128", "--slices", "2", "--image", "img:1", "--name", "r", "--bucket", "gs://b",
            "--", str(ROOT / "configs" / "L14.yml")]
    dry = run_cli(*argv[:-2], "--dry-run", *argv[-2:], cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert yaml.safe_load(dry.stdout)["spec"]["replicatedJobs"][0]["replicas"] == 2
    assert list(tmp_path.iterdir()) == []
    proc = run_cli(*argv, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load((tmp_path / "r.jobset.yaml").read_text()) == yaml.safe_load(dry.stdout)
    lines = proc.stdout.splitlines()
    assert lines[0] == "wrote r.jobset.yaml" and lines[1].strip() == "kubectl apply -f r.jobset.yaml"
    assert ("xpk workload create --cluster CLUSTER --workload r --docker-image img:1 --tpu-type v5p-128 "
            "--num-slices 2 --max-restarts 20 --command 'python train.py") in lines[2]
    assert "run_name=r base_output_directory=gs://b/runs'" in lines[2]


def test_usage_errors_are_one_line_and_exit_2(tmp_path):
    cases = [
        (["--tpu", "v5p-7", "--image", "i", "--name", "n", "--", "configs/base.yml"], "--tpu v5p-7"),
        (["--tpu", "v5p-8", "--slices", "2", "--image", "i", "--name", "n", "--", "configs/base.yml"],
         "multislice needs multi-host slices"),
        (["--gpu", "a3-highgpu-8g", "--image", "i", "--name", "n", "--", "configs/base.yml"], "--gpu needs --nodes"),
        (["--tpu", "v5p-8", "--image", "i", "--name", "Bad_Name", "--", "configs/base.yml"], "--name 'Bad_Name'"),
        (["--tpu", "v5p-8", "--image", "i", "--name", "n", "--bucket", "b", "--", "configs/base.yml"],
         "--bucket 'b' is not a gs://"),
        (["--tpu", "v5p-8", "--image", "i", "--name", "n"], "put `--` before the training command"),
    ]
    for argv, message in cases:
        proc = run_cli("gke", *argv, cwd=ROOT)
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and message in proc.stderr, (argv, proc)


FAKE_AOT = """\
import json, sys
fits = "fits=yes" in " ".join(sys.argv)
assert any(a.startswith("compile_topology=") for a in sys.argv), sys.argv
print(json.dumps({"aot": {"stage": "main", "memory": {"fits": fits, "total_bytes": 200 * 2 ** 30,
                                                      "hbm_bytes": 95 * 2 ** 30}}}))
"""


def test_check_memory_refuses_a_program_that_does_not_fit(tmp_path):
    """--check-memory runs the AOT report (a stand-in script here: the real compile is test_aot.py's) and
    refuses a stage that does not fit, before anything is written."""
    program = tmp_path / "fake_train.py"
    program.write_text(FAKE_AOT)
    out = tmp_path / "out"
    base = ["gke", "--tpu", "v5p-8", "--image", "i", "--name", "n", "--check-memory", "--program", str(program),
            "--output", str(out / "m.yaml"), "--", str(ROOT / "configs" / "base.yml"), *TINY]
    proc = run_cli(*base, cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "needs 200.0 GiB per device, more than the 95 GiB HBM of a v5p-8 chip" in proc.stderr
    assert not out.exists()
    # libtpu refuses a program far beyond HBM in the compile itself (seen with 1.26 TB of temporaries on v5p-8)
    program.write_text("import sys\nsys.exit('jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory "
                       "on HBM')\n")
    proc = run_cli(*base, cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "does not fit in the HBM of a v5p-8 chip: jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED" in proc.stderr
    assert not out.exists()
    program.write_text(FAKE_AOT.replace('"fits=yes" in " ".join(sys.argv)', "True"))
    proc = run_cli(*base, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (out / "m.yaml").is_file()


def test_help_documents_every_option_and_the_launcher_imports_no_jax():
    proc = run_cli("gke", "--help", cwd=ROOT)
    assert proc.returncode == 0
    for action in launcher.parser()._subparsers._group_actions[0].choices["gke"]._actions:
        for flag in action.option_strings:
            assert flag in proc.stdout, flag
    code = ("import sys; from openvision_max.launch import __main__ as m, gke; "
            "a = m.parser().parse_args(['gke', '--tpu', 'v5p-128', '--slices', '2', '--image', 'i', '--name', 'n']); "
            "gke.build(a, ['configs/L14.yml']); print('jax' in sys.modules, 'libtpu' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["False", "False"], proc.stderr


def test_the_example_manifest_is_the_launchers_output():
    """docker/gke-jobset.yaml is regenerated by this command; rerun it (from the repository root) when the
    launcher changes: python -m openvision_max.launch <EXAMPLE_ARGV> --output docker/gke-jobset.yaml"""
    proc = run_cli(*EXAMPLE_ARGV[:-2], "--dry-run", *EXAMPLE_ARGV[-2:], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert EXAMPLE.read_text() == proc.stdout, "regenerate docker/gke-jobset.yaml (see this test's docstring)"


def test_the_pods_command_trains_under_the_local_launcher(tmp_path, processes):
    """The args a v5p-8 manifest gives its one host (4 chips), run by the local launcher as that host: one
    process. (Two processes of the same command: test_multihost's runs and the launcher's own
    tests; here the suite's time goes to the command, not to more processes.)"""
    command = [str(ROOT / "configs" / "base.yml"), *TINY, "dataset_type=synthetic", "evals=[]", "steps=2",
               "log_period=1", f"base_output_directory={tmp_path}"]
    m, container_args, _ = manifest_for("--tpu", "v5p-8", "--image", "i", "--name", "pod-cmd", command=command)
    pod_args = pod_of(m)["spec"]["containers"][0]["args"]
    assert pod_args == container_args
    assert m["spec"]["replicatedJobs"][0]["template"]["spec"]["parallelism"] == 1  # v5p-8: one host
    # One CPU device stands for the host's 4 chips: the command line is the same, the compile cheaper.
    proc = subprocess.Popen([*LAUNCH, "local", "--processes", "1", "--devices-per-process", "1", "--log-dir",
                             str(tmp_path / "logs"), "--timeout", "400", "--", *pod_args],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    processes.append(proc)
    out, err = proc.communicate(timeout=450)
    assert proc.returncode == 0, err[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "pod-cmd" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2]


def test_a_grid_name_gives_the_same_slice_and_xpk_its_accelerator_type():
    by_name = manifest_for("--tpu", "v5p-128", "--image", "i", "--name", "n")[0]
    by_grid, _, args = manifest_for("--tpu", "v5p:4x4x4", "--image", "i", "--name", "n")
    assert by_grid == by_name
    assert "--tpu-type v5p-128 " in gke.xpk_command(args, ["configs/base.yml"])
    assert [gke.xpk_tpu_type(t) for t in ("v5e-16", "v6e:16x16", "v4-32")] == ["v5litepod-16", "v6e-256", "v4-32"]


def test_hosts_and_chips_per_host_of_single_and_multi_host_slices():
    from openvision_max.config import topology
    shapes = {name: (topology.spec(name).hosts, topology.spec(name).chips_per_host)
              for name in ("v5p-8", "v4-8", "v5p-256", "v6e-1", "v6e-4", "v6e-8", "v6e-16", "v5e-8", "v5e-256")}
    assert shapes == {"v5p-8": (1, 4), "v4-8": (1, 4), "v5p-256": (32, 4), "v6e-1": (1, 1), "v6e-4": (1, 4),
                      "v6e-8": (1, 8), "v6e-16": (4, 4), "v5e-8": (1, 8), "v5e-256": (64, 4)}
    m = manifest_for("--tpu", "v6e-8", "--image", "i", "--name", "n")[0]
    assert pod_of(m)["spec"]["containers"][0]["resources"]["limits"] == {"google.com/tpu": 8}
    assert pod_of(m)["spec"]["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "2x4"
