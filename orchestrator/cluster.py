"""What a Ray cluster can have, as opposed to what is up right now.

On an autoscaling cluster with ``min_workers: 0`` the running nodes are the head alone: a sweep
judged by ``ray.cluster_resources()`` would be refused (no GPU) or run one trial at a time. What the
cluster can grow to is the autoscaler's node types × their ``max_workers``. Ray keeps that as a
``ClusterConfig`` record in the GCS, which Ray Train V2 reads for its own feasibility check
(``ray._private.state.state.get_max_resources_from_cluster_config``) — but in Ray 2.60 neither the
v1 nor the v2 autoscaler writes that record (no caller of ``GcsClient.report_cluster_config`` in
the wheel), so it is empty on a ``ray up`` cluster. :func:`publish_autoscaler_config` writes it from
the autoscaler's own config file; both cluster files run it right after ``ray start --head``
(``e2kd capacity --publish ~/ray_bootstrap_config.yaml``), so e2kd and Ray Train agree on what the
cluster can have. Without the record (a fixed cluster, a local instance) the current resources
are all there is.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import ray


@dataclass(frozen=True)
class Capacity:
    """What the cluster can have. ``autoscaling``: read from the autoscaler's node types and
    ``max_workers`` (nodes may not be up yet); otherwise what is up now."""

    resources: dict[str, float]
    autoscaling: bool


def cluster_capacity() -> Capacity:
    """The autoscaler's view when the GCS has it (private API: Ray offers no public one), else
    ``ray.cluster_resources()``."""
    from ray._private.state import state

    now = {k: float(v) for k, v in ray.cluster_resources().items()}
    try:
        most = state.get_max_resources_from_cluster_config()
    except Exception:  # an older GCS, a client connection: the fixed view
        most = None
    if not most:
        return Capacity(now, autoscaling=False)
    # Node types may leave the head out (max_workers 0, resources auto-detected): what is up now counts too.
    return Capacity({k: max(now.get(k, 0.0), float(most.get(k, 0))) for k in set(now) | set(most)}, autoscaling=True)


def cluster_config_from_autoscaler(config: dict[str, Any]):
    """The GCS ``ClusterConfig`` record for an autoscaler config (a cluster.yaml after ``ray up``
    filled in the node types' resources, i.e. the head's ~/ray_bootstrap_config.yaml): one node
    group per node type, the head type counted once."""
    from ray.core.generated import autoscaler_pb2

    types = config.get("available_node_types") or {}
    if not types:
        raise ValueError("available_node_types: the autoscaler config has no node types")
    head, cap = config.get("head_node_type"), config.get("max_workers")
    out = autoscaler_pb2.ClusterConfig()
    for name, nt in sorted(types.items()):
        g = out.node_group_configs.add()
        g.name = name
        g.min_count = 1 if name == head else int(nt.get("min_workers", 0))
        most = 1 if name == head else int(nt.get("max_workers", cap if cap is not None else 0))
        g.max_count = most if cap is None or name == head else min(most, int(cap))
        for k, v in (nt.get("resources") or {}).items():
            if v and float(v) >= 1:  # the record holds whole units (ray-schema: integers >= 0)
                g.resources[k] = int(v)
    return out


def publish_autoscaler_config(path: str) -> dict[str, int]:
    """Write the cluster's node types into the GCS record that Ray Train V2 and e2kd read; returns
    what the cluster can then have (resource -> units). Needs a connected Ray (``ray.init``)."""
    import yaml

    with open(os.path.expanduser(path)) as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not an autoscaler config (a YAML mapping)")
    record = cluster_config_from_autoscaler(config)
    ray._private.worker.global_worker.gcs_client.report_cluster_config(record.SerializeToString())
    from ray._private.state import state

    return state.get_max_resources_from_cluster_config() or {}


@contextlib.contextmanager
def loopback_node_ip():
    """Start a local instance on 127.0.0.1 only: GCS, raylet, workers, agents and the metrics
    exporters (tests/test_network_binding.py lists every listening socket).

    Why not ``ray.init(_node_ip_address="127.0.0.1")``: Ray 2.60 replaces a loopback node IP with
    the machine's reachable address (services.resolve_ip_for_localhost) unless
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is false — the switch Ray itself uses to keep laptops on
    macOS/Windows on loopback. Processes Ray spawns read it from the environment at import (the
    raylet's environment is what its workers inherit), this driver from the constant. Both are
    restored afterwards so that a `ray start` this process runs later still may form a cluster.
    Token authentication (Ray's default for local instances) stays on.
    """
    from ray._private import ray_constants

    env, const = os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = const
        if env is None:
            os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None)
        else:
            os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = env
