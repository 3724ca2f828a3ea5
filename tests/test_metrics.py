"""Metrics against hand-computed values and sklearn; all_reduce over 2 gloo processes equals the
metrics of the concatenated data."""
from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainables.metrics import (Accuracy, Agreement, ExplanationSimilarity, GroupAccuracy, Localisation,
                                MetricSet, MultiLabelF1, boxes_to_mask, epg_iou)

torch.set_num_threads(1)


def test_accuracy_agreement_hand_computed():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])  # argmax 0, 1, 0, 1
    labels = torch.tensor([0, 1, 1, 1])  # 3 of 4 right
    teacher = torch.tensor([[0.0, 1.0], [0.0, 1.0], [5.0, 0.0], [0.0, 2.0]])  # argmax 1, 1, 0, 1 -> 3 of 4 agree
    acc, agr = Accuracy(), Agreement()
    acc.update(logits[:1], labels[:1])  # accumulates over batches
    acc.update(logits[1:], labels[1:])
    agr.update(logits, teacher)
    assert acc.compute() == {"acc": 0.75}
    assert agr.compute() == {"agreement": 0.75}
    assert math.isnan(Accuracy().compute()["acc"])  # no data -> NaN, not a crash


def test_explanation_similarity_hand_computed():
    # cos((1,0,0,1),(1,1,0,0)) = 0.5 ; cos((1,2,3,4),(2,4,6,8)) = 1 ; mean 0.75
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [3.0, 4.0]]])
    t = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[2.0, 4.0], [6.0, 8.0]]])
    m = ExplanationSimilarity()
    m.update(s, t)
    assert m.compute()["exp_sim"] == pytest.approx(0.75)
    # a lower-resolution teacher map is resized to the student's: 1x1 -> constant;
    # cos((1,2,3,4),(1,1,1,1)) = 10/(2√30)
    m.reset()
    m.update(s[1:], torch.ones(1, 1, 1))
    assert m.compute()["exp_sim"] == pytest.approx(10 / (2 * math.sqrt(30)))
    # all-zero maps: cos 0, no NaN
    m.reset()
    m.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))
    assert m.compute()["exp_sim"] == 0.0


def test_group_accuracy_hand_computed():
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])  # preds 0,0,1,1,0
    labels = torch.tensor([0, 1, 1, 1, 1])  # correct: T, F, T, T, F
    groups = torch.tensor([0, 0, 1, 2, 2])
    m = GroupAccuracy(4)
    m.update(logits, labels, groups)
    out = m.compute()
    assert out["group_acc_0"] == 0.5 and out["group_acc_1"] == 1.0 and out["group_acc_2"] == 0.5
    assert math.isnan(out["group_acc_3"])  # no samples
    assert out["worst_group_acc"] == 0.5
    with pytest.raises(ValueError, match="group ids"):
        m.update(logits, labels, torch.tensor([0, 0, 1, 2, 4]))


def test_boxes_to_mask():
    m = boxes_to_mask([(0, 0, 2, 2)], (4, 4))
    assert m.sum() == 4 and m[:2, :2].all()
    # union of overlapping boxes; fractional coords are floored/ceiled; clipped to the map
    m = boxes_to_mask([(0, 0, 2, 2), (1, 1, 3, 3), (3.5, 3.2, 9, 9)], (4, 4))
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)
    assert boxes_to_mask([], (2, 3)).shape == (2, 3)


