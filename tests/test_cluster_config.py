"""Offline checks of cluster.yaml / cluster-local.yaml.

* Ray's own validation, i.e. what `ray up` applies before it touches a cloud:
  `prepare_config` (merges the provider's defaults.yaml, fills min/max_workers, merges
  setup commands) followed by `validate_config` (ray-schema.json + cross-field checks).
  For AWS, `prepare_config` only reads ray/autoscaler/aws/defaults.yaml: no boto3, no
  network. The `no_network` fixture makes any socket use fail and asserts no cloud SDK
  got imported, so this stays true.
* Planted errors that the validation must reject.
* Security properties parsed from the YAML (nothing but SSH open to the world, MLflow
  and the dashboard not bound to all interfaces, token auth everywhere).
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import click
import jsonschema
import pytest
import yaml

import ray
from ray.autoscaler._private.util import prepare_config, validate_config

from orchestrator.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
AWS = ROOT / "cluster.yaml"
LOCAL = ROOT / "cluster-local.yaml"
CONFIGS = [AWS, LOCAL]
WORLD = {"0.0.0.0/0", "::/0"}
ALL_INTERFACES = {"0.0.0.0", "::", "[::]", "*"}


def _is_cluster_spec(path: Path) -> bool:
    storage = str(yaml.safe_load(path.read_text()).get("storage", "runs"))
    return "://" in storage or os.path.isabs(storage)


# The shipped specs meant for a cluster: those whose `storage` is not a plain relative path.
CLUSTER_SPECS = sorted(p for p in (ROOT / "sweeps").glob("*.yaml") if _is_cluster_spec(p))
CLOUD_SDKS = ("boto3", "botocore", "googleapiclient", "azure.mgmt", "aliyunsdkcore")


def load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


@pytest.fixture
def no_network(monkeypatch):
    """Fail on any attempt to open a network connection or resolve a name."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    already = {m for m in sys.modules if m.startswith(CLOUD_SDKS)}
    yield
    imported = {m for m in sys.modules if m.startswith(CLOUD_SDKS)} - already
    assert not imported, f"validation imported cloud SDKs: {sorted(imported)}"


