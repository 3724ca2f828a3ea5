"""Evaluation metrics as all-reducible accumulators (Ray Train / torch.distributed).

Every accumulator keeps its running sums and counts in one float64 tensor (``state_tensor()``), so a
distributed evaluation is: each worker ``update``s on its shard, then ``all_reduce()`` (a SUM over
the process group; a no-op when torch.distributed is not initialised), then ``compute()``. Sums of
per-sample quantities are exact under a SUM reduce, so the result equals the metric on the
concatenated data. The state lives on the device of the first update (no host sync per batch);
``compute()`` moves it to the CPU once.

:class:`MetricSet` bundles the accumulators a dataset needs and returns one flat dict with stable
names: ``acc``, ``agreement``, ``exp_sim``, ``group_acc_{g}``, ``worst_group_acc``, ``epg``,
``iou``, ``f1`` (and ``f1_macro``). A value with no data behind it is NaN.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from trainables.explainers import resize_maps
from trainables.losses import cosine_per_sample

Box = Sequence[float]  # (x0, y0, x1, y1) in pixel coordinates of the map


def _nan_div(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def _dist_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _comm_device(state: Tensor) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo/mpi take CPU tensors (gloo also takes CUDA)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return state.device if state.device.type == "cpu" else torch.device("cpu")


def all_reduce_sum(state: Tensor, group=None) -> Tensor:
    """SUM ``state`` over the process group (returns a new tensor on state's device); identity when
    torch.distributed is not initialised."""
    if not _dist_active():
        return state
    buf = state.detach().to(_comm_device(state), torch.float64).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf.to(state.device)


class Metric:
    """Base accumulator: a float64 state vector of fixed length ``size``."""

    def __init__(self, size: int):
        self._size = size
        self._state = torch.zeros(size, dtype=torch.float64)

    # --- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        self._state = torch.zeros(self._size, dtype=torch.float64)

    def state_tensor(self) -> Tensor:
        return self._state

    def load_state_tensor(self, state: Tensor) -> None:
        if state.shape != (self._size,):
            raise ValueError(f"{type(self).__name__}: state must have shape ({self._size},), got {tuple(state.shape)}")
        self._state = state.detach().to(torch.float64).clone()

    def all_reduce(self, group=None) -> None:
        self._state = all_reduce_sum(self._state, group)

    def _add(self, delta: Tensor) -> None:
        if self._state.device != delta.device:
            self._state = self._state.to(delta.device)
        self._state += delta.detach().to(torch.float64)

    def _host(self) -> list[float]:
        return self._state.cpu().tolist()

    # --- interface ---------------------------------------------------------------------------
    def update(self, *args, **kwargs) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute(self) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError


def _stack(*xs: Tensor) -> Tensor:
    return torch.stack([x.to(torch.float64) for x in xs])


class Accuracy(Metric):
    """Top-1 accuracy against integer labels. State: [correct, count]."""

    def __init__(self, name: str = "acc"):
        super().__init__(2)
        self.name = name

    def update(self, logits: Tensor, labels: Tensor) -> None:
        correct = (logits.detach().argmax(dim=1) == labels).sum()
        self._add(_stack(correct, torch.tensor(labels.numel(), device=labels.device)))

    def compute(self) -> dict[str, float]:
        correct, count = self._host()
        return {self.name: _nan_div(correct, count)}


class Agreement(Accuracy):
    """Fraction of samples with argmax student == argmax teacher. State: [agree, count]."""

    def __init__(self, name: str = "agreement"):
        super().__init__(name)

    def update(self, logits: Tensor, teacher_logits: Tensor) -> None:  # type: ignore[override]
        super().update(logits, teacher_logits.detach().argmax(dim=1))


class ExplanationSimilarity(Metric):
    """Mean per-sample cosine of teacher vs student maps (same cosine as the loss; teacher maps of
    another resolution are resized to the student's, as in ``explanation_loss``). State: [Σcos, n]."""

    def __init__(self, name: str = "exp_sim"):
        super().__init__(2)
        self.name = name

    def update(self, maps: Tensor, teacher_maps: Tensor) -> None:
        maps = maps.detach()
        teacher_maps = resize_maps(teacher_maps.detach().to(maps.dtype), maps.shape[-2:])
        # float64: an evaluation metric, summed across workers, should not depend on how the data
        # was split into batches (float32 reductions round differently for different shapes).
        cos = cosine_per_sample(maps.double(), teacher_maps.double())
        self._add(_stack(cos.sum(), torch.tensor(cos.numel(), device=cos.device)))

    def compute(self) -> dict[str, float]:
        s, n = self._host()
        return {self.name: _nan_div(s, n)}


class GroupAccuracy(Metric):
    """Accuracy per group (ints in [0, num_groups)) plus the worst group's accuracy (over groups that
    have samples). State: [correct_0..G-1, count_0..G-1]."""

    def __init__(self, num_groups: int, prefix: str = "group_acc"):
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        super().__init__(2 * num_groups)
        self.num_groups = num_groups
        self.prefix = prefix

    def update(self, logits: Tensor, labels: Tensor, groups: Tensor) -> None:
        groups = groups.long()
        if groups.numel() and (groups.min() < 0 or groups.max() >= self.num_groups):
            raise ValueError(f"group ids must lie in [0, {self.num_groups}), got {groups.min().item()}..{groups.max().item()}")
        correct = (logits.detach().argmax(dim=1) == labels).to(torch.float64)
        g = self.num_groups
        c = torch.zeros(g, dtype=torch.float64, device=correct.device).index_add_(0, groups, correct)
        n = torch.bincount(groups, minlength=g).to(torch.float64)
        self._add(torch.cat([c, n]))

    def compute(self) -> dict[str, float]:
        s = self._host()
        g = self.num_groups
        accs = [_nan_div(s[i], s[g + i]) for i in range(g)]
        out = {f"{self.prefix}_{i}": a for i, a in enumerate(accs)}
        present = [a for a in accs if not math.isnan(a)]
        out[f"worst_{self.prefix}"] = min(present) if present else math.nan
        return out


def boxes_to_mask(boxes: Iterable[Box], size: Sequence[int], device=None) -> Tensor:
    """Union of boxes as a bool mask [H, W]. A box (x0, y0, x1, y1) covers the pixels whose index
    lies in [floor(x0), ceil(x1)) × [floor(y0), ceil(y1)), clipped to the map; coordinates are in
    the map's own pixels (the data layer rescales dataset boxes, e.g. VOC's 1-based inclusive ones)."""
    h, w = int(size[0]), int(size[1])
    mask = torch.zeros(h, w, dtype=torch.bool, device=device)
    for x0, y0, x1, y1 in boxes:
        c0, r0 = max(0, math.floor(x0)), max(0, math.floor(y0))
        c1, r1 = min(w, math.ceil(x1)), min(h, math.ceil(y1))
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = True
    return mask


def epg_iou(maps: Tensor, masks: Tensor, eps: float = 1e-7, threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """Per-map EPG and IoU for contribution maps [N, H, W] and box masks [N, H, W] (one row per
    (image, present class)).

    a⁺ = ReLU(map). EPG = Σ a⁺·M / Σ a⁺ (0 when Σ a⁺ < eps). IoU: a⁺ min-max normalised per map,
    thresholded at ``>= threshold``, IoU with M (a constant map predicts nothing; empty ∪ → 0)."""
    if maps.shape != masks.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and box masks {tuple(masks.shape)} must have the same shape")
    a = maps.detach().to(torch.float64).clamp_min(0).flatten(1)
    m = masks.flatten(1).to(torch.float64)
    total = a.sum(dim=1)
    epg = torch.where(total >= eps, (a * m).sum(dim=1) / total.clamp_min(eps), torch.zeros_like(total))
    lo = a.min(dim=1, keepdim=True).values
    hi = a.max(dim=1, keepdim=True).values
    span = hi - lo
    norm = torch.where(span > 0, (a - lo) / span.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(a))
    pred = (norm >= threshold).to(torch.float64)
    inter = (pred * m).sum(dim=1)
    union = ((pred + m) > 0).to(torch.float64).sum(dim=1)
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union))
    return epg, iou


class Localisation(Metric):
    """Mean EPG and IoU over (image, present class) pairs. State: [ΣEPG, ΣIoU, n]."""

    def __init__(self) -> None:
        super().__init__(3)

    def update(self, contrib_maps: Tensor, box_masks: Tensor) -> None:
        """``contrib_maps`` [N, H, W]: contribution maps of the present class of each row;
        ``box_masks`` [N, H, W]: the union of that class's boxes (see :func:`boxes_to_mask`)."""
        epg, iou = epg_iou(contrib_maps, box_masks)
        self._add(_stack(epg.sum(), iou.sum(), torch.tensor(epg.numel(), device=epg.device)))

    def compute(self) -> dict[str, float]:
        e, i, n = self._host()
        return {"epg": _nan_div(e, n), "iou": _nan_div(i, n)}


class MultiLabelF1(Metric):
    """Multi-label F1 with prediction = logit > 0. State: [tp_c, fp_c, fn_c] per class.

    ``f1`` is micro-F1 (pooled counts); ``f1_macro`` the mean of per-class F1, where a class with no
    positives and no predictions scores 0 (sklearn's default ``zero_division``)."""

    def __init__(self, num_classes: int):
        super().__init__(3 * num_classes)
        self.num_classes = num_classes

    def update(self, logits: Tensor, labels: Tensor) -> None:
        if logits.shape != labels.shape:
            raise ValueError(f"multi-label logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must match")
        pred = logits.detach() > 0
        true = labels > 0.5
        tp = (pred & true).sum(dim=0)
        fp = (pred & ~true).sum(dim=0)
        fn = (~pred & true).sum(dim=0)
        self._add(torch.cat([tp, fp, fn]).to(torch.float64))

    def compute(self) -> dict[str, float]:
        s = self._state.cpu().view(3, self.num_classes)
        tp, fp, fn = s[0], s[1], s[2]
        den = 2 * tp + fp + fn
        micro = 2 * tp.sum().item() / den.sum().item() if den.sum() > 0 else 0.0
        per_class = torch.where(den > 0, 2 * tp / den.clamp_min(1), torch.zeros_like(den))
        return {"f1": micro, "f1_macro": per_class.mean().item()}


# Which inputs each accumulator reads (keywords of MetricSet.update).
_INPUTS: dict[type, tuple[str, ...]] = {
    Accuracy: ("logits", "labels"),
    Agreement: ("logits", "teacher_logits"),
    ExplanationSimilarity: ("maps", "teacher_maps"),
    GroupAccuracy: ("logits", "labels", "groups"),
    Localisation: ("contrib_maps", "box_masks"),
    MultiLabelF1: ("logits", "labels"),
}


class MetricSet:
    """The accumulators one dataset needs, updated together, reduced with one all_reduce."""

    def __init__(self, metrics: Sequence[Metric]):
        self.metrics = list(metrics)

    @classmethod
    def build(cls, *, acc: bool = True, agreement: bool = True, exp_sim: bool = False, num_groups: int = 0,
              localisation: bool = False, multilabel_classes: int = 0) -> MetricSet:
        """Single-label: acc/agreement (+ exp_sim, + per-group accuracy when ``num_groups`` > 0).
        Multi-label (``multilabel_classes`` > 0): F1 replaces accuracy; ``localisation`` adds EPG/IoU."""
        ms: list[Metric] = []
        if multilabel_classes:
            ms.append(MultiLabelF1(multilabel_classes))
        elif acc:
            ms.append(Accuracy())
        if agreement and not multilabel_classes:
            ms.append(Agreement())
        if exp_sim:
            ms.append(ExplanationSimilarity())
        if num_groups:
            ms.append(GroupAccuracy(num_groups))
        if localisation:
            ms.append(Localisation())
        return cls(ms)

    def update(self, **inputs: Tensor | None) -> None:
        """Pass what the batch has: logits, labels, teacher_logits, maps, teacher_maps, groups,
        contrib_maps, box_masks. Every metric in the set must find its inputs."""
        for m in self.metrics:
            names = _INPUTS[type(m)]
            missing = [n for n in names if inputs.get(n) is None]
            if missing:
                raise ValueError(f"{type(m).__name__} needs {', '.join(missing)}")
            m.update(*(inputs[n] for n in names))

    def reset(self) -> None:
        for m in self.metrics:
            m.reset()

    def state_tensor(self) -> Tensor:
        return torch.cat([m.state_tensor().cpu() for m in self.metrics]) if self.metrics else torch.zeros(0, dtype=torch.float64)

    def load_state_tensor(self, state: Tensor) -> None:
        i = 0
        for m in self.metrics:
            m.load_state_tensor(state[i:i + m._size])
            i += m._size
        if i != state.numel():
            raise ValueError(f"MetricSet state has {state.numel()} entries, expected {i}")

    def all_reduce(self, group=None) -> None:
        """One SUM all_reduce of every accumulator's state (no-op without torch.distributed)."""
        if _dist_active() and self.metrics:
            self.load_state_tensor(all_reduce_sum(self.state_tensor(), group))

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for m in self.metrics:
            out.update(m.compute())
        return out


__all__ = ["Metric", "Accuracy", "Agreement", "ExplanationSimilarity", "GroupAccuracy", "Localisation",
           "MultiLabelF1", "MetricSet", "boxes_to_mask", "epg_iou", "all_reduce_sum"]
