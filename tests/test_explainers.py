"""GradCAM against independent implementations (pytorch-grad-cam 1.5.7, captum), the analytic CAM
against the double-backward route, and the no-graph teacher path."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import trainables.explainers as ex
from trainables.explainers import analytic_cam, autograd_cam, bcos_encode, explain
from trainables.losses import E2KDLoss, LossConfig
from trainables.models import build_model

torch.set_num_threads(1)

# (architecture, input size, target layer = the module whose output is ``features(x)``)
CASES = [
    ("resnet18", 224, lambda m: m.net.layer4),
    ("small_cnn", 32, lambda m: m.net.body[-1]),
    ("tiny_mobilenet", 32, lambda m: m.net.body[-1]),  # the laptop experiments' second student
    # general route: the MobileNetV3 head is an MLP (no cam_linear)
    ("mobilenet_v3_small", 96, lambda m: m.net.features[-1]),
]


def _model(name: str, seed: int = 0, num_classes: int = 10, dtype=torch.float32, size: int = 32):
    """Random-init model in eval mode with BatchNorm statistics calibrated on random data: with the
    default running stats (mean 0, var 1) deep random nets such as MobileNetV3 output ~1e-10 logits,
    and grad-cam's 1e-7 normalisation epsilon would dominate the comparison."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes).to(dtype)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch sets the statistics
    x = torch.rand(8, 3, size, size, dtype=dtype)
    with torch.no_grad():
        model.train()(bcos_encode(x) if model.is_bcos else x)
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1)
    lo = flat.min(dim=1).values[:, None, None]
    hi = flat.max(dim=1).values[:, None, None]
    return (maps - lo) / (hi - lo)


@pytest.mark.parametrize("name,size,layer", CASES, ids=[c[0] for c in CASES])
def test_gradcam_matches_pytorch_grad_cam_and_captum(name, size, layer):
    model = _model(name, size=size)
    torch.manual_seed(1)
    x = torch.rand(2, 3, size, size)
    # explain the top-1 class and a fixed other class
    for target in (None, torch.tensor([3, 7])):
        ours = explain(model, x, target, method="gradcam", resize=True)
        assert ours.maps.shape == (2, size, size)
        t = ours.target
        assert (ours.maps.flatten(1).max(dim=1).values > 0).all(), "degenerate all-zero CAM makes the test vacuous"

        # pytorch-grad-cam: min-max normalised per image (before and after its resize), so compare
        # against min-max(ours); both resizes are bilinear with half-pixel centres.
        with GradCAM(model=model, target_layers=[layer(model)]) as cam:
            ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t])
        ref = torch.from_numpy(ref)
        assert (_minmax(ours.maps) - ref).abs().max().item() <= 1e-5

        # captum LayerGradCam (+ReLU) is unnormalised: compare values directly, at the native
        # resolution and after bilinear upsampling (align_corners=False).
        lgc = LayerGradCam(model, layer(model))
        attr = lgc.attribute(x, target=t, relu_attributions=True).detach()  # [B, 1, h, w]
        native = explain(model, x, t, method="gradcam", resize=False).maps
        scale = attr.abs().max().item()
        assert scale > 0
        assert (native - attr[:, 0]).abs().max().item() <= 1e-5 * max(1.0, scale)
        up = F.interpolate(attr, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        assert (ours.maps - up).abs().max().item() <= 1e-5 * max(1.0, scale)
        # relative to the map's own scale too (random-init CAMs are small numbers)
        assert (ours.maps - up).abs().max().item() <= 1e-4 * scale


def test_route_is_chosen_automatically(monkeypatch):
    x = torch.randn(2, 3, 64, 64)
    resnet = _model("resnet18")
    mobilenet = _model("mobilenet_v3_small")
    assert resnet.cam_linear is not None and mobilenet.cam_linear is None

    def boom(*a, **k):
        raise AssertionError("wrong GradCAM route")

    # GAP+linear head: analytic CAM only, never autograd
    with monkeypatch.context() as mp:
        mp.setattr(ex, "autograd_cam", boom)
        for cg in (False, True):
            explain(resnet, x, method="gradcam", create_graph=cg)
    # MLP head: the general autograd route, never the analytic one
    with monkeypatch.context() as mp:
        mp.setattr(ex, "analytic_cam", boom)
        for cg in (False, True):
            explain(mobilenet, x, method="gradcam", create_graph=cg)


@pytest.mark.parametrize("name,size", [("small_cnn", 32), ("resnet18", 64)])
def test_analytic_cam_equals_double_backward_in_value_and_gradient(name, size):
    student = _model(name, seed=0, dtype=torch.float64).train()
    teacher = _model(name, seed=1, dtype=torch.float64)
    torch.manual_seed(2)
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    te = explain(teacher, x, method="gradcam", create_graph=False)

    # the analytic map is the autograd GradCAM map (same features, same class), not just up to scale
    student.eval()
    logits, a = student(x, with_features=True)
    t = te.logits.argmax(1)
    torch.testing.assert_close(analytic_cam(a, student.cam_linear, t), autograd_cam(a, logits, t, create_graph=True),
                               rtol=1e-12, atol=1e-15)
    student.train()

    results = {}
    for method in ("gradcam", "gradcam_autograd"):
        student.zero_grad(set_to_none=True)
        out = E2KDLoss(LossConfig(temperature=2.0, lam=5.0, explainer=method))(student, x, te.logits, te.maps)
        out["loss"].backward()
        assert out["exp"].item() > 1e-3  # the explanation term is really there
        results[method] = (out["loss"].detach(), out["exp"].detach(),
                           {n: p.grad.clone() for n, p in student.named_parameters()})

    (la, ea, ga), (lb, eb, gb) = results["gradcam"], results["gradcam_autograd"]
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=0)
    torch.testing.assert_close(ea, eb, rtol=1e-6, atol=0)
    assert ga.keys() == {n for n, p in student.named_parameters() if p.requires_grad}
    for n in ga:
        ref = gb[n]
        assert ref.abs().max() > 0, f"{n}: zero gradient"
        rel = ((ga[n] - ref).norm() / ref.norm()).item()
        assert rel <= 1e-5, f"{n}: relative gradient error {rel:.2e}"