def ray_validate(config: dict) -> dict:
    """What `ray up` does to the file before any provider call."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# --------------------------------------------------------------------------- helpers


def all_commands(config: dict) -> list[str]:
    keys = (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    return [c for k in keys for c in config.get(k) or []]


def mlflow_command(config: dict) -> str:
    cmds = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert len(cmds) == 1, "exactly one head start command must start MLflow"
    return cmds[0]


def mlflow_server_args(cmd: str) -> list[str]:
    """The argv of `mlflow server ...` inside the (shell) command."""
    tokens = shlex.split(cmd.replace(";", " ; "), posix=True)
    start = tokens.index("mlflow") if "mlflow" in tokens else None
    assert start is not None and tokens[start + 1] == "server", tokens
    args = []
    for t in tokens[start + 2 :]:
        if t in {";", "&", "&&", "||", "|"} or t.startswith((">", "2>")):
            break
        args.append(t)
    return args


def option(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def mlflow_binding_problems(cmd: str) -> list[str]:
    args = mlflow_server_args(cmd)
    host = option(args, "--host") or option(args, "-h")
    problems = []
    if host is None:
        problems.append("no --host (MLflow would bind 127.0.0.1, unreachable by workers)")
    elif host.strip('"') in ALL_INTERFACES or "0.0.0.0" in host:
        problems.append(f"MLflow binds all interfaces: --host {host}")
    if "0.0.0.0" in cmd:
        problems.append("0.0.0.0 appears in the MLflow command")
    return problems


def world_open_non_ssh(ip_permissions: list[dict]) -> list[dict]:
    """Ingress rules reachable from anywhere that are not exactly tcp/22."""
    bad = []
    for rule in ip_permissions or []:
        cidrs = {r.get("CidrIp") for r in rule.get("IpRanges", [])}
        cidrs |= {r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])}
        if not cidrs & WORLD:
            continue
        is_ssh = (
            rule.get("IpProtocol") == "tcp"
            and rule.get("FromPort") == 22
            and rule.get("ToPort") == 22
        )
        if not is_ssh:
            bad.append(rule)
    return bad


def ray_start_commands(config: dict) -> list[str]:
    return [
        c
        for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
        if "ray start" in c
    ]


NFS_MOUNT = re.compile(r"mount -t nfs4 -o (?P<opts>\S+)\s+(?P<server>[^\s:]+):(?P<export>/\S*)\s+(?P<target>/\S+)")


def nfs_mounts(config: dict) -> dict[str, str]:
    """Host mount point -> its initialization command, for every NFS mount the file makes.
    Only a guarded mount counts: initialization_commands run on every `ray up`, and a
    second `mount` of the same path would fail (or stack mounts)."""
    found = {}
    for cmd in config.get("initialization_commands") or []:
        for m in NFS_MOUNT.finditer(cmd):
            target = m["target"].rstrip(")")
            if f"mountpoint -q {target} ||" in cmd:
                found[target] = cmd
    return found


def normalize_mount(cmd: str) -> str:
    return NFS_MOUNT.sub(lambda m: f"mount -t nfs4 -o OPTS SERVER:{m['export']} {m['target']}", cmd)


def container_mounts(options: list[str]) -> dict[str, str]:
    """Container path -> host path of every `-v HOST:CONTAINER[:MODE]` / `--volume` option."""
    mounts = {}
    for opt in options or []:
        tokens = shlex.split(opt)
        for flag, value in zip(tokens, tokens[1:]):
            if flag in ("-v", "--volume"):
                host, container = value.split(":")[:2]
                mounts[container.rstrip("/")] = host.rstrip("/")
    return mounts


def under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def spec_paths(spec) -> dict[str, str]:
    """Every location a sweep reads or writes, by spec field (absolute paths and URIs)."""
    t = spec.train
    paths = {"storage": spec.storage, "data.root": t.data.root, "teacher.path": t.teacher.path,
             "teacher.cache_dir": t.teacher.cache_dir, "student_weights": t.student_weights,
             "mlflow.artifact_location": spec.mlflow.artifact_location}
    if spec.mlflow.tracking_uri.startswith("sqlite:///"):
        paths["mlflow.tracking_uri"] = spec.mlflow.tracking_uri[len("sqlite://"):]
    return {k: v for k, v in paths.items() if v}


def storage_problems(config: dict, spec) -> list[str]:
    """Spec locations that a Ray Train worker in this cluster's containers could not reach.
    Only docker.run_options count: they apply to every node, head_run_options only to the
    head, and trials (data, teacher, checkpoints) run on the workers."""
    mounts = container_mounts(config["docker"].get("run_options"))
    problems = []
    for field, p in spec_paths(spec).items():
        if "://" in p:
            if not p.startswith(("s3://", "gs://")):
                problems.append(f"{field}: {p} is neither a mounted path nor s3:// / gs://")
        elif not os.path.isabs(p):
            problems.append(f"{field}: {p} is relative: the workers do not share the driver's directory")
        elif not any(under(p, c) for c in mounts):
            problems.append(f"{field}: {p} is under no `-v HOST:CONTAINER` of docker.run_options {sorted(mounts)}")
    return problems


def host_path_problems(config: dict) -> list[str]:
    """Host paths bind-mounted into the container that initialization_commands do not
    provide: run_options paths (shared data) must be NFS-mounted, head_run_options paths
    (MLflow's database) at least created. Docker would otherwise create an empty local
    directory and the container would see no data."""
    docker = config["docker"]
    init = config.get("initialization_commands") or []
    mounted = nfs_mounts(config)
    problems = []
    for host in container_mounts(docker.get("run_options")).values():
        if host not in mounted:
            problems.append(f"{host}: bind-mounted by docker.run_options but not mounted by initialization_commands")
    for host in container_mounts(docker.get("head_run_options")).values():
        if host not in mounted and not any(re.search(rf"mkdir -p {re.escape(host)}(\s|$)", c) for c in init):
            problems.append(f"{host}: bind-mounted by docker.head_run_options but not created by initialization_commands")
    return problems


# --------------------------------------------------------------- Ray's own validation


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_ray_validation_passes_offline(path, no_network):
    prepared = ray_validate(load(path))
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_aws_node_types(no_network):
    cfg = ray_validate(load(AWS))
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU") == 0
    assert head["resources"].get("TRAIN_DRIVER_RESOURCE", 0) >= 1
    assert head["max_workers"] == 0

    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    assert len(workers) >= 2
    for name, t in workers.items():
        assert t["min_workers"] == 0, name
        assert t["max_workers"] >= 1, name
        # Tune drivers must not land on (possibly preempted) GPU nodes.
        assert "TRAIN_DRIVER_RESOURCE" not in t["resources"], name
    instance_types = {t["node_config"]["InstanceType"] for t in workers.values()}
    assert {"g5.2xlarge", "g5.12xlarge"} <= instance_types  # 1-GPU and 4-GPU types


def test_local_provider(no_network):
    raw = load(LOCAL)
    assert raw["provider"]["type"] == "local"
    assert raw["provider"]["head_ip"] and raw["provider"]["worker_ips"]
    cfg = ray_validate(raw)
    (node_type,) = cfg["available_node_types"].values()
    n = len(raw["provider"]["worker_ips"])
    assert node_type["min_workers"] == node_type["max_workers"] == n
    # The local provider ignores node-type resources: the driver resource must be
    # declared on the head's `ray start`.
    # ...on that command itself (it once trailed the next command's `|| echo`, where it was text).
    (start,) = [c for c in raw["head_start_ray_commands"] if "ray start --head" in c]
    assert "--resources='{\"TRAIN_DRIVER_RESOURCE\": 8}'" in start and "--num-gpus=0" in start
    assert not any("TRAIN_DRIVER_RESOURCE" in c for c in raw["head_start_ray_commands"] if c is not start)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_local_head_runs_autoscaler_v1():
    """`ray up` prefixes the head's start commands with RAY_enable_autoscaler_v2=1 (Ray >= 2.50);
    with the local provider v2 never starts the worker_ips (tests/test_cluster_launch.py found it),
    so cluster-local.yaml's `ray start --head` must still see 0. Ray's own prefixing, then bash."""
    from ray.autoscaler._private.util import with_envs  # what `ray up` applies (commands.py)

    (start,) = [c for c in load(LOCAL)["head_start_ray_commands"] if "ray start --head" in c]
    (prefixed,) = with_envs([start], {"RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": "x",
                                      "RAY_NODE_TYPE_NAME": "local.cluster.node"})
    assert "RAY_enable_autoscaler_v2=1" in prefixed  # Ray still prefixes it (else this test is moot)
    before_start = prefixed.split("ray start --head")[0]
    res = subprocess.run(["bash", "-c", before_start + ' echo "v2=$RAY_enable_autoscaler_v2"'],
                         capture_output=True, text=True, timeout=30)
    assert res.stdout.strip().splitlines()[-1] == "v2=0", (res.stdout, res.stderr)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_installs_project_from_synced_dir(path):
    cfg = load(path)
    assert cfg["file_mounts"].get("~/e2kd") == "."
    assert any(
        "cd ~/e2kd" in c and "pip install" in c and "-c constraints.txt" in c and "-e ." in c
        for c in cfg["setup_commands"]
    )
    assert ".gitignore" in cfg.get("rsync_filter", [])  # keeps .venv etc. off the nodes


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_image_matches_installed_ray(path):
    image = load(path)["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{ray.__version__}-py311")
    assert f"ray=={ray.__version__}" in (ROOT / "constraints.txt").read_text()


def test_local_uses_same_commands_as_aws():
    aws, local = load(AWS), load(LOCAL)
    for key in ("setup_commands", "worker_start_ray_commands"):
        assert [c.replace("/home/ubuntu", "$HOME") for c in aws[key]] == local[key], key
    # Host preparation: identical except for the NFS server and its mount options (EFS
    # wants noresvport, which a default Linux NFS export, `secure`, refuses), and the
    # on-premise /mnt/shared mount that stands in for S3 there.
    local_only = set(nfs_mounts(local)) - set(nfs_mounts(aws))
    assert local_only == {"/mnt/shared"}, local_only
    aws_init = [normalize_mount(c.replace("/home/ubuntu", "$HOME")) for c in aws["initialization_commands"]]
    local_init = [normalize_mount(c) for c in local["initialization_commands"]
                  if not any(f" {t}" in c for t in local_only) or "mount.nfs4" in c]
    # ... and the NFS client's guard names that mount too.
    local_init = [re.sub(r"".join(rf" && mountpoint -q {t}(?= )" for t in local_only), "", c) for c in local_init]
    assert aws_init == local_init
    # The same bind mounts into the container (head and workers).
    assert set(container_mounts(aws["docker"]["run_options"]).items()) <= set(
        container_mounts(local["docker"]["run_options"]).items())
    # MLflow: identical except where artifacts go (S3 vs. the head's disk).
    strip = re.compile(r"--artifacts-destination\s+\S+")
    assert strip.sub("", mlflow_command(aws)) == strip.sub("", mlflow_command(local))


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_commands_are_valid_bash(path):
    for cmd in all_commands(load(path)):
        res = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert res.returncode == 0, f"{cmd!r}: {res.stderr}"


# ------------------------------------------------------------------- planted errors


def _unknown_top_level_key(cfg):
    cfg["max_wokers"] = 3


def _fractional_gpu(cfg):
    node_type = next(iter(cfg["available_node_types"]))
    cfg["available_node_types"][node_type]["resources"]["GPU"] = 0.5


def _bad_head_node_type(cfg):
    cfg["head_node_type"] = "no-such-type"


def _missing_resources(cfg):
    node_type = next(iter(cfg["available_node_types"]))
    del cfg["available_node_types"][node_type]["resources"]


def _unknown_node_type_key(cfg):
    node_type = next(iter(cfg["available_node_types"]))
    cfg["available_node_types"][node_type]["min_worker"] = 1


def _min_workers_above_global_max(cfg):
    for t in cfg["available_node_types"].values():
        t["min_workers"] = t["max_workers"] = cfg["max_workers"]


PLANTED = {
    "unknown-top-level-key": (_unknown_top_level_key, "Additional properties"),
    "fractional-gpu": (_fractional_gpu, "is not of type 'integer'"),
    "head-node-type-not-a-node-type": (_bad_head_node_type, "must be one of"),
    "missing-resources": (_missing_resources, "'resources' is a required property"),
    "unknown-node-type-key": (_unknown_node_type_key, "Additional properties"),
    "min-workers-above-max": (_min_workers_above_global_max, "smaller than the sum"),
}


@pytest.mark.parametrize("plant", PLANTED, ids=list(PLANTED))
def test_planted_error_is_rejected(plant, no_network):
    mutate, message = PLANTED[plant]
    cfg = load(AWS)
    ray_validate(cfg)  # sanity: the unmodified file passes
    mutate(cfg)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
        ray_validate(cfg)


def test_local_planted_unknown_key_is_rejected(no_network):
    cfg = load(LOCAL)
    cfg["head_ips"] = ["10.0.0.1"]
    with pytest.raises(jsonschema.ValidationError, match="Additional properties"):
        ray_validate(cfg)


@pytest.mark.parametrize("field", ["head_ip", "worker_ips"])
def test_local_requires_hosts(field, no_network):
    cfg = load(LOCAL)
    del cfg["provider"][field]
    with pytest.raises(click.ClickException, match="head_ip"):
        ray_validate(cfg)


def test_local_rejects_node_types(no_network):
    cfg = load(LOCAL)
    cfg["available_node_types"] = {"gpu": {"resources": {"GPU": 1}, "node_config": {}}}
    cfg["head_node_type"] = "gpu"
    with pytest.raises(click.ClickException, match="not supported for on-premise"):
        ray_validate(cfg)


# ------------------------------------------------------------------------- security


def test_no_ingress_open_to_world_except_ssh():
    cfg = load(AWS)
    rules = cfg["provider"].get("security_group", {}).get("IpPermissions", [])
    assert world_open_non_ssh(rules) == []
    # A group Ray creates itself always gets tcp/22 from 0.0.0.0/0 and extra rules on
    # top; every node type therefore names a pre-created group (22 from YOUR CIDR).
    for name, t in cfg["available_node_types"].items():
        assert t["node_config"].get("SecurityGroupIds"), name
    # No Ray port published beyond the security group: no -p/--publish in docker options.
    docker = cfg["docker"]
    for opt in docker.get("run_options", []) + docker.get("head_run_options", []):
        assert not re.match(r"^(-p|--publish)\b", opt), opt


def test_world_open_checker_catches_planted_rules():
    world_8265 = {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265,
                  "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    world_all_v6 = {"IpProtocol": "-1", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}
    world_ssh = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                 "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    cidr_5000 = {"IpProtocol": "tcp", "FromPort": 5000, "ToPort": 5000,
                 "IpRanges": [{"CidrIp": "203.0.113.0/24"}]}
    assert world_open_non_ssh([world_8265, world_all_v6, world_ssh, cidr_5000]) == [
        world_8265,
        world_all_v6,
    ]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_mlflow_on_private_address(path):
    cmd = mlflow_command(load(path))
    assert mlflow_binding_problems(cmd) == []
    args = mlflow_server_args(cmd)
    assert option(args, "--host") == "${MLFLOW_HOST}"
    # MLFLOW_HOST = the address Ray advertises for the head, not the first of
    # `hostname -I` (docker0 / a secondary interface on some hosts).
    assert "hostname -I" not in cmd
    assert "find_bootstrap_address" in cmd
    assert option(args, "--port") == "5000"
    backend = option(args, "--backend-store-uri")
    assert backend.startswith("sqlite:///${HOME}/")
    assert option(args, "--artifacts-destination")
    assert "nohup mlflow server" in cmd


def test_mlflow_aws_artifacts_on_s3():
    args = mlflow_server_args(mlflow_command(load(AWS)))
    assert option(args, "--artifacts-destination").startswith("s3://")


def test_mlflow_checker_catches_planted_binding():
    cmd = mlflow_command(load(AWS))
    for bad_host in ("0.0.0.0", "::"):
        planted = cmd.replace('--host "${MLFLOW_HOST}"', f"--host {bad_host}")
        assert planted != cmd
        assert mlflow_binding_problems(planted)
    assert mlflow_binding_problems(cmd.replace('--host "${MLFLOW_HOST}" ', ""))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_dashboard_not_on_all_interfaces(path):
    (head_start,) = [c for c in load(path)["head_start_ray_commands"] if "ray start" in c]
    host = re.search(r"--dashboard-host[= ](\S+)", head_start)
    # Ray's AWS default is 0.0.0.0; `ray dashboard` forwards to the head's localhost.
    assert host and host.group(1) == "127.0.0.1"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_token_auth_everywhere(path):
    cfg = load(path)
    starts = ray_start_commands(cfg)
    assert len(starts) == 2
    for cmd in starts:
        assert cmd.lstrip().startswith("export RAY_AUTH_MODE=token;"), cmd
    # The token reaches every node, and interactive shells (ray exec/attach) use it too.
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert any("export RAY_AUTH_MODE=token" in c for c in cfg["setup_commands"])
    assert "RAY_AUTH_MODE=disabled" not in yaml.safe_dump(cfg)


# ------------------------------------------------------------- storage and data mounts


def test_cluster_specs_found():
    names = {p.name for p in CLUSTER_SPECS}
    assert {"imagenet-50shot-resnet.yaml", "imagenet-50shot-bcos.yaml", "waterbirds.yaml", "voc.yaml"} <= names
    assert "quickstart.yaml" not in names  # storage: runs (a local instance)


@pytest.mark.parametrize("spec_path", CLUSTER_SPECS, ids=lambda p: p.name)
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_spec_paths_reachable_in_containers(path, spec_path):
    """Every local path a cluster spec names lies under a bind mount of the cluster's
    containers (or is s3:// / gs://), and that mount's host path is provided by the file."""
    cfg = load(path)
    spec = load_spec(str(spec_path))
    assert storage_problems(cfg, spec) == []
    assert host_path_problems(cfg) == []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_nfs_mounts_are_guarded_and_marked_edit(path):
    cfg = load(path)
    mounts = nfs_mounts(cfg)
    assert {"/mnt/data", "/mnt/models"} <= set(mounts)
    text = path.read_text()
    for target, cmd in mounts.items():
        server = NFS_MOUNT.search(cmd)["server"]
        assert "REPLACE-ME" in server, f"{target}: the NFS server is a placeholder the user must edit"
        # mkdir and mount only when not mounted yet: `ray up` reruns initialization_commands.
        assert cmd.startswith(f"mountpoint -q {target} ||"), cmd
    assert "EDIT: fs-REPLACE-ME" in text or "EDIT: nfs.REPLACE-ME" in text
    # The NFS client is installed only when a share is not mounted yet: hosts that mount them
    # beforehand (the documented alternative; tests/test_cluster_launch.py's hosts) need neither
    # nfs-common nor sudo. The guard names exactly the mounts the file makes.
    (client,) = [c for c in cfg["initialization_commands"] if "nfs-common" in c]
    guard = client.split("||")[0]
    assert set(re.findall(r"mountpoint -q (\S+)", guard)) == set(mounts), guard
    assert guard.strip() == " && ".join(f"mountpoint -q {t}" for t in sorted(mounts, key=guard.index)), guard


def test_mount_checks_catch_a_removed_mount():
    cfg = load(AWS)
    spec = load_spec(str(ROOT / "sweeps" / "imagenet-50shot-resnet.yaml"))
    assert storage_problems(cfg, spec) == [] and host_path_problems(cfg) == []

    no_bind = copy.deepcopy(cfg)
    no_bind["docker"]["run_options"].remove("-v /mnt/models:/mnt/models")
    assert [p for p in storage_problems(no_bind, spec) if p.startswith("teacher.path:")]

    no_host_mount = copy.deepcopy(cfg)
    no_host_mount["initialization_commands"] = [
        c for c in cfg["initialization_commands"] if "/mnt/data" not in c]
    assert host_path_problems(no_host_mount) == [
        "/mnt/data: bind-mounted by docker.run_options but not mounted by initialization_commands"]

    head_only = copy.deepcopy(cfg)  # the head alone is not enough: trials run on the workers
    head_only["docker"]["run_options"].remove("-v /mnt/data:/mnt/data")
    head_only["docker"]["head_run_options"].append("-v /mnt/data:/mnt/data")
    assert [p for p in storage_problems(head_only, spec) if p.startswith("data.root:")]

    no_mlflow_dir = copy.deepcopy(cfg)
    no_mlflow_dir["initialization_commands"].remove("mkdir -p /home/ubuntu/mlflow")
    assert host_path_problems(no_mlflow_dir)


def test_spec_path_checker_flags_local_and_foreign_locations():
    cfg = load(LOCAL)
    spec = load_spec(str(ROOT / "sweeps" / "voc.yaml"),
                     ["storage=/home/me/ray-results", "teacher.cache_dir=http://example.org/cache",
                      "mlflow.tracking_uri=sqlite:////var/lib/mlflow.db"])
    problems = storage_problems(cfg, spec)
    assert [p.split(":")[0] for p in problems] == ["storage", "teacher.cache_dir", "mlflow.tracking_uri"]
    ok = load_spec(str(ROOT / "sweeps" / "voc.yaml"), ["storage=/mnt/shared/ray-results"])
    assert storage_problems(cfg, ok) == []
    assert storage_problems(load(AWS), ok)  # AWS mounts no /mnt/shared: results go to S3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_mlflow_host_is_what_ray_advertises(path, tmp_path):
    """Run the command's MLFLOW_HOST assignment: it reads back the GCS address that the
    head's `ray start` wrote (RAY_TMPDIR/ray/ray_current_cluster), and falls back to
    Ray's own node-address logic when there is none."""
    (assign,) = re.findall(r'MLFLOW_HOST=\$\(python -c "[^"]*"\);', mlflow_command(load(path)))
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def host() -> str:
        res = subprocess.run(["bash", "-c", assign + ' echo "$MLFLOW_HOST"'], env=env,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.1.2.3:6379")
    assert host() == "10.1.2.3"
    (tmp_path / "ray" / "ray_current_cluster").unlink()
    fallback = host()
    assert re.fullmatch(r"[0-9a-f.:\[\]]+", fallback), fallback
