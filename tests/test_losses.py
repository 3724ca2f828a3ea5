"""Losses against hand-computed golden values, plus the e²KD step's gradient/graph contracts."""
from __future__ import annotations

import math

import pytest
import torch

import trainables.explainers as ex
from trainables.explainers import explain
from trainables.losses import E2KDLoss, LossConfig, cosine_per_sample, explanation_loss, kd_loss, multilabel_kd_loss
from trainables.models import build_model

torch.set_num_threads(1)

S = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
T = torch.tensor([[3.0, 2.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)


# ----------------------------------------- KD -------------------------------------------------


def test_kd_golden_tau1():
    # Each row's teacher logits are the student's reversed, so KL(p_T‖p_S) = Σ p_T (log p_T − log p_S)
    # collapses to (p_max − p_min)·Δz:
    #   row 1: p_T = softmax(3,2,1) = (0.66524, 0.24473, 0.09003); KL = 2·(0.66524 − 0.09003) = 1.15042
    #   row 2: p_T = softmax(1,0,0) = (0.57612, 0.21194, 0.21194); KL = 1·(0.57612 − 0.21194) = 0.36418
    #   batchmean = (1.15042 + 0.36418) / 2 = 0.75730
    assert kd_loss(S, T, 1.0).item() == pytest.approx(0.757298046178813, rel=1e-6)


def test_kd_golden_tau2_and_gradient():
    # τ = 2: softmax of halved logits, times τ² = 4 (numpy: 0.8181074784760219)
    #   row 1: p_T = softmax(1.5,1,0.5) = (0.50648, 0.30720, 0.18632); KL = 1·(0.50648 − 0.18632) = 0.32016
    #   row 2: p_T = softmax(0.5,0,0) = (0.45186, 0.27407, 0.27407); KL = 0.5·(0.45186 − 0.27407) = 0.08889
    #   4 · (0.32016 + 0.08889) / 2 = 0.81811
    s = S.clone().requires_grad_(True)
    loss = kd_loss(s, T, 2.0)
    assert loss.item() == pytest.approx(0.8181074784760219, rel=1e-6)
    # d/dz_S [τ² KL] = τ (p_S − p_T) / B ; row 1: p_S = reversed p_T
    loss.backward()
    p_t1 = torch.tensor([0.50648, 0.30720, 0.18632], dtype=torch.float64)
    torch.testing.assert_close(s.grad[0], 2.0 * (p_t1.flip(0) - p_t1) / 2, atol=1e-4, rtol=0)


def test_multilabel_kd_golden():
    # per class binary KL(σ(z_T) ‖ σ(z_S)), summed over classes, batch mean (τ = 1)
    #   row 1: z_S = (0.5, −1), z_T = (1, 0); row 2: z_S = (2, 0), z_T = (−1, 3)
    # e.g. class 1 of row 1: p_T = 0.73106, p_S = 0.62246:
    #   0.73106·ln(0.73106/0.62246) + 0.26894·ln(0.26894/0.37754) = 0.11759 − 0.09121 = 0.02638
    # numpy over all four terms: 0.8277916809017154; τ = 2 (halved logits, ×4): 1.0587527782558366
    s = torch.tensor([[0.5, -1.0], [2.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0], [-1.0, 3.0]], dtype=torch.float64)
    assert multilabel_kd_loss(s, t, 1.0).item() == pytest.approx(0.8277916809017154, rel=1e-6)
    assert multilabel_kd_loss(s, t, 2.0).item() == pytest.approx(1.0587527782558366, rel=1e-6)
    # clamping: σ(20) is clamped to 1 − 1e-6, against p_S = 0.5:
    #   (1−1e-6)·ln((1−1e-6)/0.5) + 1e-6·ln(1e-6/0.5) = 0.693132365049887
    got = multilabel_kd_loss(torch.zeros(1, 1, dtype=torch.float64), torch.full((1, 1), 20.0, dtype=torch.float64))
    assert got.item() == pytest.approx(0.693132365049887, rel=1e-9)


# ------------------------------------- explanation loss ---------------------------------------


def test_explanation_loss_golden():
    # sample 1: student (1,0,0,1), teacher (1,1,0,0): cos = 1/(√2·√2) = 0.5  -> 1 − cos = 0.5
    # sample 2: identical up to scale (cos ignores it, no min-max): 1 − cos = 0
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [3.0, 4.0]]])
    teacher = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[7.0, 14.0], [21.0, 28.0]]])
    assert explanation_loss(student, teacher).item() == pytest.approx(0.25, abs=1e-6)


def test_explanation_loss_resizes_teacher_to_student():
    # a 1×1 teacher map resized to 2×2 is constant: cos((1,2,3,4),(1,1,1,1)) = 10/(√30·2) = 0.912871
    student = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    teacher = torch.tensor([[[5.0]]])
    assert explanation_loss(student, teacher).item() == pytest.approx(1 - 10 / (2 * math.sqrt(30)), abs=1e-6)


