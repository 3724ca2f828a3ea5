"""Offline checks of the KubeRay RayJob manifests in k8s/ (no Kubernetes, no Ray cluster).

They keep a manifest in step with the product: its entrypoint parses with e2kd's own CLI
parser, the spec it names exists and loads, the image carries the Ray version pinned in
constraints.txt, the head offers the spec's driver resource, the GPU group can hold one
trial, the pods mount every local path the spec uses, and secrets come from Secrets.

The field names are those of KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1,
rayjob_types.go and raycluster_types.go, KubeRay 1.7): unknown keys are pruned silently by
the API server, so a misspelt field (`minReplica`) would be lost without an error.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import build_parser
from orchestrator.spec import DRIVER_RESOURCE_AMOUNT, load_spec

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
DOCKERFILE = K8S / "Dockerfile"
MANIFESTS = sorted(K8S.glob("rayjob-*.yaml"))

# Fields of the ray.io/v1 types this project uses or may use (from the Go json tags).
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
    "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
    "entrypointNumGpus", "ttlSecondsAfterFinished", "preRunningDeadlineSeconds",
    "shutdownAfterJobFinishes", "suspend",
}
RAYCLUSTER_SPEC_FIELDS = {
    "upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
    "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "historyServerOptions", "networkPolicy", "tlsOptions", "headGroupSpec", "rayVersion",
    "workerGroupSpecs",
}
HEAD_GROUP_FIELDS = {"template", "headService", "enableIngress", "ingressOptions", "resources", "labels",
                     "rayStartParams", "serviceType"}
WORKER_GROUP_FIELDS = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                       "priority", "resources", "labels", "rayStartParams", "template", "scaleStrategy",
                       "numOfHosts"}
WORKER_GROUP_REQUIRED = {"groupName", "minReplicas", "maxReplicas", "template"}
SECRET_NAMES = re.compile(r"(SECRET|TOKEN|PASSWORD|ACCESS_KEY)", re.I)


def load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def ray_pin() -> str:
    m = re.search(r"^ray==(\S+)", (ROOT / "constraints.txt").read_text(), re.M)
    assert m, "constraints.txt pins no ray version"
    return m.group(1)


def dockerfile() -> tuple[str, str]:
    """(base image, WORKDIR) of k8s/Dockerfile."""
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, re.M)
    (workdir,) = re.findall(r"^WORKDIR\s+(\S+)", text, re.M)
    return base, workdir


def entrypoint_calls(doc: dict) -> list:
    """Every `e2kd` call of the entrypoint (joined by &&), as e2kd's parser reads it."""
    calls = []
    parser = build_parser()
    for part in doc["spec"]["entrypoint"].split("&&"):
        argv = shlex.split(part)
        assert argv and argv[0] == "e2kd", f"each entrypoint command must be an `e2kd` call: {argv}"
        try:
            args = parser.parse_args(argv[1:])
        except SystemExit as e:  # argparse exits on an unknown option
            raise AssertionError(f"entrypoint does not parse with e2kd's CLI: {argv}") from e
        # argparse also accepts abbreviations (--addr): the manifest spells options out in full.
        sub = parser._subparsers._group_actions[0].choices[args.command]
        for opt in (a.split("=", 1)[0] for a in argv[2:] if a.startswith("--")):
            assert opt in sub._option_string_actions, f"entrypoint does not parse with e2kd's CLI: {opt} (abbreviated?)"
        calls.append(args)
    return calls


def entrypoint_args(doc: dict):
    """The entrypoint's `e2kd sweep` call (the last command)."""
    return entrypoint_calls(doc)[-1]


def in_checkout(path: str) -> Path:
    """A path in the image's WORKDIR, mapped to this checkout."""
    _, workdir = dockerfile()
    if os.path.isabs(path):
        assert path.startswith(workdir.rstrip("/") + "/"), f"{path} is not in the image's WORKDIR {workdir}"
        path = os.path.relpath(path, workdir)
    return ROOT / path


def spec_file(doc: dict) -> Path:
    """The spec path of the entrypoint, mapped from the image's WORKDIR to this checkout."""
    return in_checkout(entrypoint_args(doc).spec)


def spec_of(doc: dict):
    args = entrypoint_args(doc)
    return load_spec(str(spec_file(doc)), args.set or [])


def groups(doc: dict) -> list[dict]:
    rc = doc["spec"]["rayClusterSpec"]
    return [rc["headGroupSpec"], *rc.get("workerGroupSpecs", [])]


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def ray_container(group: dict) -> dict:
    return containers(group)[0]  # KubeRay: the Ray container is the first one


