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

ROOT = Path(__file__).resolve().parents[1]
AWS = ROOT / "cluster.yaml"
LOCAL = ROOT / "cluster-local.yaml"
CONFIGS = [AWS, LOCAL]
WORLD = {"0.0.0.0/0", "::/0"}
ALL_INTERFACES = {"0.0.0.0", "::", "[::]", "*"}
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
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "TRAIN_DRIVER_RESOURCE" in head_start


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
    for key in ("setup_commands", "worker_start_ray_commands", "initialization_commands"):
        assert [c.replace("/home/ubuntu", "$HOME") for c in aws[key]] == local[key], key
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
    assert "hostname -I" in cmd  # MLFLOW_HOST = the head's private address
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