def test_epg_iou_hand_computed():
    box = boxes_to_mask([(0, 0, 2, 2)], (4, 4))  # top-left 2x2
    a = torch.tensor([[1.5, 1.5, 0.0, 0.0],
                      [1.5, 0.8, 0.0, 0.0],
                      [0.0, 0.0, 0.0, 2.0],
                      [0.0, 0.0, -3.0, 0.0]])
    # a⁺: the -3 is dropped. Σa⁺ = 3·1.5 + 0.8 + 2 = 7.3, inside the box 5.3 -> EPG = 5.3/7.3
    # min-max of a⁺ (0..2): 0.75, 0.75, 0.75, 0.4 in the box, 1.0 outside -> ≥0.5: 3 in + 1 out
    # IoU = 3 / (4 + 1) = 0.6
    zero = torch.zeros(4, 4)
    neg = -torch.ones(4, 4)  # a⁺ = 0 everywhere: EPG 0 (Σa⁺ < 1e-7), IoU 0 (nothing predicted)
    epg, iou = epg_iou(torch.stack([a, zero, neg]), torch.stack([box, box, box]))
    torch.testing.assert_close(epg, torch.tensor([5.3 / 7.3, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(iou, torch.tensor([0.6, 0.0, 0.0], dtype=torch.float64))
    # perfect localisation
    epg, iou = epg_iou(box.float()[None] * 3.0, box[None])
    assert epg.item() == 1.0 and iou.item() == 1.0

    loc = Localisation()
    loc.update(torch.stack([a, box.float()]), torch.stack([box, box]))
    out = loc.compute()
    assert out["epg"] == pytest.approx((5.3 / 7.3 + 1.0) / 2) and out["iou"] == pytest.approx(0.8)


def test_against_sklearn():
    from sklearn.metrics import accuracy_score, f1_score  # here, not at module level: spawned workers skip it

    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(97, 6)))
    labels = torch.from_numpy(rng.integers(0, 6, size=97))
    acc = Accuracy()
    for i in range(0, 97, 10):
        acc.update(logits[i:i + 10], labels[i:i + 10])
    assert acc.compute()["acc"] == pytest.approx(accuracy_score(labels.numpy(), logits.argmax(1).numpy()))

    ml_logits = torch.from_numpy(rng.normal(size=(53, 5)) - 0.3)
    ml_labels = torch.from_numpy(rng.random((53, 5)) < 0.3).float()
    ml_labels[:, 4] = 0
    ml_logits[:, 4] = -1.0  # a class never present and never predicted: macro counts it as 0 (sklearn)
    f1 = MultiLabelF1(5)
    f1.update(ml_logits[:20], ml_labels[:20])
    f1.update(ml_logits[20:], ml_labels[20:])
    out = f1.compute()
    pred = (ml_logits > 0).numpy().astype(int)
    y = ml_labels.numpy().astype(int)
    assert out["f1"] == pytest.approx(f1_score(y, pred, average="micro", zero_division=0))
    assert out["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))


def test_metric_set_names_and_validation():
    ms = MetricSet.build(exp_sim=True, num_groups=2)
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    ms.update(logits=logits, labels=torch.tensor([0, 0]), teacher_logits=logits, groups=torch.tensor([0, 1]),
              maps=torch.ones(2, 3, 3), teacher_maps=torch.ones(2, 3, 3))
    out = ms.compute()
    assert list(out) == ["acc", "agreement", "exp_sim", "group_acc_0", "group_acc_1", "worst_group_acc"]
    assert out == pytest.approx({"acc": 0.5, "agreement": 1.0, "exp_sim": 1.0, "group_acc_0": 1.0,
                                 "group_acc_1": 0.0, "worst_group_acc": 0.0})
    assert all(isinstance(v, float) for v in out.values())
    ms.all_reduce()  # no process group: a no-op
    assert ms.compute() == out
    with pytest.raises(ValueError, match="teacher_maps"):
        ms.update(logits=logits, labels=torch.tensor([0, 0]), teacher_logits=logits, groups=torch.tensor([0, 1]),
                  maps=torch.ones(2, 3, 3))
    voc = MetricSet.build(multilabel_classes=3, localisation=True)
    assert [type(m) for m in voc.metrics] == [MultiLabelF1, Localisation]
    # state round trip
    st = ms.state_tensor()
    assert st.dtype == torch.float64
    fresh = MetricSet.build(exp_sim=True, num_groups=2)
    fresh.load_state_tensor(st)
    assert fresh.compute() == out


# ------------------------------------ distributed ---------------------------------------------


def _data(n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d = {
        "logits": torch.randn(n, 4, generator=g),
        "teacher_logits": torch.randn(n, 4, generator=g),
        "labels": torch.randint(0, 4, (n,), generator=g),
        "groups": torch.randint(0, 3, (n,), generator=g),
        "maps": torch.rand(n, 5, 5, generator=g) - 0.2,
        "teacher_maps": torch.rand(n, 5, 5, generator=g),
        "ml_logits": torch.randn(n, 4, generator=g),
        "ml_labels": (torch.rand(n, 4, generator=g) < 0.4).float(),
        "box_masks": torch.rand(n, 5, 5, generator=g) < 0.3,
    }
    return d


def _sets():
    return (MetricSet.build(exp_sim=True, num_groups=3),
            MetricSet.build(multilabel_classes=4, localisation=True))


def _update(sets, d, lo, hi):
    single, multi = sets
    s = {k: v[lo:hi] for k, v in d.items()}
    single.update(logits=s["logits"], teacher_logits=s["teacher_logits"], labels=s["labels"], groups=s["groups"],
                  maps=s["maps"], teacher_maps=s["teacher_maps"])
    multi.update(logits=s["ml_logits"], labels=s["ml_labels"], contrib_maps=s["maps"], box_masks=s["box_masks"])


SPLIT = 5  # uneven shards: rank 0 gets 5 samples, rank 1 gets 11


def _worker(rank: int, port: int, out_path: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        d = _data()
        sets = _sets()
        lo, hi = (0, SPLIT) if rank == 0 else (SPLIT, len(d["labels"]))
        _update(sets, d, lo, hi)
        sets[0].all_reduce()
        sets[1].metrics[0].all_reduce()  # per-accumulator reduce works too
        sets[1].metrics[1].all_reduce()
        result = {**sets[0].compute(), **sets[1].compute()}
        torch.save(result, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_all_reduce_equals_concatenated(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_path = str(tmp_path / "metrics")
    mp.spawn(_worker, args=(port, out_path), nprocs=2, join=True)

    d = _data()
    sets = _sets()
    _update(sets, d, 0, len(d["labels"]))
    expected = {**sets[0].compute(), **sets[1].compute()}
    assert set(expected) >= {"acc", "agreement", "exp_sim", "group_acc_0", "worst_group_acc", "f1", "epg", "iou"}
    for rank in (0, 1):
        got = torch.load(f"{out_path}.{rank}")
        assert got.keys() == expected.keys()
        for k in expected:
            assert got[k] == pytest.approx(expected[k], rel=1e-12, nan_ok=True), k
    # and the shards alone would have given different numbers (the reduce did something)
    part = _sets()
    _update(part, d, 0, SPLIT)
    assert {**part[0].compute(), **part[1].compute()} != expected
