"""Feeding the device: the training loader's order and augmentation seeds, the evaluation shards,
evaluation memory (stored teacher targets), evaluation cadence and SyncBatchNorm."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DistributedSampler, Subset

import trainables.train_loop as tl
from orchestrator.spec import SpecError, load_spec
from trainables.config import EvalConfig, LoaderConfig, TrainConfig
from trainables.data import DataConfig, build_dataset
from trainables.data.loader import ShardSampler, default_workers, eval_loader, train_loader
from trainables.explainers import explain
from trainables.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = DataConfig(name="digits", shots=5, image_size=32)  # 50 training images


def _train_set():
    return build_dataset(DIGITS, "train", train=True)


def _epoch(loader, epoch: int) -> list[torch.Tensor]:
    loader.sampler.set_epoch(epoch)
    return [b for b in loader]


def _order(seed: int, rank: int, epoch: int = 1) -> list[int]:
    dl = train_loader(_train_set(), 5, seed=seed, rank=rank, world=2, cfg=LoaderConfig(), workers=0, cuda=False)
    return [int(i) for b in _epoch(dl, epoch) for i in b["index"]]


def test_two_seeds_give_two_data_orders_with_two_workers():
    a = {r: _order(0, r) for r in (0, 1)}
    b = {r: _order(1, r) for r in (0, 1)}
    assert a[0] != b[0] and a[1] != b[1]
    assert a == {r: _order(0, r) for r in (0, 1)}  # a seed fixes the order
    assert _order(0, 0, epoch=2) != a[0]  # and it changes with the epoch
    # The two ranks split the epoch: together they see every sample, each once.
    assert sorted(a[0] + a[1]) == sorted(int(i) for i in _train_set().ids)


def test_loader_processes_change_speed_not_batches():
    """The augmentation seed travels with each sample: 0 or 2 loader processes make the same batches."""
    ds = _train_set()
    kw = dict(seed=3, rank=0, world=1, cfg=LoaderConfig(), cuda=False)
    inline = _epoch(train_loader(ds, 10, workers=0, **kw), 2)
    forked = _epoch(train_loader(ds, 10, workers=2, **kw), 2)
    assert len(inline) == len(forked) == 5
    for x, y in zip(inline, forked):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["image"], y["image"])
    # ... and the views are random: another epoch crops the same samples differently.
    again = _epoch(train_loader(ds, 10, workers=0, **kw), 3)
    assert not torch.equal(torch.cat([b["image"] for b in inline]), torch.cat([b["image"] for b in again]))


def test_full_batches_only_and_a_clear_error_when_a_shard_is_smaller_than_a_batch():
    ds = build_dataset(dataclasses.replace(DIGITS, shots=2), "train", train=True)  # 20 images
    dl = train_loader(ds, 8, seed=0, rank=0, world=1, cfg=LoaderConfig(), workers=0, cuda=False)
    assert [len(b["index"]) for b in _epoch(dl, 1)] == [8, 8]  # never a batch of 4 for BatchNorm
    with pytest.raises(ValueError, match="batch_size: each of the 2 worker"):
        train_loader(ds, 12, seed=0, rank=0, world=2, cfg=LoaderConfig(), workers=0, cuda=False)


def test_eval_shards_count_every_sample_once():
    n = 11
    ours = [i for r in range(3) for i in ShardSampler(n, r, 3)]
    assert sorted(ours) == list(range(n))
    padded = [i for r in range(3) for i in DistributedSampler(range(n), num_replicas=3, rank=r, shuffle=False)]
    assert len(padded) > n  # what Ray's prepare_data_loader would have used: repeats samples


def test_loader_processes_default_to_the_workers_cpus():
    assert default_workers(LoaderConfig(), 8, in_memory=False, cuda=True) == 8
    assert default_workers(LoaderConfig(), 8, in_memory=False, cuda=False) == 7
    assert default_workers(LoaderConfig(), 1, in_memory=False, cuda=False) == 0
    assert default_workers(LoaderConfig(), 8, in_memory=True, cuda=True) == 0
    assert default_workers(LoaderConfig(workers=3), 1, in_memory=True, cuda=False) == 3


# ------------------------------------ evaluation memory ---------------------------------------


def _eval_cfg(**kw) -> TrainConfig:
    return TrainConfig(student="tiny_cnn", data=DataConfig(name="digits", image_size=32), **kw)


def _eval_set(n: int, budget: float) -> tl.EvalSet:
    ds = Subset(build_dataset(DataConfig(name="digits", image_size=32), "val"), range(n))
    return tl.EvalSet(eval_loader(ds, 16, rank=0, world=1, cfg=LoaderConfig(), workers=0, cuda=False), budget)


def test_evaluation_memory_is_the_stored_targets_at_native_resolution():
    torch.manual_seed(0)
    teacher, student = build_model("small_cnn", 10).eval(), build_model("tiny_cnn", 10)
    cfg, cpu = _eval_cfg(), torch.device("cpu")
    x = build_dataset(cfg.data, "val")[0]["image"][None]
    native = explain(teacher, x, None, "gradcam", resize=False).maps.shape[1:]
    assert native.numel() < x.shape[-1] * x.shape[-2]  # the native map is smaller than the image
    per_image = 10 * 4 + native.numel() * 2 + 4 + 8  # logits fp32, map fp16, scale fp32, class int64
    sizes = {}
    for n in (40, 80):
        es = _eval_set(n, budget=2**30)
        first = tl.evaluate(student, teacher, es, cfg, cpu, False)
        assert es.stored is not None and es.stored[0][1].dtype == torch.float16
        assert tuple(es.stored[0][1].shape[1:]) == tuple(native)
        sizes[n] = es.stored_bytes()
        assert sizes[n] == n * per_image
        # The stored targets give the metrics the teacher itself gives (second code path: no store).
        again = tl.evaluate(student, teacher, es, cfg, cpu, False)
        live = _eval_set(n, budget=0)
        fresh = tl.evaluate(student, teacher, live, cfg, cpu, False)
        assert live.stored is None and not live.stores
        for k in first:
            assert again[k] == pytest.approx(fresh[k], abs=1e-3), k
            assert first[k] == pytest.approx(fresh[k], abs=1e-3), k
        assert again["acc"] == fresh["acc"] and again["agreement"] == fresh["agreement"]
    assert sizes[80] == 2 * sizes[40]


def test_val_every_epoch_test_at_the_end_unless_asked(teacher_dir):
    cfg = load_spec(os.path.join(ROOT, "sweeps", "quickstart.yaml"),
                    [f"teacher.path={teacher_dir}", "data.shots=3", "batch_size=10", "explain_samples=1",
                     "epochs=4", "eval.val_every=3", "eval.test_every=0"]).train
    seen = []
    tl.fit(cfg, tl.Hooks(report=lambda m, c: seen.append(dict(m)), log=lambda s: None))
    assert [m["val_epoch"] for m in seen] == [1, 1, 3, 4]  # first epoch, every 3rd, the last; repeated between
    assert seen[0]["val_acc"] == seen[1]["val_acc"]
    assert ["test_acc" in m for m in seen] == [False, False, False, True]
    assert all(m["eval_time_s"] >= 0 for m in seen)
    cfg2 = dataclasses.replace(cfg, epochs=2, eval=EvalConfig(test_every=1))
    seen.clear()
    tl.fit(cfg2, tl.Hooks(report=lambda m, c: seen.append(dict(m)), log=lambda s: None))
    assert [m["test_epoch"] for m in seen] == [1, 2]


def test_search_metric_must_be_reported_every_epoch():
    with pytest.raises(SpecError, match="search.metric: 'test_acc' is measured on 'test'"):
        load_spec(os.path.join(ROOT, "sweeps", "quickstart.yaml"), ["search.metric=test_acc"])


# ------------------------------------ parallel layout -----------------------------------------


def test_sync_batchnorm_when_a_students_batch_is_split():
    cuda, cpu, logs = torch.device("cuda"), torch.device("cpu"), []

    def n_sync(m: nn.Module) -> tuple[int, int]:
        return (sum(isinstance(x, nn.SyncBatchNorm) for x in m.modules()),
                sum(type(x) is nn.BatchNorm2d for x in m.modules()))

    auto = _eval_cfg()
    plain = n_sync(build_model("resnet18", 10))[1]
    assert plain > 0
    # Converting needs no GPU; the layer types say what a CUDA run would train with.
    assert n_sync(tl.sync_batchnorm(build_model("resnet18", 10), auto, 2, cuda, logs.append)) == (plain, 0)
    assert n_sync(tl.sync_batchnorm(build_model("resnet18", 10), auto, 1, cuda, logs.append)) == (0, plain)
    off = dataclasses.replace(auto, sync_bn=False)
    assert n_sync(tl.sync_batchnorm(build_model("resnet18", 10), off, 2, cuda, logs.append)) == (0, plain)
    assert not logs
    # On the CPU PyTorch cannot synchronise: auto says so, on refuses.
    assert n_sync(tl.sync_batchnorm(build_model("resnet18", 10), auto, 2, cpu, logs.append)) == (0, plain)
    assert "GPUs only" in logs[-1]
    with pytest.raises(ValueError, match="sync_bn: true, but PyTorch's SyncBatchNorm runs on GPUs only"):
        tl.sync_batchnorm(build_model("resnet18", 10), dataclasses.replace(auto, sync_bn=True), 2, cpu, logs.append)
    # B-cos models normalise with an uncentred BatchNorm that SyncBatchNorm would replace: left as is.
    bcos = dataclasses.replace(auto, student="small_bcos_cnn", teacher=dataclasses.replace(
        auto.teacher, arch="small_bcos_cnn"), loss=dataclasses.replace(auto.loss, explainer="bcos_weight"))
    m = tl.sync_batchnorm(build_model("small_bcos_cnn", 10), bcos, 2, cuda, logs.append)
    assert not any(isinstance(x, nn.SyncBatchNorm) for x in m.modules()) and "cannot be synchronised" in logs[-1]


def test_spec_refuses_a_layout_that_changes_the_recipe():
    qs = os.path.join(ROOT, "sweeps", "quickstart.yaml")
    two = "resources.workers_per_trial=2"
    with pytest.raises(SpecError, match="batch_size: 21 does not split evenly"):
        load_spec(qs, ["batch_size=21", two])
    with pytest.raises(SpecError, match="sync_bn: true needs resources.use_gpu"):
        load_spec(qs, ["sync_bn=on", two])
    assert load_spec(qs, ["sync_bn=true", "resources.workers_per_trial=1"]).train.sync_bn is True
    assert load_spec(qs, ["sync_bn=off"]).train.sync_bn is False  # YAML 1.1: off is false
