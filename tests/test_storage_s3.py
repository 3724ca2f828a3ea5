"""Teachers and teacher caches on an S3-protocol store (a real moto server, reached only through
AWS_ENDPOINT_URL as a cluster would be): save/load a teacher, the Ray Data job writing a cache
to s3://, refusal of an unfinished one, and the CLI's preflight finding an s3 teacher."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from conftest import make_bucket
from test_teacher import spec_file

from trainables import storage
from trainables.data import DataConfig
from trainables.data.cache import CacheError, CacheWriter, open_cache, unfinished_caches
from trainables.models import build_model
from trainables.teacher import build_cache_local, load_teacher, read_card, save_teacher, teacher_exists

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "sweeps", "quickstart.yaml")


@pytest.fixture(autouse=True)
def _node_local_dir(tmp_path, monkeypatch):
    """Each test's node-local downloads in its own directory, so every test really downloads."""
    monkeypatch.setenv("E2KD_LOCAL_CACHE", str(tmp_path / "node-local"))


def test_teacher_saved_to_and_loaded_from_s3(s3_env, tmp_path):
    bucket = make_bucket(s3_env, "teachers-rt")
    torch.manual_seed(0)
    model = build_model("small_cnn", 10)
    card = save_teacher(model, "small_cnn", DataConfig(), f"{bucket}/teachers/x")
    local_card = save_teacher(model, "small_cnn", DataConfig(), tmp_path / "local")
    assert card.sha256 == local_card.sha256  # the same bytes, wherever they are written
    assert teacher_exists(f"{bucket}/teachers/x") and not teacher_exists(f"{bucket}/teachers/nope")
    assert read_card(f"{bucket}/teachers/x") == card
    loaded, c2 = load_teacher(f"{bucket}/teachers/x")
    ref, _ = load_teacher(tmp_path / "local")
    assert c2 == card and not loaded.training
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # downloaded once per node, into a directory named by the weights' sha256
    assert [d for d in os.listdir(tmp_path / "node-local" / "teachers") if not d.endswith(".lock")] == [card.sha256]
    assert load_teacher(f"{bucket}/teachers/x/teacher.pt")[1] == card  # the .pt URI works too
    # a modified object is refused naming it, by a node that downloads it (the copy a node already
    # holds was verified, and is named by the content the card asks for, so it stays valid)
    fs, p = storage.filesystem(f"{bucket}/teachers/x/teacher.pt")
    with fs.open_output_stream(p) as f:
        f.write(b"not the weights")
    os.environ["E2KD_LOCAL_CACHE"] = str(tmp_path / "another-node")  # monkeypatch restores it
    with pytest.raises(ValueError, match="checksum") as e:
        load_teacher(f"{bucket}/teachers/x")
    assert "teachers/x/teacher.pt" in str(e.value)
    with pytest.raises(FileNotFoundError, match="teachers/missing"):
        load_teacher(f"{bucket}/teachers/missing")


def test_incomplete_s3_cache_is_refused_naming_it(s3_env):
    bucket = make_bucket(s3_env, "caches-partial")
    ids = np.arange(40, dtype=np.int64)
    w = CacheWriter(f"{bucket}/caches/c", {"teacher_sha256": "a" * 64}, 10, (8, 8), rows_per_shard=16)
    w.add(ids, np.zeros((40, 10), np.float32), np.ones((40, 8, 8), np.float32))  # 2 shards uploaded, then "dies"
    left = unfinished_caches(f"{bucket}/caches/c")
    assert len(left) == 1 and left[0].startswith(f"{bucket}/caches/c/parts-")
    with pytest.raises(CacheError, match="manifest.json is missing") as e:
        open_cache(f"{bucket}/caches/c")
    assert f"{bucket}/caches/c" in str(e.value) and left[0] in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_cache(f"{bucket}/caches/never-written")
    # an exception in the writer removes its uploaded parts
    with pytest.raises(RuntimeError):
        with CacheWriter(f"{bucket}/caches/d", {}, 10, (8, 8), rows_per_shard=16) as w2:
            w2.add(ids, np.zeros((40, 10), np.float32), np.ones((40, 8, 8), np.float32))
            raise RuntimeError("boom")
    assert storage.list_files(f"{bucket}/caches/d") == []  # (pyarrow may leave an empty "d/" marker)


def test_s3_cache_overwrite_and_damaged_shard(s3_env):
    bucket = make_bucket(s3_env, "caches-ow")
    uri = f"{bucket}/caches/c"
    ids = np.arange(20, dtype=np.int64)

    def write(n_rows: int, overwrite: bool = False) -> dict:
        with CacheWriter(uri, {"teacher_sha256": "a" * 64}, 10, (8, 8), rows_per_shard=8,
                         expect_rows=n_rows, overwrite=overwrite) as w:
            w.add(ids[:n_rows], np.full((n_rows, 10), n_rows, np.float32), np.ones((n_rows, 8, 8), np.float32))
            return w.close()

    first = write(20)
    with pytest.raises(FileExistsError):
        write(20)
    second = write(12, overwrite=True)
    assert open_cache(uri).manifest["num_rows"] == 12
    assert storage.list_dirs(uri) == [second["shards"][0]["file"].split("/")[0]]  # old parts deleted after the swap
    assert first["shards"][0]["file"].split("/")[0] not in storage.list_dirs(uri)
    fs, p = storage.filesystem(storage.join(uri, second["shards"][1]["file"]))
    with fs.open_output_stream(p) as f:
        f.write(b"x" * second["shards"][1]["bytes"])  # same size, other bytes
    os.environ["E2KD_LOCAL_CACHE"] += "-2"  # a node that has not decoded it yet (monkeypatch restores)
    with pytest.raises(CacheError, match="corrupt") as e:
        open_cache(uri)
    assert second["shards"][1]["file"] in str(e.value)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own DataContext deprecations
