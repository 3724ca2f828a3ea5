"""The Ray Data cache job builds the same cache as the in-process builder, and sizes its actor pool
from what the cluster can have."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from trainables.data import DataConfig
from trainables.data.cache import open_cache
from trainables.models import build_model
from trainables.teacher import build_cache_local, save_teacher


@pytest.fixture(autouse=True)
def _node_local_dir(tmp_path_factory, monkeypatch):
    """Decoded cache copies go to a test directory, not ~/.cache/e2kd."""
    monkeypatch.setenv("E2KD_LOCAL_CACHE", str(tmp_path_factory.getbasetemp() / "node-local"))


@pytest.fixture
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own DataContext deprecations
def test_ray_data_cache_job_matches_local_build(tmp_path, local_ray):
    from orchestrator.cache_job import build_cache

    torch.manual_seed(0)
    save_teacher(build_model("small_cnn", 10), "small_cnn", DataConfig(), tmp_path / "teacher")
    cfg = DataConfig(name="decoy-digits", shots=3)
    man = build_cache(tmp_path / "teacher", cfg, "gradcam", tmp_path / "ray_cache", batch_size=8,
                      rows_per_shard=16, progress=False)
    assert local_ray.is_initialized()  # it used the running Ray and left it alone
    assert man["num_rows"] == 30 and man["built_by"] == "ray-data"
    assert sum(s["rows"] for s in man["shards"]) == 30 and len(man["shards"]) >= 1
    assert sorted(os.listdir(tmp_path)) == ["ray_cache", "teacher"]  # the temporary directory was renamed away
    for s in man["shards"]:  # the manifest's facts are the files' facts
        f = tmp_path / "ray_cache" / s["file"]
        assert s["file"].startswith("parts-") and os.path.getsize(f) == s["bytes"]
    build_cache_local(tmp_path / "teacher", cfg, "gradcam", tmp_path / "local_cache", batch_size=8)
    a, b = open_cache(tmp_path / "ray_cache"), open_cache(tmp_path / "local_cache")
    assert np.array_equal(a.ids, b.ids)
    assert np.allclose(a.logits, b.logits, atol=1e-5)
    da = a.maps.astype(np.float32) * a.scale[:, None, None]
    db = b.maps.astype(np.float32) * b.scale[:, None, None]
    assert np.allclose(da, db, rtol=2e-3, atol=1e-3 * np.abs(db).max())
    for key in ("teacher_sha256", "explainer", "fingerprint", "encoding", "map_shape", "transform"):
        assert a.manifest[key] == b.manifest[key]


def test_pool_is_sized_by_what_the_cluster_can_have(monkeypatch):
    """A cold autoscaling cluster has no GPU *now*: the pool must still start (min 1, grows to the
    autoscaler's GPUs); only a cluster that can never have a GPU is refused."""
    import orchestrator.cluster as cluster
    from orchestrator.cache_job import _pool_bounds

    monkeypatch.setattr(cluster, "cluster_capacity", lambda: cluster.Capacity({"CPU": 8.0, "GPU": 4.0}, autoscaling=True))
    monkeypatch.setattr("ray.cluster_resources", lambda: {"CPU": 2.0})  # the head alone, as when cold
    assert _pool_bounds(use_gpu=True, cpus_per_actor=1) == (1, 4)
    assert _pool_bounds(use_gpu=False, cpus_per_actor=1) == (1, 7)
    monkeypatch.setattr(cluster, "cluster_capacity", lambda: cluster.Capacity({"CPU": 8.0, "GPU": 2.0}, autoscaling=False))
    assert _pool_bounds(use_gpu=True, cpus_per_actor=1) == (2, 2)
    monkeypatch.setattr(cluster, "cluster_capacity", lambda: cluster.Capacity({"CPU": 8.0}, autoscaling=True))
    with pytest.raises(RuntimeError, match="no GPU.*autoscaler"):
        _pool_bounds(use_gpu=True, cpus_per_actor=1)
