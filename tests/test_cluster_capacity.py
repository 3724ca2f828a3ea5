"""What the cluster can have: a sweep is judged by the autoscaler's node types × max_workers when the
cluster has them on record, by the nodes up now otherwise.

One local Ray instance (2 CPUs, no ``accel``) plays both: first a fixed cluster, where a trial that
needs the custom resource ``accel`` can never run and is refused at once naming it; then, once the
autoscaler config's node types are recorded in its GCS (what ``e2kd capacity --publish`` does on a
real head), the same spec is accepted, with as many trials at once as the node types can hold and
the long cold-start timeout. Ray Train V2's own feasibility check reads the same record, checked
through ``get_max_resources_from_cluster_config``.
"""
from __future__ import annotations

import os

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

AUTOSCALER = {
    "cluster_name": "fake", "max_workers": 3, "head_node_type": "head",
    "available_node_types": {
        "head": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
        "accel_1x": {"resources": {"CPU": 2, "accel": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        "accel_4x": {"resources": {"CPU": 8, "accel": 4}, "node_config": {}, "min_workers": 0, "max_workers": 5},
    },
}


def _spec(**resources):
    from orchestrator.spec import spec_from_dict

    with open(os.path.join(ROOT, "sweeps", "quickstart.yaml")) as f:
        d = yaml.safe_load(f)
    d["resources"] = {"workers_per_trial": 1, "cpus_per_worker": 1, "driver_cpus": 0.25, **resources}
    return spec_from_dict(d)


def test_record_from_autoscaler_config_counts_head_once_and_caps_by_max_workers():
    from orchestrator.cluster import cluster_config_from_autoscaler
    from ray._private.state import GlobalState

    record = cluster_config_from_autoscaler(AUTOSCALER)
    groups = {g.name: g for g in record.node_group_configs}
    assert (groups["head"].min_count, groups["head"].max_count) == (1, 1)
    assert groups["accel_1x"].max_count == 2
    assert groups["accel_4x"].max_count == 3  # min(5, the cluster's max_workers 3)
    # Ray's own arithmetic over the record (what Train V2 and e2kd read): 2×1 + 3×4 accel.
    assert GlobalState._calculate_max_resource_from_cluster_config(record, "accel") == 14
    assert GlobalState._calculate_max_resource_from_cluster_config(record, "CPU") == 2 + 2 * 2 + 3 * 8
    with pytest.raises(ValueError, match="available_node_types"):
        cluster_config_from_autoscaler({"cluster_name": "x"})


@pytest.mark.slow
def test_fixed_cluster_refuses_then_autoscaler_record_accepts(tmp_path):
    import ray

    from orchestrator.cluster import cluster_capacity, publish_autoscaler_config
    from orchestrator.sweep import check_schedulable, concurrency, start_timeout_s

    spec = _spec(worker_resources={"accel": 1})
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cap = cluster_capacity()
        assert not cap.autoscaling
        with pytest.raises(RuntimeError, match=r"one trial needs 1 accel \(the cluster has 0\)"):
            check_schedulable(spec)
        assert start_timeout_s(spec, cap) == 300

        path = tmp_path / "bootstrap.yaml"
        path.write_text(yaml.safe_dump(AUTOSCALER))
        most = publish_autoscaler_config(str(path))
        assert most["accel"] == 14 and most["CPU"] == 30
        cap = check_schedulable(spec)  # accepted now: the node types can provide accel
        assert cap.autoscaling and cap.resources["accel"] == 14
        # accel limits: 14 trials; CPU: 30 / 1.25 = 24.
        assert concurrency(spec, cap) == 14
        assert start_timeout_s(spec, cap) == 1800
        # Beyond what even every node type could provide: still refused at once, naming the resource.
        with pytest.raises(RuntimeError, match=r"15 accel \(the autoscaler's node types can provide at most 14\)"):
            check_schedulable(_spec(worker_resources={"accel": 15}))
    finally:
        ray.shutdown()