def test_ray_data_job_writes_cache_to_s3_same_as_local(s3_env, tmp_path, teacher_dir):
    """The Ray Data job into s3:// (actors write Parquet to the bucket; the driver writes the
    manifest last) opens to the same rows as the in-process builder's local cache."""
    import ray

    from orchestrator.cache_job import build_cache
    from trainables.data import build_dataset
    from trainables.data.cache import CachedTeacherDataset

    bucket = make_bucket(s3_env, "caches-ray")
    teacher_uri = f"{bucket}/teachers/t"
    model, _ = load_teacher(teacher_dir)
    save_teacher(model, "small_cnn", DataConfig(name="digits"), teacher_uri)
    cfg = DataConfig(name="digits", shots=3, augment=False)
    ray.init(address="local", num_cpus=2)  # after s3_env: every Ray process has AWS_ENDPOINT_URL
    try:
        man = build_cache(teacher_uri, cfg, "gradcam", f"{bucket}/cache", batch_size=8, rows_per_shard=16,
                          progress=False)
    finally:
        ray.shutdown()
    assert man["num_rows"] == 30 and all(s["file"].startswith("parts-") for s in man["shards"])
    assert storage.is_file(f"{bucket}/cache/manifest.json")
    build_cache_local(teacher_dir, cfg, "gradcam", tmp_path / "local_cache", batch_size=8)
    a, b = open_cache(f"{bucket}/cache"), open_cache(tmp_path / "local_cache")
    assert np.array_equal(a.ids, b.ids)
    assert np.allclose(a.logits, b.logits, atol=1e-5)
    da = a.maps.astype(np.float32) * a.scale[:, None, None]
    db = b.maps.astype(np.float32) * b.scale[:, None, None]
    assert np.allclose(da, db, rtol=2e-3, atol=1e-3 * np.abs(db).max())
    for key in ("teacher_sha256", "explainer", "fingerprint", "map_shape"):
        assert a.manifest[key] == b.manifest[key]
    base = build_dataset(cfg, "train", train=False)
    ia, ib = CachedTeacherDataset(base, a)[3], CachedTeacherDataset(base, b)[3]
    assert torch.allclose(ia["teacher_logits"], ib["teacher_logits"], atol=1e-5)
    assert torch.allclose(ia["teacher_map"], ib["teacher_map"], atol=2e-3 * ib["teacher_map"].abs().max())


def test_preflight_accepts_an_s3_teacher_without_training(s3_env, tmp_path, teacher_dir, monkeypatch):
    import trainables.teacher
    from orchestrator.cli import ensure_teacher, preflight
    from orchestrator.spec import load_spec

    bucket = make_bucket(s3_env, "preflight")
    model, card = load_teacher(teacher_dir)
    save_teacher(model, "small_cnn", DataConfig(name="digits"), f"{bucket}/teachers/t")
    spec_data = load_spec(spec_file(tmp_path, f"{bucket}/teachers/t", True)).train.data
    build_cache_local(f"{bucket}/teachers/t", spec_data, "gradcam", f"{bucket}/caches/c")

    def no_training(*a, **k):
        raise AssertionError("train_teacher called although the s3 teacher exists")

    monkeypatch.setattr(trainables.teacher, "train_teacher", no_training)
    for recipe in (True, False):
        spec = load_spec(spec_file(tmp_path, f"{bucket}/teachers/t", recipe, mode="cached",
                                    cache_dir=f"{bucket}/caches/c"))
        assert spec.train.teacher.path == f"{bucket}/teachers/t"  # not made "absolute" as a local path
        preflight(spec)  # teacher found on s3, cache manifest checked against it
        assert ensure_teacher(spec).sha256 == card.sha256
    # the s3 cache is checked against the spec like a local one
    spec = load_spec(spec_file(tmp_path, f"{bucket}/teachers/t", True, mode="cached", cache_dir=f"{bucket}/caches/c"))
    spec = dataclasses.replace(spec, train=dataclasses.replace(
        spec.train, loss=dataclasses.replace(spec.train.loss, explainer="gradcam_autograd")))
    with pytest.raises(CacheError, match="teacher.cache_dir.*explainer"):
        preflight(spec)


def test_cli_imports_weights_as_an_s3_teacher(s3_env, tmp_path):
    """`e2kd teacher SPEC --weights FILE` with teacher.path on s3 writes teacher.pt + card there."""
    from orchestrator.cli import main

    bucket = make_bucket(s3_env, "teachers-cli")
    src = build_model("small_cnn", 10)
    raw = tmp_path / "raw.pt"
    torch.save(src.net.state_dict(), raw)
    assert main(["teacher", QUICKSTART, "--weights", str(raw), "--set", f"teacher.path={bucket}/t"]) == 0
    model, card = load_teacher(f"{bucket}/t")
    assert card.extra["imported_from"] == str(raw)
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
