"""Differentiable explanations, one registry, one entry point: :func:`explain`.

``explain(model, x, target, method, create_graph)`` runs the model's forward once and returns an
:class:`Explanation` (logits + maps). ``target=None`` explains the model's own top-1 class; e²KD
passes the teacher's top-1 for both models.

- ``create_graph=False`` is the teacher path: no autograd graph beyond what the explanation
  strictly needs (analytic GradCAM: none at all; general GradCAM: only the head; B-cos: the
  input gradient, then freed).
- ``create_graph=True`` is the student path: the maps are differentiable w.r.t. the student's
  parameters. Gradients are taken with ``torch.autograd.grad`` (out of place): under DDP a
  ``.backward(create_graph=True)`` would write into ``.grad`` and trigger DDP's all-reduce hooks
  before the real backward.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.models import Classifier, unwrap


@dataclass
class Explanation:
    logits: Tensor  # [B, C]
    maps: Tensor  # [B, H, W] (GradCAM, B-cos contribution) or [B, 6, H, W] (B-cos W(x))
    target: Tensor  # [B] the explained class


ExplainFn = Callable[[nn.Module, Tensor, "Tensor | None", bool], Explanation]
EXPLAINERS: dict[str, ExplainFn] = {}
# Which model family each explainer needs ("standard" = any Classifier with a feature map).
EXPLAINER_FAMILY: dict[str, str] = {}


def register_explainer(name: str, family: str):
    def deco(fn: ExplainFn) -> ExplainFn:
        EXPLAINERS[name] = fn
        EXPLAINER_FAMILY[name] = family
        return fn

    return deco


def check_compatible(model: nn.Module, method: str) -> None:
    """Raise a clear error when an explainer cannot explain this model (e.g. B-cos on a ResNet)."""
    if method not in EXPLAINERS:
        raise ValueError(f"unknown explainer {method!r}; known: {', '.join(sorted(EXPLAINERS))}")
    is_bcos = unwrap(model).is_bcos
    family = EXPLAINER_FAMILY[method]
    if family == "bcos" and not is_bcos:
        raise ValueError(f"explainer {method!r} needs a B-cos model, got {type(unwrap(model).net).__name__}")
    if family == "standard" and is_bcos:
        raise ValueError(f"explainer {method!r} needs a standard CNN; use bcos_weight for B-cos models")


def explain(model: nn.Module, x: Tensor, target: Tensor | None = None, method: str = "gradcam",
            create_graph: bool = False, resize: bool = True) -> Explanation:
    """Explain ``target`` (or the top-1 class) of ``model`` on ``x``.

    ``resize=True`` returns maps at the input resolution (bilinear, align_corners=False), which is
    what the loss compares; ``resize=False`` keeps the native resolution (what the cache stores).
    """
    check_compatible(model, method)
    e = EXPLAINERS[method](model, x, target, create_graph)
    if resize:
        e.maps = resize_maps(e.maps, x.shape[-2:])
    return e


def resize_maps(maps: Tensor, size) -> Tensor:
    """Bilinear resize of [B,H,W] or [B,C,H,W] maps to ``size`` (align_corners=False)."""
    size = tuple(size)
    if tuple(maps.shape[-2:]) == size:
        return maps
    squeeze = maps.dim() == 3
    m = maps.unsqueeze(1) if squeeze else maps
    m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
    return m.squeeze(1) if squeeze else m


def _select(logits: Tensor, target: Tensor | None) -> Tensor:
    return logits.detach().argmax(dim=1) if target is None else target


# ------------------------------------ GradCAM ------------------------------------------------


def analytic_cam(a: Tensor, linear: nn.Linear, target: Tensor) -> Tensor:
    """GradCAM for a GAP + linear head, in closed form.

    dy_c/dA_k(h,w) = W[c,k]/(HW) everywhere, so alpha_k = W[c,k]/(HW) and
    GradCAM = ReLU(sum_k W[c,k] A_k) / (HW): exact in value and gradient, no double backward.
    """
    w = linear.weight[target]  # [B, K]
    hw = a.shape[-2] * a.shape[-1]
    return F.relu(torch.einsum("bkhw,bk->bhw", a, w)) / hw


def autograd_cam(a: Tensor, logits: Tensor, target: Tensor, create_graph: bool) -> Tensor:
    """GradCAM through autograd: alpha = spatial mean of d y_c / d A."""
    y = logits.gather(1, target[:, None]).sum()
    (grad,) = torch.autograd.grad(y, a, create_graph=create_graph)
    alpha = grad.mean(dim=(2, 3), keepdim=True)
    return F.relu((alpha * a).sum(dim=1))


@register_explainer("gradcam", family="standard")
def gradcam(model: nn.Module, x: Tensor, target: Tensor | None, create_graph: bool) -> Explanation:
    """Analytic CAM when the head is GAP+linear, otherwise the general autograd route."""
    inner = unwrap(model)
    linear = inner.cam_linear
    if create_graph:
        logits, a = model(x, with_features=True)
        t = _select(logits, target)
        maps = analytic_cam(a, linear, t) if linear is not None else autograd_cam(a, logits, t, True)
        return Explanation(logits, maps, t)
    if linear is not None:
        # Teacher, analytic: no graph at all.
        with torch.no_grad():
            logits, a = model(x, with_features=True)
            t = _select(logits, target)
            return Explanation(logits, analytic_cam(a, linear, t), t)
    return _frozen_head_cam(inner, x, target)


def _frozen_head_cam(inner: Classifier, x: Tensor, target: Tensor | None) -> Explanation:
    """Teacher-side autograd GradCAM: the backbone runs without a graph and A is made a leaf, so
    only the head is differentiated — also when the teacher's parameters are frozen
    (requires_grad=False, where A would carry no graph at all otherwise)."""
    with torch.no_grad():
        a = inner.features(x)
    with torch.enable_grad():
        a = a.detach().requires_grad_(True)
        logits = inner.head(a)
        t = _select(logits, target)
        maps = autograd_cam(a, logits, t, create_graph=False)
    return Explanation(logits.detach(), maps.detach(), t)


@register_explainer("gradcam_autograd", family="standard")
def gradcam_autograd(model: nn.Module, x: Tensor, target: Tensor | None, create_graph: bool) -> Explanation:
    """GradCAM always through autograd (the reference code's double-backward route for students).
    Kept as a second code path: tests and the step benchmark compare it with the analytic CAM."""
    if create_graph:
        logits, a = model(x, with_features=True)
        t = _select(logits, target)
        return Explanation(logits, autograd_cam(a, logits, t, True), t)
    return _frozen_head_cam(unwrap(model), x, target)


# ------------------------------------ B-cos --------------------------------------------------


def bcos_dynamic_weight(model: nn.Module, x: Tensor, target: Tensor | None, create_graph: bool) -> Explanation:
    """W_t(x) = d z_t / d x inside explanation_mode (dynamic factors detached), [B, 6, H, W].

    The logits come from the same explanation-mode forward; in that mode the forward values are
    unchanged. Students are trained through this forward, as in the reference code.
    """
    inner = unwrap(model)
    with inner.explanation_mode(), torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        logits = model(xg)
        t = _select(logits, target)
        y = logits.gather(1, t[:, None]).sum()
        (w,) = torch.autograd.grad(y, xg, create_graph=create_graph)
    if not create_graph:
        logits, w = logits.detach(), w.detach()
    return Explanation(logits, w, t)


@register_explainer("bcos_weight", family="bcos")
def bcos_weight(model: nn.Module, x: Tensor, target: Tensor | None, create_graph: bool) -> Explanation:
    return bcos_dynamic_weight(model, x, target, create_graph)


@register_explainer("bcos_contrib", family="bcos")
def bcos_contrib(model: nn.Module, x: Tensor, target: Tensor | None, create_graph: bool) -> Explanation:
    """Contribution map sum_ch W_t(x) * x, [B, H, W]: what EPG/IoU evaluate."""
    e = bcos_dynamic_weight(model, x, target, create_graph)
    e.maps = (e.maps * x).sum(dim=1)
    return e


def bcos_encode(x: Tensor) -> Tensor:
    """[r,g,b] in [0,1] -> [r,g,b,1-r,1-g,1-b]: the B-cos input encoding (no mean/std)."""
    return torch.cat([x, 1 - x], dim=1)


def needs_explanation_mode(method: str) -> bool:
    return EXPLAINER_FAMILY.get(method) == "bcos"


def model_family(model: nn.Module) -> str:
    return "bcos" if unwrap(model).is_bcos else "standard"


__all__ = ["Explanation", "EXPLAINERS", "explain", "analytic_cam", "autograd_cam", "resize_maps",
           "bcos_encode", "check_compatible", "Classifier"]
