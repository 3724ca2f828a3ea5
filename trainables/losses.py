"""e²KD losses (Parchami-Araghi et al., "Good Teachers Explain", ECCV 2024):

    L = c_gt · CE(z_S, y) + τ² · KL(softmax(z_T/τ) ‖ softmax(z_S/τ)) + λ · mean_i[1 − cos(E_T,i, E_S,i)]

:class:`E2KDLoss` returns a dict of named components (timm style); ``loss`` is what to backward.
Explanations are for the teacher's top-1 class, for both models. λ = 0 never calls an explainer.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.explainers import EXPLAINER_FAMILY, EXPLAINERS, explain, resize_maps
from trainables.models import unwrap


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """τ² · KL(p_T ‖ p_S), summed over classes, averaged over the batch ("batchmean")."""
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * t * t


def multilabel_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                       eps: float = 1e-6) -> Tensor:
    """Multi-label KD (Yang et al., ICCV 2023): per class a binary KL between sigmoid(z_T/τ) and
    sigmoid(z_S/τ), probabilities clamped to [eps, 1-eps]; summed over classes, batch mean, τ²."""
    t = temperature
    p_t = torch.sigmoid(teacher_logits / t).clamp(eps, 1 - eps)
    p_s = torch.sigmoid(student_logits / t).clamp(eps, 1 - eps)
    kl = p_t * (p_t.log() - p_s.log()) + (1 - p_t) * ((1 - p_t).log() - (1 - p_s).log())
    return kl.sum(dim=1).mean() * t * t


def _unit_scale(m: Tensor) -> Tensor:
    """Divide each row by its (detached) max |value|. Cosine is scale-invariant and its gradient is
    homogeneous of degree -1, so value and gradient are unchanged; what changes is that maps of
    ~1e-15 (an untrained B-cos network's W(x)) no longer underflow the eps guard below."""
    return m / m.detach().abs().amax(dim=1, keepdim=True).clamp_min(1e-30)


def cosine_per_sample(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """Cosine similarity of the flattened maps, per sample, with no normalisation of the maps.

    The denominator is clamped *before* the square root, so an all-zero map gives cos = 0 with a
    finite (zero) gradient, where F.cosine_similarity's norm would differentiate 0/0.
    """
    # bf16/fp16 maps (autocast) are upcast; float64 stays float64 (tests, metrics on float64 data).
    a = _unit_scale(a.flatten(1) if a.dtype in (torch.float32, torch.float64) else a.flatten(1).float())
    b = _unit_scale(b.flatten(1) if b.dtype in (torch.float32, torch.float64) else b.flatten(1).float())
    if a.dtype != b.dtype:
        a, b = a.double(), b.double()
    dot = (a * b).sum(dim=1)
    denom = ((a * a).sum(dim=1) * (b * b).sum(dim=1)).clamp_min(eps * eps).sqrt()
    return dot / denom


def explanation_loss(student_maps: Tensor, teacher_maps: Tensor) -> Tensor:
    """mean_i [1 − cos(E_T,i, E_S,i)]; maps of different resolutions are resized to the student's."""
    teacher_maps = resize_maps(teacher_maps.to(student_maps.dtype), student_maps.shape[-2:])
    return (1.0 - cosine_per_sample(student_maps, teacher_maps)).mean()


@dataclass(frozen=True)
class LossConfig:
    temperature: float = 1.0  # τ
    lam: float = 0.0  # λ, explanation-loss weight; 0 = plain KD
    c_gt: float = 0.0  # label-loss weight (0 in every paper run)
    guidance_interval: int = 1  # K: explanation term only every K-th step
    explainer: str = "gradcam"
    multilabel: bool = False

    def __post_init__(self) -> None:
        for name in ("temperature", "lam", "c_gt"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or math.isnan(v) or math.isinf(v):
                raise ValueError(f"loss.{name} must be a finite number, got {v!r}")
        if self.temperature <= 0:
            raise ValueError(f"loss.temperature must be > 0, got {self.temperature}")
        if self.lam < 0 or self.c_gt < 0:
            raise ValueError(f"loss.lam and loss.c_gt must be >= 0, got lam={self.lam}, c_gt={self.c_gt}")
        if int(self.guidance_interval) != self.guidance_interval or self.guidance_interval < 1:
            raise ValueError(f"loss.guidance_interval must be an integer >= 1, got {self.guidance_interval}")
        if self.explainer not in EXPLAINERS:
            raise ValueError(f"loss.explainer: unknown explainer {self.explainer!r}; known: {', '.join(sorted(EXPLAINERS))}")


class E2KDLoss(nn.Module):
    """Combines label, KD and explanation terms; returns a dict of named components.

    Call ``explains_at(step)`` first to know whether this step needs the teacher's maps (so a live
    teacher computes them only then), then ``forward``.
    """

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg

    def explains_at(self, step: int) -> bool:
        return self.cfg.lam > 0 and step % self.cfg.guidance_interval == 0

    def forward(self, student: nn.Module, x: Tensor, teacher_logits: Tensor, teacher_maps: Tensor | None,
                labels: Tensor | None = None, step: int = 0) -> dict[str, Tensor]:
        cfg = self.cfg
        teacher_logits = teacher_logits.detach().float()
        out: dict[str, Tensor] = {}
        if self.explains_at(step):
            if teacher_maps is None:
                raise ValueError("λ > 0 at this step but no teacher maps were given")
            # Explain the teacher's top-1 class for the student too (never the label).
            target = teacher_logits.argmax(dim=1)
            e = explain(student, x, target, cfg.explainer, create_graph=True)
            logits = e.logits
            out["exp"] = explanation_loss(e.maps, teacher_maps.detach())
        else:
            # B-cos students always run in explanation mode, as in the reference code, so KD-only
            # steps (λ = 0 or between guidance steps) see the same forward semantics.
            bcos = EXPLAINER_FAMILY[cfg.explainer] == "bcos"
            with unwrap(student).explanation_mode() if bcos else contextlib.nullcontext():
                logits = student(x)
            out["exp"] = logits.new_zeros(())
        logits = logits.float()
        if cfg.multilabel:
            out["kd"] = multilabel_kd_loss(logits, teacher_logits, cfg.temperature)
        else:
            out["kd"] = kd_loss(logits, teacher_logits, cfg.temperature)
        if cfg.c_gt > 0:
            if labels is None:
                raise ValueError("loss.c_gt > 0 needs labels")
            ce = (F.binary_cross_entropy_with_logits(logits, labels.float()) if cfg.multilabel
                  else F.cross_entropy(logits, labels))
            out["ce"] = ce
        else:
            out["ce"] = logits.new_zeros(())
        out["loss"] = cfg.c_gt * out["ce"] + out["kd"] + cfg.lam * out["exp"]
        out["logits"] = logits.detach()
        return out