def quantity(value) -> float:
    """A Kubernetes CPU/GPU quantity ("8", 8, "500m") as a number."""
    s = str(value)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def limits(container: dict) -> dict:
    return container.get("resources", {}).get("limits", {})


def mount_problems(doc: dict, spec) -> list[str]:
    """Local paths of the spec that some pod (head or GPU worker) does not mount."""
    t = spec.train
    paths = {"storage": spec.storage, "data.root": t.data.root, "teacher.path": t.teacher.path,
             "teacher.cache_dir": t.teacher.cache_dir, "student_weights": t.student_weights}
    problems = []
    for field, p in paths.items():
        if not p:
            continue
        if "://" in p:
            if not p.startswith(("s3://", "gs://")):
                problems.append(f"{field}: {p} is neither mounted nor s3:// / gs://")
            continue
        for g in groups(doc):
            mounts = [m["mountPath"].rstrip("/") for m in ray_container(g).get("volumeMounts", [])]
            if not any(p == m or p.startswith(m + "/") for m in mounts):
                problems.append(f"{field}: {p} is not under a volumeMount of {g.get('groupName', 'the head')}")
    return problems


@pytest.fixture(params=MANIFESTS, ids=lambda p: p.name)
def manifest(request) -> dict:
    return load(request.param)


def test_there_is_a_manifest():
    assert [p.name for p in MANIFESTS] == ["rayjob-imagenet-50shot-resnet.yaml"]


def test_crd_fields(manifest):
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayJob"
    assert manifest["metadata"]["name"]
    spec = manifest["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, set(spec) - RAYJOB_SPEC_FIELDS
    assert spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    rc = spec["rayClusterSpec"]
    assert set(rc) <= RAYCLUSTER_SPEC_FIELDS, set(rc) - RAYCLUSTER_SPEC_FIELDS
    assert rc["enableInTreeAutoscaling"] is True
    head = rc["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_FIELDS, set(head) - HEAD_GROUP_FIELDS
    assert containers(head)
    assert rc["workerGroupSpecs"]
    for g in rc["workerGroupSpecs"]:
        assert WORKER_GROUP_REQUIRED <= set(g) <= WORKER_GROUP_FIELDS, g.get("groupName")
        assert g["minReplicas"] <= g["maxReplicas"]
        assert containers(g)


def test_entrypoint_parses_with_the_cli(manifest):
    args = entrypoint_args(manifest)
    assert args.command == "sweep"
    assert args.address == "auto"  # the job's own cluster, never a new local instance
    assert spec_file(manifest).is_file(), spec_file(manifest)


def test_entrypoint_checker_rejects_unknown_option(manifest):
    for bad in (" --adress x", " --addr auto"):
        planted = {**manifest, "spec": {**manifest["spec"], "entrypoint": manifest["spec"]["entrypoint"] + bad}}
        with pytest.raises(AssertionError, match="does not parse"):
            entrypoint_args(planted)


def test_spec_loads_and_needs_gpus(manifest):
    spec = spec_of(manifest)
    assert spec.resources.use_gpu and spec.resources.gpus_per_trial >= 1
    assert spec.storage.startswith("s3://")  # no shared disk between pods: results go to S3


def test_image_has_the_pinned_ray(manifest):
    pin = ray_pin()
    base, _ = dockerfile()
    assert base == f"rayproject/ray:{pin}-py311-gpu"
    rc = manifest["spec"]["rayClusterSpec"]
    assert rc["rayVersion"] == pin
    images = {ray_container(g)["image"] for g in groups(manifest)}
    assert len(images) == 1, f"head and workers must run the same image: {images}"
    (image,) = images
    # Either the stock image of the pinned Ray, or the project image built from k8s/Dockerfile.
    assert image.startswith(f"rayproject/ray:{pin}-") or image.split(":")[0].endswith("/e2kd"), image


def test_git_commit_matches_image_tag(manifest):
    env = yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])["env_vars"]
    commit = env["E2KD_GIT_COMMIT"]
    image = ray_container(manifest["spec"]["rayClusterSpec"]["headGroupSpec"])["image"]
    assert image.rsplit(":", 1)[1] == commit, "image tag and E2KD_GIT_COMMIT must name the same commit"


def test_head_offers_the_driver_resource(manifest):
    spec = spec_of(manifest)
    name = spec.resources.driver_resource
    assert name, "the spec pins Tune drivers with resources.driver_resource"
    rc = manifest["spec"]["rayClusterSpec"]
    head = rc["headGroupSpec"]
    assert float(head.get("resources", {}).get(name, 0)) >= DRIVER_RESOURCE_AMOUNT
    assert quantity(limits(ray_container(head)).get("cpu", 0)) >= spec.resources.driver_cpus
    assert head.get("rayStartParams", {}).get("num-gpus") == "0"
    # Drivers stay off the (possibly preempted) GPU pods.
    for g in rc["workerGroupSpecs"]:
        assert name not in (g.get("resources") or {}), g["groupName"]
        assert name not in str(g.get("rayStartParams", {})), g["groupName"]