def test_explanation_loss_gradient_golden():
    # d(1 − cos)/da = −(b/(|a||b|) − (a·b) a/(|a|³|b|)); a = (1,0,0,1), b = (1,1,0,0):
    # |a| = |b| = √2, a·b = 1 -> −(b/2 − a/(2√2·√2)) = −(b − a/2)/2 = (−0.25, −0.5, 0, 0.25)
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], requires_grad=True)
    b = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    explanation_loss(a, b).backward()
    torch.testing.assert_close(a.grad, torch.tensor([[[-0.25, -0.5], [0.0, 0.25]]]), atol=1e-6, rtol=0)


# ------------------------------------ full e²KD step -------------------------------------------


def _small(name: str, seed: int):
    torch.manual_seed(seed)
    return build_model(name, 10)


@pytest.mark.parametrize("teacher_name,teacher_method,size", [
    ("small_cnn", "gradcam", 32),
    ("small_cnn", "gradcam_autograd", 32),
    ("mobilenet_v3_small", "gradcam", 64),  # general route: the teacher's head is differentiated
])
def test_live_teacher_gets_no_gradient(teacher_name, teacher_method, size):
    teacher = _small(teacher_name, 1).eval()
    student = _small("small_cnn", 0).train()
    x = torch.rand(4, 3, size, size)
    te = explain(teacher, x, method=teacher_method, create_graph=False)
    out = E2KDLoss(LossConfig(temperature=2.0, lam=1.0))(student, x, te.logits, te.maps)
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())


def test_zero_maps_give_finite_loss_and_gradients():
    student = _small("small_cnn", 0).train()
    x = torch.rand(4, 3, 32, 32)
    t_logits = torch.randn(4, 10)
    loss_fn = E2KDLoss(LossConfig(lam=1.0))
    # all-zero teacher maps
    out = loss_fn(student, x, t_logits, torch.zeros(4, 32, 32))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["exp"].item() == pytest.approx(1.0)
    assert all(torch.isfinite(p.grad).all() for p in student.parameters())
    # all-zero student maps too (zero CAM weights -> analytic CAM is exactly 0)
    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        student.cam_linear.weight.zero_()
    out = loss_fn(student, x, t_logits, torch.zeros(4, 32, 32))
    assert explain(student, x, t_logits.argmax(1)).maps.abs().max() == 0
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["exp"].item() == pytest.approx(1.0)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in student.parameters())


def test_lambda_zero_never_calls_the_explainer(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("explainer called with λ = 0")

    for name in list(ex.EXPLAINERS):
        monkeypatch.setitem(ex.EXPLAINERS, name, boom)
    student = _small("small_cnn", 0)
    x = torch.rand(2, 3, 32, 32)
    loss_fn = E2KDLoss(LossConfig(lam=0.0, temperature=2.0))
    for step in range(3):
        assert not loss_fn.explains_at(step)
        out = loss_fn(student, x, torch.randn(2, 10), None, step=step)
        assert out["exp"].item() == 0.0
        out["loss"].backward()


def test_guidance_interval_skips_explanations(monkeypatch):
    calls: list[int] = []
    original = ex.EXPLAINERS["gradcam"]

    def counting(model, x, target, create_graph):
        calls.append(int(create_graph))
        return original(model, x, target, create_graph)

    monkeypatch.setitem(ex.EXPLAINERS, "gradcam", counting)
    student = _small("small_cnn", 0)
    x = torch.rand(2, 3, 32, 32)
    loss_fn = E2KDLoss(LossConfig(lam=1.0, guidance_interval=4))
    explained = []
    for step in range(10):
        maps = torch.rand(2, 32, 32) if loss_fn.explains_at(step) else None
        out = loss_fn(student, x, torch.randn(2, 10), maps, step=step)
        if out["exp"].item() != 0.0:
            explained.append(step)
    assert explained == [0, 4, 8]
    assert calls == [1, 1, 1]  # student explanations only, and only on those steps


@pytest.mark.parametrize("field,value", [
    ("lam", float("nan")), ("lam", -0.5), ("temperature", float("nan")), ("temperature", -1.0),
    ("temperature", 0.0), ("c_gt", float("inf")),
])
def test_loss_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        LossConfig(**{field: value})


def test_cosine_is_exact_for_tiny_maps():
    """An untrained B-cos student's W(x) is ~1e-15: the cosine (value and gradient) must still be
    the true one, not a clamped ~0. Reference: the textbook formula in float64 (F.cosine_similarity
    itself clamps each norm at 1e-8 and returns ~1e-6 here)."""
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(3, 6 * 8 * 8, generator=g, dtype=torch.float64) * 1e-15).requires_grad_(True)
    b = torch.rand(3, 6 * 8 * 8, generator=g, dtype=torch.float64)
    ours = cosine_per_sample(a, b)
    ref = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    assert torch.allclose(ours.double(), ref, rtol=1e-5), (ours, ref)
    (g_ours,) = torch.autograd.grad(ours.sum(), a)
    (g_ref,) = torch.autograd.grad(ref.sum(), a)
    assert torch.allclose(g_ours.double(), g_ref, rtol=1e-4, atol=1e-5 * float(g_ref.abs().max()))
