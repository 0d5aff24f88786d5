"""`python -m openvision_max.launch gke`: a JobSet manifest for GKE TPU (or GPU) node pools, checked first.

    python -m openvision_max.launch gke --tpu v5p-128 --slices 2 --image IMAGE --name NAME --bucket gs://B \\
        -- configs/L14.yml global_batch_size=4096

writes one `jobset.x-k8s.io/v1alpha2` JobSet and prints its path, the `kubectl apply -f` command and the
equivalent `xpk workload create` command. Before anything is written the config and overrides are resolved
for the target (`compile_topology=<tpu> compile_topology_num_slices=<slices>`, or the GPU devices), so a batch
that does not divide, a mesh that does not fit or an unknown key is one line and exit 2; `--check-memory`
also runs the AOT memory report (`train.py ... compile_topology=...`, training/aot.py) and refuses a program
that does not fit in HBM.

Shape of the manifest (TPU):
- One replicatedJob `slice` with `replicas: <slices>`: every replica is one Job, that is one slice, and the
  annotation `alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool` places each Job
  alone on a node pool (a TPU slice is one node pool). This is how xpk and GKE's multislice guide write it;
  separate replicatedJobs per slice would need one template per slice for the same pod and give no slice
  index label (`jobset.sigs.k8s.io/job-index`), which the multislice variables are read from.
- Each Job: `completionMode: Indexed`, parallelism = completions = hosts per slice (topology.py), one pod per
  TPU VM host, `google.com/tpu` = chips per host, node selectors `cloud.google.com/gke-tpu-accelerator` and
  `cloud.google.com/gke-tpu-topology`, `backoffLimit: 0` (a lost host fails its Job at once).
- `failurePolicy.maxRestarts`: a failed Job (a preempted or lost host) makes the JobSet controller recreate
  every Job; the pods run the same command with the same `run_name` (pinned to --name) and
  `base_output_directory` (gs://BUCKET/runs with --bucket), so the run resumes from its last checkpoint.
- `terminationGracePeriodSeconds`: the time between SIGTERM and SIGKILL, for the checkpoint SIGTERM makes
  every host write.
- `network.enableDNSHostnames`: JobSet's headless Service (named after the JobSet) gives every pod the name
  `<jobset>-<replicatedJob>-<job index>-<pod index>.<jobset>`. On TPU, `jax.distributed.initialize()` finds
  its peers itself (GKE's TPU environment); with more than one slice the pods also get MEGASCALE_NUM_SLICES
  (the replica count label), MEGASCALE_SLICE_ID (the job-index label), MEGASCALE_COORDINATOR_ADDRESS (pod 0 of
  slice 0) and MEGASCALE_PORT, which libtpu reads to join the slices over DCN.
- With --bucket (or --data-bucket): a GCS FUSE CSI volume (`gcsfuse.csi.storage.gke.io`, pod annotation
  `gke-gcsfuse/volumes: "true"`) mounts the data bucket read-only at --data-mount; run directories are
  written through gs:// directly. The pods' service account (--service-account) needs access to the bucket.
- The container's args are the training command (`CONFIG key=value ...`); the image's entrypoint is
  `python train.py`.

GPU (`--gpu a3-highgpu-8g --nodes N`): one replicatedJob `node` of one Job of N indexed pods, `nvidia.com/gpu`
= the machine's GPUs, and the explicit contract of mesh/distributed.py in the environment:
JAX_COORDINATOR_ADDRESS = pod 0's DNS name in the headless Service, JAX_NUM_PROCESSES = N, JAX_PROCESS_ID =
the pod's `batch.kubernetes.io/job-completion-index` annotation.

Left out on purpose: `hostNetwork` (xpk's choice for DCN bandwidth; the GCS FUSE sidecar needs extra set-up
with it), `securityContext.privileged` (GKE 1.28+ gives TPU containers their devices without it), GPUDirect
TCPX/TCPXO sidecars for a3 machines (cluster-specific), Kueue labels and priority classes (add them to the
file, or use the printed xpk command, which does).

Standard library (+ PyYAML) at import time: config loading is imported inside `run`, and it imports no JAX.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
from typing import Optional

from openvision_max.launch.local_cluster import positive_int

PROG = "python -m openvision_max.launch gke"
TRAIN_PY = pathlib.Path(__file__).resolve().parents[2] / "train.py"
API_VERSION = "jobset.x-k8s.io/v1alpha2"

# GKE's node label values for each TPU generation (cloud.google.com/gke-tpu-accelerator).
TPU_ACCELERATOR = {"v4": "tpu-v4-podslice", "v5e": "tpu-v5-lite-podslice", "v5p": "tpu-v5p-slice",
                   "v6e": "tpu-v6e-slice"}
# GPU machine types: (cloud.google.com/gke-accelerator value, GPUs per node, xpk's --device-type).
GPU_MACHINES = {
    "a3-highgpu-8g": ("nvidia-h100-80gb", 8, "h100-80gb-8"),
    "a3-megagpu-8g": ("nvidia-h100-mega-80gb", 8, "h100-mega-80gb-8"),
    "a3-ultragpu-8g": ("nvidia-h200-141gb", 8, "h200-141gb-8"),
    "a2-highgpu-8g": ("nvidia-tesla-a100", 8, "a100-40gb-8"),
    "a2-ultragpu-8g": ("nvidia-a100-80gb", 8, "a100-80gb-8"),
}
TPU_RUNTIME_PORT = 8471     # libtpu's ICI/runtime port, as GKE examples list it
MEGASCALE_PORT = 8080       # DCN transfers between slices
GPU_COORDINATOR_PORT = 1234
# Pod 0 of Job 0 in JobSet's headless Service (the env references are expanded by the kubelet).
POD0_DNS = "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME)"
DEFAULT_GRACE_S = 600
DEFAULT_MAX_RESTARTS = 20
# Keys the launcher owns: the command may not set them (a pod that compiles and exits, or joins the wrong
# cluster, or a restart that starts a new run instead of resuming).
OWNED_KEYS = ("run_name", "compile_topology", "compile_topology_num_slices", "coordinator_address",
              "num_processes", "process_id")
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")

DESCRIPTION = f"""\
Write a JobSet ({API_VERSION}) that runs `python train.py CONFIG key=value ...` on a GKE TPU node pool
(--tpu, one pod per TPU VM host, --slices slices) or GPU node pool (--gpu, --nodes pods), after resolving the
config for that target: a config error is one line and exit 2, and nothing is written. The command gets
run_name=<--name> (and base_output_directory=gs://<bucket>/runs with --bucket), so a JobSet that the failure
policy restarts after a preemption resumes the same run from its checkpoint.

Prints the manifest's path, `kubectl apply -f <path>` and the equivalent `xpk workload create` command.
--dry-run prints the manifest instead of writing it. The CONFIG path is resolved here and in the image alike
(the image holds the repository's configs/ under its working directory)."""


class UsageError(Exception):
    """A problem with the launcher's own arguments or the training command: one line, exit 2."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "gke", prog=PROG, help="a JobSet manifest for GKE TPU slices (or GPU nodes), checked against the config",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"{PROG} (--tpu TYPE [--slices N] | --gpu MACHINE --nodes N) --image IMAGE --name NAME "
              "[options] -- CONFIG [key=value ...]")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--tpu", metavar="TYPE", help="TPU slice type, e.g. v5p-128, v6e-256, v4-32 or v5p:4x4x4 "
                                                      "(hosts and chips per host from config/topology.py)")
    target.add_argument("--gpu", metavar="MACHINE", choices=sorted(GPU_MACHINES),
                        help=f"GPU machine type: {', '.join(sorted(GPU_MACHINES))}")
    p.add_argument("--slices", type=positive_int, default=1, metavar="N",
                   help="TPU slices (multislice over DCN when more than 1; default: %(default)s)")
    p.add_argument("--nodes", type=positive_int, default=None, metavar="N", help="GPU nodes (one pod each); "
                                                                                 "required with --gpu")
    p.add_argument("--image", required=True, help="container image (built from docker/Dockerfile.tpu or .gpu)")
    p.add_argument("--name", required=True, help="JobSet name and the run's run_name (lower case, digits, '-'; "
                                                 "at most 40 characters)")
    p.add_argument("--bucket", metavar="gs://BUCKET", default=None,
                   help="run directories go to gs://BUCKET/runs (base_output_directory), and the bucket is "
                        "mounted for data unless --data-bucket names another")
    p.add_argument("--data-bucket", metavar="gs://BUCKET", default=None,
                   help="bucket mounted read-only with GCS FUSE for training data (default: --bucket)")
    p.add_argument("--data-mount", default="/data", metavar="PATH",
                   help="where the data bucket is mounted in the container (default: %(default)s)")
    p.add_argument("--output", type=pathlib.Path, default=None, metavar="FILE",
                   help="where to write the manifest (default: <name>.jobset.yaml in the working directory)")
    p.add_argument("--dry-run", action="store_true", help="check, then print the manifest; write nothing")
    p.add_argument("--check-memory", action="store_true",
                   help="TPU only: also compile the train step for the topology (train.py compile_topology=...) "
                        "and refuse when the AOT memory report says it does not fit in HBM (takes minutes "
                        "for a large model)")
    p.add_argument("--max-restarts", type=int, default=DEFAULT_MAX_RESTARTS, metavar="N",
                   help="JobSet failurePolicy.maxRestarts: whole-JobSet restarts after preemptions or failures "
                        "(default: %(default)s)")
    p.add_argument("--grace", type=positive_int, default=DEFAULT_GRACE_S, metavar="SECONDS",
                   help="terminationGracePeriodSeconds: SIGTERM to SIGKILL, for the preemption checkpoint "
                        "(default: %(default)s)")
    p.add_argument("--service-account", default=None, metavar="KSA",
                   help="Kubernetes service account of the pods (Workload Identity access to the buckets)")
    p.add_argument("--namespace", default=None, help="metadata.namespace of the JobSet (default: kubectl's)")
    p.add_argument("--cluster", default="CLUSTER", help="GKE cluster named in the printed xpk command "
                                                        "(default: %(default)s, a placeholder)")
    p.add_argument("--program", type=pathlib.Path, default=TRAIN_PY, metavar="SCRIPT",
                   help="the training script --check-memory runs here (default: the repository's train.py)")
    p.set_defaults(run=run_from_args)
    return p


# ---------------------------------------------------------------------------------------------- the command

def override_key(arg: str) -> Optional[str]:
    return arg.split("=", 1)[0].strip() if "=" in arg else None


def training_args(command: list[str], name: str, bucket: Optional[str]) -> list[str]:
    """The container's args: CONFIG, the user's overrides, then the keys the launcher pins."""
    config, overrides = command[0], command[1:]
    for arg in overrides:
        key = override_key(arg)
        if key in OWNED_KEYS:
            raise UsageError(f"{key} is set by the launcher (run_name from --name, the topology from --tpu/--gpu); "
                             f"remove {arg!r} from the training command")
        if key == "base_output_directory" and bucket:
            raise UsageError(f"{arg!r} and --bucket both set base_output_directory; give one")
    pinned = [f"run_name={name}"]
    if bucket:
        pinned.append(f"base_output_directory={bucket.rstrip('/')}/runs")
    return [config, *overrides, *pinned]


def validate_config(args: list[str], *, tpu: Optional[str], slices: int, gpus: int) -> None:
    """Resolves every stage of `args` for the target; raises ConfigError (config loading imports no JAX)."""
    from openvision_max.config.loading import load_stages
    if tpu:
        load_stages([*args, f"compile_topology={tpu}", f"compile_topology_num_slices={slices}"])
    else:
        load_stages(args, platform="gpu", num_devices=gpus)


def check_memory(program: pathlib.Path, args: list[str], tpu: str, slices: int) -> None:
    """Runs the AOT report for the topology, once per stage (train.py compiles the first stage it is given);
    raises UsageError when a stage does not fit or its compile fails."""
    from openvision_max.config.loading import load_stages
    target = [f"compile_topology={tpu}", f"compile_topology_num_slices={slices}"]
    stages = load_stages([*args, *target])
    for name in [c.derived.stage_name for c in stages] if len(stages) > 1 else [None]:
        _check_stage_memory(program, [*args, *target, *([f"stage={name}"] if name else [])], tpu, slices)


def _check_stage_memory(program: pathlib.Path, args: list[str], tpu: str, slices: int) -> None:
    proc = subprocess.run([sys.executable, str(program), *args], capture_output=True, text=True)
    reports = []
    for line in proc.stdout.splitlines():
        if line.startswith('{"aot"'):
            reports.append(json.loads(line)["aot"])
    if proc.returncode != 0 or not reports:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        if "RESOURCE_EXHAUSTED" in last:   # libtpu itself refuses a program far beyond HBM
            raise UsageError(f"--check-memory: the train step does not fit in the HBM of a {tpu} chip: {last}")
        raise UsageError(f"--check-memory: the AOT compile for {tpu} x {slices} failed: {last}")
    for r in reports:
        m = r["memory"]
        if not m["fits"]:
            raise UsageError(
                f"--check-memory: stage {r.get('stage')} needs {m['total_bytes'] / 2 ** 30:.1f} GiB per device, "
                f"more than the {m['hbm_bytes'] / 2 ** 30:.0f} GiB HBM of a {tpu} chip")


# --------------------------------------------------------------------------------------------- the manifest

def _field_env(name: str, path: str) -> dict:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _gcs_volume(bucket: str) -> dict:
    return {"name": "gcs-data", "csi": {"driver": "gcsfuse.csi.storage.gke.io", "readOnly": True,
                                        "volumeAttributes": {"bucketName": bucket_name(bucket),
                                                             "mountOptions": "implicit-dirs"}}}


def bucket_name(bucket: str) -> str:
    return bucket[len("gs://"):].split("/", 1)[0] if bucket.startswith("gs://") else bucket.split("/", 1)[0]


def pod_template(*, image: str, args: list[str], env: list[dict], limits: dict, node_selector: dict,
                 tolerations: list[dict], ports: list[int], grace: int, data_bucket: Optional[str],
                 data_mount: str, service_account: Optional[str]) -> dict:
    """A core/v1 PodTemplateSpec (validated against the Kubernetes OpenAPI schema by the tests)."""
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]   # grain's worker processes share memory
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    metadata: dict = {"labels": {"app.kubernetes.io/name": "openvision-max"}}
    if data_bucket:
        metadata["annotations"] = {"gke-gcsfuse/volumes": "true"}
        volumes.append(_gcs_volume(data_bucket))
        mounts.append({"name": "gcs-data", "mountPath": data_mount, "readOnly": True})
    container = {
        "name": "train",
        "image": image,
        "args": list(args),
        "env": env,
        "ports": [{"containerPort": p} for p in ports],
        "resources": {"limits": dict(limits), "requests": dict(limits)},
        "volumeMounts": mounts,
    }
    spec: dict = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": grace,
        "nodeSelector": node_selector,
        "tolerations": tolerations,
        "containers": [container],
        "volumes": volumes,
    }
    if service_account:
        spec["serviceAccountName"] = service_account
    return {"metadata": metadata, "spec": spec}


def job_template(pods: int, template: dict) -> dict:
    """A batch/v1 JobTemplateSpec: `pods` indexed pods, any pod failure fails the Job (and so restarts the
    JobSet through its failure policy)."""
    return {"spec": {"parallelism": pods, "completions": pods, "completionMode": "Indexed", "backoffLimit": 0,
                     "template": template}}


def jobset(*, name: str, namespace: Optional[str], replicated_job: str, replicas: int, job: dict,
           max_restarts: int, annotations: dict) -> dict:
    metadata: dict = {"name": name, "labels": {"app.kubernetes.io/name": "openvision-max"}}
    if namespace:
        metadata["namespace"] = namespace
    if annotations:
        metadata["annotations"] = annotations
    return {
        "apiVersion": API_VERSION,
        "kind": "JobSet",
        "metadata": metadata,
        "spec": {
            "failurePolicy": {"maxRestarts": max_restarts},
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
            "successPolicy": {"operator": "All", "targetReplicatedJobs": [replicated_job]},
            "replicatedJobs": [{"name": replicated_job, "replicas": replicas, "template": job}],
        },
    }


def tpu_manifest(*, tpu: str, slices: int, image: str, name: str, args: list[str], data_bucket: Optional[str],
                 data_mount: str = "/data", grace: int = DEFAULT_GRACE_S, max_restarts: int = DEFAULT_MAX_RESTARTS,
                 service_account: Optional[str] = None, namespace: Optional[str] = None) -> dict:
    from openvision_max.config import topology   # standard library only: no JAX, no libtpu
    s = topology.spec(tpu)
    hosts = s.hosts
    if slices > 1 and hosts == 1:
        raise UsageError(f"--slices {slices}: multislice needs multi-host slices, and {tpu} is one host "
                         "(GKE runs multislice on multi-host TPU node pools only)")
    env = [_field_env("JOBSET_NAME", "metadata.annotations['jobset.sigs.k8s.io/jobset-name']"),
           _field_env("REPLICATED_JOB_NAME", "metadata.annotations['jobset.sigs.k8s.io/replicatedjob-name']")]
    ports = [TPU_RUNTIME_PORT]
    if slices > 1:
        env += [
            _field_env("MEGASCALE_NUM_SLICES", "metadata.labels['jobset.sigs.k8s.io/replicatedjob-replicas']"),
            _field_env("MEGASCALE_SLICE_ID", "metadata.labels['jobset.sigs.k8s.io/job-index']"),
            {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": POD0_DNS},
            {"name": "MEGASCALE_PORT", "value": str(MEGASCALE_PORT)},
        ]
        ports.append(MEGASCALE_PORT)
    pod = pod_template(
        image=image, args=args, env=env, limits={"google.com/tpu": s.chips_per_host},
        node_selector={"cloud.google.com/gke-tpu-accelerator": TPU_ACCELERATOR[s.kind],
                       "cloud.google.com/gke-tpu-topology": "x".join(map(str, s.grid))},
        tolerations=[{"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"}],
        ports=ports, grace=grace, data_bucket=data_bucket, data_mount=data_mount, service_account=service_account)
    return jobset(name=name, namespace=namespace, replicated_job="slice", replicas=slices,
                  job=job_template(hosts, pod), max_restarts=max_restarts,
                  annotations={"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"})


def gpu_manifest(*, machine: str, nodes: int, image: str, name: str, args: list[str], data_bucket: Optional[str],
                 data_mount: str = "/data", grace: int = DEFAULT_GRACE_S, max_restarts: int = DEFAULT_MAX_RESTARTS,
                 service_account: Optional[str] = None, namespace: Optional[str] = None) -> dict:
    accelerator, gpus, _ = GPU_MACHINES[machine]
    env = [
        _field_env("JOBSET_NAME", "metadata.annotations['jobset.sigs.k8s.io/jobset-name']"),
        _field_env("REPLICATED_JOB_NAME", "metadata.annotations['jobset.sigs.k8s.io/replicatedjob-name']"),
        # mesh/distributed.py's explicit contract: pod 0 of job 0 in JobSet's headless Service coordinates.
        {"name": "JAX_COORDINATOR_ADDRESS",
         "value": f"{POD0_DNS}:{GPU_COORDINATOR_PORT}"},
        {"name": "JAX_NUM_PROCESSES", "value": str(nodes)},
        _field_env("JAX_PROCESS_ID", "metadata.annotations['batch.kubernetes.io/job-completion-index']"),
    ]
    pod = pod_template(
        image=image, args=args, env=env, limits={"nvidia.com/gpu": gpus},
        node_selector={"cloud.google.com/gke-accelerator": accelerator, "node.kubernetes.io/instance-type": machine},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        ports=[GPU_COORDINATOR_PORT], grace=grace, data_bucket=data_bucket, data_mount=data_mount,
        service_account=service_account)
    return jobset(name=name, namespace=namespace, replicated_job="node", replicas=1, job=job_template(nodes, pod),
                  max_restarts=max_restarts, annotations={})


def to_yaml(manifest: dict, header: str = "") -> str:
    import yaml
    return header + yaml.safe_dump(manifest, sort_keys=False, width=120)


def xpk_tpu_type(tpu: str) -> str:
    """xpk's --tpu-type for a topology name: v5p:4x4x4 -> v5p-128 (v4/v5p count cores), v5e-16 -> v5litepod-16."""
    from openvision_max.config import topology
    s = topology.spec(tpu)
    count = s.chips * topology.CORES_PER_CHIP[s.kind]
    return f"{'v5litepod' if s.kind == 'v5e' else s.kind}-{count}"


def xpk_command(args: argparse.Namespace, container_args: list[str]) -> str:
    command = shlex.join(["python", "train.py", *container_args])
    target = (["--tpu-type", xpk_tpu_type(args.tpu), "--num-slices", str(args.slices)] if args.tpu else
              ["--device-type", GPU_MACHINES[args.gpu][2], "--num-nodes", str(args.nodes)])
    return shlex.join(["xpk", "workload", "create", "--cluster", args.cluster, "--workload", args.name,
                       "--docker-image", args.image, *target, "--max-restarts", str(args.max_restarts),
                       "--command", command])


def canonical_argv(args: argparse.Namespace, command: list[str]) -> list[str]:
    """The options that shaped the manifest, in a fixed order (the header; the same for the same inputs)."""
    own = ["--tpu", args.tpu, "--slices", str(args.slices)] if args.tpu else ["--gpu", args.gpu, "--nodes",
                                                                               str(args.nodes)]
    own += ["--image", args.image, "--name", args.name]
    for flag, value, default in (("--bucket", args.bucket, None), ("--data-bucket", args.data_bucket, None),
                                 ("--data-mount", args.data_mount, "/data"),
                                 ("--max-restarts", args.max_restarts, DEFAULT_MAX_RESTARTS),
                                 ("--grace", args.grace, DEFAULT_GRACE_S),
                                 ("--service-account", args.service_account, None),
                                 ("--namespace", args.namespace, None)):
        if value != default:
            own += [flag, str(value)]
    return [*own, "--", *command]


def header(argv_text: str) -> str:
    return (f"# Generated by: {PROG} {argv_text}\n"
            "# Regenerate rather than edit; `kubectl apply -f` this file on a cluster with JobSet installed.\n")


# ---------------------------------------------------------------------------------------------------- main

def build(args: argparse.Namespace, command: list[str]) -> tuple[dict, list[str]]:
    """(the manifest, the container's args) for parsed arguments; raises UsageError or ConfigError."""
    if not NAME_RE.match(args.name):
        raise UsageError(f"--name {args.name!r}: lower-case letters, digits and '-', starting with a letter, at "
                         "most 40 characters (it names the JobSet, its pods and the run)")
    for flag, value in (("--bucket", args.bucket), ("--data-bucket", args.data_bucket)):
        if value is not None and not re.match(r"^gs://[a-z0-9][-_.a-z0-9]*(/.*)?$", value):
            raise UsageError(f"{flag} {value!r} is not a gs://BUCKET[/path] URI")
    if args.gpu and args.nodes is None:
        raise UsageError("--gpu needs --nodes N")
    if args.tpu and args.nodes is not None:
        raise UsageError("--nodes is for --gpu; a TPU slice's hosts come from --tpu")
    if args.gpu and args.slices != 1:
        raise UsageError("--slices is for --tpu")
    if args.check_memory and not args.tpu:
        raise UsageError("--check-memory compiles for a TPU topology; it needs --tpu")
    if not args.data_mount.startswith("/"):
        raise UsageError(f"--data-mount {args.data_mount!r} must be an absolute path")
    container_args = training_args(command, args.name, args.bucket)
    data_bucket = args.data_bucket or args.bucket
    common = dict(image=args.image, name=args.name, args=container_args, data_bucket=data_bucket,
                  data_mount=args.data_mount, grace=args.grace, max_restarts=args.max_restarts,
                  service_account=args.service_account, namespace=args.namespace)
    if args.max_restarts < 0:
        raise UsageError(f"--max-restarts must be at least 0, not {args.max_restarts}")
    if args.tpu:
        from openvision_max.config import topology
        from openvision_max.config.schema import ConfigError
        try:
            topology.spec(args.tpu).hosts   # a bad name, before the config is read
        except ConfigError as e:
            raise UsageError(f"--tpu {args.tpu}: {e}") from None
        validate_config(container_args, tpu=args.tpu, slices=args.slices, gpus=0)
        manifest = tpu_manifest(tpu=args.tpu, slices=args.slices, **common)
    else:
        validate_config(container_args, tpu=None, slices=1, gpus=GPU_MACHINES[args.gpu][1] * args.nodes)
        manifest = gpu_manifest(machine=args.gpu, nodes=args.nodes, **common)
    return manifest, container_args


def run_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, command: Optional[list[str]]) -> int:
    if command is None:
        parser.error("put `--` before the training command: -- CONFIG [key=value ...]")
    if not command:
        parser.error("no config after `--`: -- CONFIG [key=value ...]")
    from openvision_max.config.schema import ConfigError
    try:
        manifest, container_args = build(args, command)
        if args.check_memory:
            check_memory(args.program, container_args, args.tpu, args.slices)
    except (UsageError, ConfigError) as e:
        kind = "config error: " if isinstance(e, ConfigError) else ""
        print(f"{PROG}: error: {kind}{e}", file=sys.stderr)
        return 2
    if not (args.bucket or any(a.startswith("base_output_directory=gs://") for a in container_args)):
        print(f"{PROG}: warning: no --bucket: checkpoints stay in the container and a restarted JobSet starts "
              "the run again instead of resuming it", file=sys.stderr)
    text = to_yaml(manifest, header(shlex.join(canonical_argv(args, command))))
    if args.dry_run:
        sys.stdout.write(text)
        return 0
    path = args.output or pathlib.Path(f"{args.name}.jobset.yaml")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        print(f"{PROG}: error: cannot write {path}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    print(f"  kubectl apply -f {shlex.quote(str(path))}")
    print(f"  or with xpk: {xpk_command(args, container_args)}")
    return 0
