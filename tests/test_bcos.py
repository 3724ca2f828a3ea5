"""B-cos explanations: the dynamic-linear identity and the gradient flow of the B-cos e²KD loss."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from trainables.explainers import bcos_encode, explain
from trainables.losses import E2KDLoss, LossConfig
from trainables.models import build_model

torch.set_num_threads(1)


def _bcos_model(name: str, seed: int, size: int, dtype=torch.float64, num_classes: int = 10) -> nn.Module:
    """Random-init B-cos model whose BatchNorm running variances are calibrated on random data (with
    the default running_var = 1 the logits of a random B-cos net sit within 1e-6 of the logit bias,
    which would make the identity test vacuous)."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes).to(dtype)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        model.train()(bcos_encode(torch.rand(8, 3, size, size, dtype=dtype)))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def _logit_bias(model: nn.Module) -> float:
    """Where the bias lives: the bcos package's models end in ``logit_layer`` (a LogitLayer holding a
    plain float ``logit_bias``, and an optional temperature); our SmallBcosCNN has a ``logit_bias``
    parameter added after pooling."""
    net = model.net
    if hasattr(net, "logit_layer"):
        assert net.logit_layer.logit_temperature is None
        return float(net.logit_layer.logit_bias or 0.0)
    return float(net.logit_bias.detach())


@pytest.mark.parametrize("name,size,num_classes", [("small_bcos_cnn", 32, 10), ("bcos_resnet18", 64, 10),
                                                    ("bcos_resnet18", 64, 20)])
def test_contribution_identity(name, size, num_classes):
    model = _bcos_model(name, seed=0, size=size, num_classes=num_classes)
    torch.manual_seed(1)
    x = bcos_encode(torch.rand(3, 3, size, size, dtype=torch.float64))
    logits = model(x).detach()
    bias = _logit_bias(model)
    assert (logits - bias).abs().max() > 1e-3, "logits indistinguishable from the bias: test would be vacuous"
    for target in (logits.argmax(1), torch.tensor([0, 4, 9])):
        w = explain(model, x, target, method="bcos_weight", resize=False)
        assert w.maps.shape == x.shape  # W(x) has the 6 input channels
        total = (w.maps * x).sum(dim=(1, 2, 3)) + bias
        z = logits.gather(1, target[:, None])[:, 0]
        torch.testing.assert_close(total, z, rtol=1e-10, atol=1e-12)
        # the contribution explainer is the same sum, before the spatial sum
        c = explain(model, x, target, method="bcos_contrib", resize=False)
        torch.testing.assert_close(c.maps.sum(dim=(1, 2)) + bias, z, rtol=1e-10, atol=1e-12)

    # W(x) is taken with the dynamic factors detached: it is not the plain input gradient
    xg = x.clone().requires_grad_(True)
    t = logits.argmax(1)
    (plain,) = torch.autograd.grad(model(xg).gather(1, t[:, None]).sum(), xg)
    w = explain(model, x, t, method="bcos_weight", resize=False).maps
    assert (plain - w).abs().max() > 1e-3 * w.abs().max()


@pytest.mark.parametrize("name", ["small_bcos_cnn", "bcos_resnet18", "bcos_vit_tiny"])
@pytest.mark.parametrize("num_classes", [2, 20, 1000])
def test_logit_bias_follows_the_class_count(name, num_classes):
    """-log(C - 1) for the model's own class count (the bcos builders would keep ImageNet's -log 999):
    sigmoid(bias) = 1/C, the uniform prior, for 20-class multi-label VOC as for ImageNet."""
    import math

    model = build_model(name, num_classes)
    if name == "bcos_vit_tiny":  # the bias sits in the LogitLayer that ends its BcosSequential
        from bcos.modules.logitlayer import LogitLayer

        (layer,) = [m for m in model.modules() if isinstance(m, LogitLayer)]
        bias = float(layer.logit_bias)
    else:
        bias = _logit_bias(model)
    assert bias == pytest.approx(-math.log(num_classes - 1), abs=1e-6)
    assert torch.sigmoid(torch.tensor(bias)).item() == pytest.approx(1 / num_classes, rel=1e-5)


def _grads_of(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("multilabel", [False, True])
def test_bcos_e2kd_loss_reaches_every_parameter(multilabel):
    size = 32
    student = _bcos_model("small_bcos_cnn", seed=0, size=size).train()
    teacher = _bcos_model("small_bcos_cnn", seed=1, size=size)
    torch.manual_seed(2)
    x = bcos_encode(torch.rand(4, 3, size, size, dtype=torch.float64))
    te = explain(teacher, x, method="bcos_weight", create_graph=False)
    assert te.maps.shape == x.shape
    cfg = LossConfig(temperature=1.0, lam=5.0, explainer="bcos_weight", multilabel=multilabel)
    out = E2KDLoss(cfg)(student, x, te.logits, te.maps)
    assert out["exp"].item() > 1e-3

    grads = _grads_of(student, out["loss"])
    assert all(p.grad is None for p in teacher.parameters())
    # Softmax KD and W(x) are both invariant to a constant logit shift, so SmallBcosCNN's trainable
    # logit_bias gets an exactly-zero gradient under single-label e²KD; multi-label KD (sigmoid) moves it.
    shift_invariant = set() if multilabel else {"net.logit_bias"}
    for n, g in grads.items():
        assert g is not None, f"{n}: no gradient"
        assert torch.isfinite(g).all(), n
        if n in shift_invariant:
            assert g.abs().max() < 1e-6, f"{n}: expected a zero gradient (up to the float32 loss)"
        else:
            assert g.abs().max() > 0, f"{n}: zero gradient"

    # the explanation term on its own (double backward through W(x)) reaches every conv/norm weight
    out = E2KDLoss(cfg)(student, x, te.logits, te.maps)
    exp_grads = _grads_of(student, out["exp"])
    for n, g in exp_grads.items():
        if n == "net.logit_bias":
            continue  # W(x) does not depend on the bias
        assert g is not None and g.abs().max() > 0, f"{n}: the explanation term sends no gradient"
