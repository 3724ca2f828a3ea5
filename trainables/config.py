"""Typed configuration of one distillation run (one Tune trial).

Every field has a dotted name (``loss.lam``, ``optim.lr``, ``student``): the same names are the
search-space keys, the ``--set`` override keys and the MLflow params, so a run's configuration
reads the same everywhere. ``flatten``/``with_overrides`` are the only two conversions.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from trainables.data.config import DataConfig
from trainables.explainers import EXPLAINER_FAMILY
from trainables.losses import LossConfig
from trainables.models import MODELS


@dataclass(frozen=True)
class OptimConfig:
    """The paper's optimisers: AdamW (standard students) and Adam (B-cos students)."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    warmup_epochs: int = 0  # linear warm-up, then cosine decay to 0 (per step)
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float | None = 1.0  # global grad-norm clip (standard students)
    adaptive_clip: float | None = None  # adaptive gradient clipping factor (B-cos students)

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "adam", "sgd"):
            raise ValueError(f"optim.name must be one of adamw, adam, sgd; got {self.name!r}")
        for f in ("lr", "weight_decay", "momentum"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or math.isnan(v) or v < 0 or math.isinf(v):
                raise ValueError(f"optim.{f} must be a finite number >= 0, got {v!r}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_epochs < 0:
            raise ValueError(f"optim.warmup_epochs must be >= 0, got {self.warmup_epochs}")


@dataclass(frozen=True)
class TeacherConfig:
    arch: str = "small_cnn"
    path: str = "artifacts/teacher"  # directory holding teacher.pt + teacher.json
    mode: Literal["live", "cached"] = "live"
    cache_dir: str | None = None  # required when mode == "cached"

    def __post_init__(self) -> None:
        if self.arch not in MODELS:
            raise ValueError(f"teacher.arch: unknown architecture {self.arch!r}; known: {', '.join(sorted(MODELS))}")
        if self.mode not in ("live", "cached"):
            raise ValueError(f"teacher.mode must be 'live' or 'cached', got {self.mode!r}")
        if self.mode == "cached" and not self.cache_dir:
            raise ValueError("teacher.cache_dir is required when teacher.mode is 'cached'")


@dataclass(frozen=True)
class TrainConfig:
    student: str = "small_cnn"
    student_weights: str | None = None
    epochs: int = 10
    batch_size: int = 64  # global batch, split evenly across Ray Train workers
    seed: int = 0
    eval_splits: tuple[str, ...] = ()  # empty: every evaluation split the dataset has
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 autocast on CUDA, off on CPU
    channels_last: bool = True  # used on CUDA only
    explain_samples: int = 8  # validation images drawn with teacher/student maps in the PNG grid
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if self.student not in MODELS:
            raise ValueError(f"student: unknown architecture {self.student!r}; known: {', '.join(sorted(MODELS))}")
        for f in ("epochs", "batch_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{f} must be an integer >= 1, got {v!r}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be auto, bf16 or off; got {self.amp!r}")
        family = EXPLAINER_FAMILY[self.loss.explainer]
        for role, arch in (("student", self.student), ("teacher.arch", self.teacher.arch)):
            is_bcos = arch.startswith("bcos_") or arch == "small_bcos_cnn"
            if (family == "bcos") != is_bcos:
                need = "a B-cos" if family == "bcos" else "a standard (non-B-cos)"
                raise ValueError(f"loss.explainer {self.loss.explainer!r} needs {need} model, but {role} is {arch!r}")

    @property
    def encoding(self) -> str:
        return "bcos6" if EXPLAINER_FAMILY[self.loss.explainer] == "bcos" else "rgb"


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dataclass -> {"loss.lam": 0.5, "optim.lr": ..., ...} (tuples become lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            out.update(flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def with_overrides(obj: Any, overrides: dict[str, Any], _prefix: str = "") -> Any:
    """Return a copy of a (nested, frozen) dataclass with dotted-key overrides applied.

    Validation reruns in each rebuilt dataclass's ``__post_init__``; an unknown key raises a
    KeyError naming it.
    """
    names = {f.name for f in dataclasses.fields(obj)}
    direct: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in names:
            raise KeyError(f"unknown field {_prefix + head!r}")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, sub in nested.items():
        child = getattr(obj, head)
        if not dataclasses.is_dataclass(child):
            raise KeyError(f"{_prefix + head!r} has no sub-fields")
        direct[head] = with_overrides(child, sub, f"{_prefix}{head}.")
    return dataclasses.replace(obj, **direct)