@pytest.mark.parametrize("name,method,size", [
    ("small_cnn", "gradcam", 32),  # analytic
    ("mobilenet_v3_small", "gradcam", 64),  # general route
    ("small_cnn", "gradcam_autograd", 32),
    ("small_bcos_cnn", "bcos_weight", 32),
    ("small_bcos_cnn", "bcos_contrib", 32),
])
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_teacher_path_builds_no_graph(name, method, size, frozen):
    teacher = _model(name)
    if frozen:  # the usual way to hold a teacher: parameters with requires_grad=False
        teacher.requires_grad_(False)
    x = torch.rand(2, 3, size, size)
    if teacher.is_bcos:
        x = bcos_encode(x)
    e = explain(teacher, x, method=method, create_graph=False)
    for t in (e.logits, e.maps):
        assert not t.requires_grad and t.grad_fn is None
    assert all(p.grad is None for p in teacher.parameters())
    # the same maps as the student path's (which, by contrast, is differentiable)
    s = explain(teacher.requires_grad_(True), x, method=method, create_graph=True)
    assert s.maps.requires_grad and s.logits.requires_grad
    torch.testing.assert_close(e.maps, s.maps.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(e.logits, s.logits.detach(), rtol=1e-5, atol=1e-7)


def test_bcos_explainer_on_standard_cnn_raises():
    model = _model("small_cnn")
    x = torch.rand(2, 3, 32, 32)
    for method in ("bcos_weight", "bcos_contrib"):
        with pytest.raises(ValueError, match="needs a B-cos model"):
            explain(model, x, method=method)
    bcos = _model("small_bcos_cnn")
    with pytest.raises(ValueError, match="needs a standard CNN"):
        explain(bcos, bcos_encode(x), method="gradcam")
    with pytest.raises(ValueError, match="unknown explainer"):
        explain(model, x, method="lime")