def test_gpu_group_holds_a_trial(manifest):
    r = spec_of(manifest).resources
    gpu_groups = [g for g in manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]
                  if quantity(limits(ray_container(g)).get("nvidia.com/gpu", 0)) > 0]
    assert gpu_groups, "no worker group with limits nvidia.com/gpu"
    for g in gpu_groups:
        assert g["minReplicas"] == 0, "GPU pods only while trials need them"
    gpus = sum(quantity(limits(ray_container(g))["nvidia.com/gpu"]) * g["maxReplicas"] for g in gpu_groups)
    cpus = sum(quantity(limits(ray_container(g)).get("cpu", 0)) * g["maxReplicas"] for g in gpu_groups)
    assert gpus >= r.workers_per_trial * r.gpus_per_worker
    assert cpus >= r.workers_per_trial * r.cpus_per_worker


def test_pods_mount_the_specs_paths(manifest):
    spec = spec_of(manifest)
    assert mount_problems(manifest, spec) == []
    # Every volumeMount has a volume of its pod.
    for g in groups(manifest):
        volumes = {v["name"] for v in g["template"]["spec"].get("volumes", [])}
        for m in ray_container(g).get("volumeMounts", []):
            assert m["name"] in volumes, (g.get("groupName", "head"), m)


def test_mount_checker_catches_a_missing_mount(manifest):
    import copy

    spec = spec_of(manifest)
    planted = copy.deepcopy(manifest)
    worker = planted["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    ray_container(worker)["volumeMounts"] = [m for m in ray_container(worker)["volumeMounts"]
                                             if m["mountPath"] != "/mnt/data"]
    assert [p for p in mount_problems(planted, spec) if p.startswith("data.root:")]


def test_secrets_come_from_secrets(manifest):
    rc = manifest["spec"]["rayClusterSpec"]
    assert rc["authOptions"]["mode"] == "token"
    token_secret = rc["authOptions"]["secretName"]
    for g in groups(manifest):
        c = ray_container(g)
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": token_secret, "key": "auth_token"}
        for name, e in env.items():
            assert not (SECRET_NAMES.search(name) and "value" in e), f"{name} is written into the manifest"
        refs = [s["secretRef"]["name"] for s in c.get("envFrom", []) if "secretRef" in s]
        assert "e2kd-aws" in refs  # AWS_* (and AWS_ENDPOINT_URL for MinIO) from a Secret
    text = yaml.safe_dump(manifest)
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)  # no AWS access key id
    runtime_env = yaml.safe_load(manifest["spec"].get("runtimeEnvYAML") or "{}")
    for name in runtime_env.get("env_vars", {}):
        assert not SECRET_NAMES.search(name), f"{name} in runtimeEnvYAML is visible in the job's metadata"


def test_node_groups_on_record_match_the_manifest(manifest):
    """The entrypoint first records the node groups (`e2kd capacity --publish`), and that file
    describes exactly this manifest's groups: a head-only start is judged by what the GPU group
    can add, not refused."""
    from orchestrator.cluster import cluster_config_from_autoscaler

    (cap, sweep) = entrypoint_calls(manifest)
    assert cap.command == "capacity" and cap.address == "auto" and sweep.command == "sweep"
    node_types = yaml.safe_load(in_checkout(cap.publish).read_text())
    types = node_types["available_node_types"]
    rc = manifest["spec"]["rayClusterSpec"]
    head = types[node_types["head_node_type"]]["resources"]
    hc = limits(ray_container(rc["headGroupSpec"]))
    assert head["CPU"] == quantity(hc["cpu"]) and head.get("GPU", 0) == 0
    for k, v in (rc["headGroupSpec"].get("resources") or {}).items():
        assert head.get(k) == float(v), k
    for g in rc["workerGroupSpecs"]:
        t = types[g["groupName"]]
        lim = limits(ray_container(g))
        assert t["resources"].get("CPU") == quantity(lim.get("cpu", 0)), g["groupName"]
        assert t["resources"].get("GPU", 0) == quantity(lim.get("nvidia.com/gpu", 0)), g["groupName"]
        assert (t.get("min_workers", 0), t["max_workers"]) == (g["minReplicas"], g["maxReplicas"]), g["groupName"]
    assert set(types) == {node_types["head_node_type"]} | {g["groupName"] for g in rc["workerGroupSpecs"]}
    cluster_config_from_autoscaler(node_types)  # a valid record
