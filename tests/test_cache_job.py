"""The Ray Data cache job builds the same cache as the in-process builder."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainables.data import DataConfig
from trainables.data.cache import open_cache
from trainables.models import build_model
from trainables.teacher import build_cache_local, save_teacher


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
    assert man["num_rows"] == 30 and man["built_by"] == "ray-data" and len(man["shards"]) == 2
    build_cache_local(tmp_path / "teacher", cfg, "gradcam", tmp_path / "local_cache", batch_size=8)
    a, b = open_cache(tmp_path / "ray_cache"), open_cache(tmp_path / "local_cache")
    assert np.array_equal(a.ids, b.ids)
    assert np.allclose(a.logits, b.logits, atol=1e-5)
    da = a.maps.astype(np.float32) * a.scale[:, None, None]
    db = b.maps.astype(np.float32) * b.scale[:, None, None]
    assert np.allclose(da, db, rtol=2e-3, atol=1e-3 * np.abs(db).max())
    for key in ("teacher_sha256", "explainer", "fingerprint", "encoding", "map_shape", "transform"):
        assert a.manifest[key] == b.manifest[key]
