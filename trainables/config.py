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
    # Side the cached maps are stored at (area-downsampled when the native map is larger). null:
    # full resolution, the paper's frozen maps; 56 stores B-cos W(x) at 6x56x56 (1/16 of the bytes,
    # but cos ~0.7 to the live map on a random-init B-cos ResNet-18: docs/cache.md). GradCAM maps
    # (7x7) are stored native either way. Training refuses a cache stored at another resolution.
    cache_map_side: int | None = None

    def __post_init__(self) -> None:
        if self.arch not in MODELS:
            raise ValueError(f"teacher.arch: unknown architecture {self.arch!r}; known: {', '.join(sorted(MODELS))}")
        if self.mode not in ("live", "cached"):
            raise ValueError(f"teacher.mode must be 'live' or 'cached', got {self.mode!r}")
        if self.mode == "cached" and not self.cache_dir:
            raise ValueError("teacher.cache_dir is required when teacher.mode is 'cached'")
        if self.cache_map_side is not None and (not _is_int(self.cache_map_side) or self.cache_map_side < 1):
            raise ValueError(f"teacher.cache_map_side must be null (full resolution) or an integer >= 1, "
                             f"got {self.cache_map_side!r}")


@dataclass(frozen=True)
class LoaderConfig:
    """How one Ray Train worker feeds its device (``loader.*``)."""

    # DataLoader processes decoding and augmenting images. null: one per CPU the worker holds on a
    # GPU (resources.cpus_per_worker=8 -> 8; the training process mostly waits for the device), one
    # fewer on the CPU; 0 for datasets that live in memory (digits), where a process costs more
    # than it saves.
    workers: int | None = None
    prefetch: int = 2  # batches each loader process keeps ready
    pin_memory: bool = True  # page-locked batches on CUDA: the host-to-device copy overlaps compute

    def __post_init__(self) -> None:
        if self.workers is not None and (not _is_int(self.workers) or self.workers < 0):
            raise ValueError(f"loader.workers must be an integer >= 0 (or null), got {self.workers!r}")
        if not _is_int(self.prefetch) or self.prefetch < 1:
            raise ValueError(f"loader.prefetch must be an integer >= 1, got {self.prefetch!r}")


@dataclass(frozen=True)
class EvalConfig:
    """When and how evaluation runs (``eval.*``)."""

    val_every: int = 1  # epochs between validation passes (always at the last epoch)
    test_every: int = 0  # 0: test only at the last epoch; N: also every N epochs
    # Host memory (GiB, per worker and split) for the frozen teacher's logits and maps on an
    # evaluation split, stored once at native map resolution in float16. Beyond it the teacher is
    # re-run at every evaluation instead (B-cos maps are input-sized: 50,000 ImageNet images need
    # ~29 GiB).
    teacher_targets_gib: float = 2.0

    def __post_init__(self) -> None:
        for f in ("val_every", "test_every"):
            v = getattr(self, f)
            if not _is_int(v) or v < (1 if f == "val_every" else 0):
                raise ValueError(f"eval.{f} must be an integer >= {1 if f == 'val_every' else 0}, got {v!r}")
        if not isinstance(self.teacher_targets_gib, (int, float)) or not self.teacher_targets_gib >= 0:
            raise ValueError(f"eval.teacher_targets_gib must be a number >= 0, got {self.teacher_targets_gib!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


MAX_EXPLAIN_SAMPLES = 64  # images in the explanation grid PNG


@dataclass(frozen=True)
class TrainConfig:
    student: str = "small_cnn"
    student_weights: str | None = None
    epochs: int = 10
    batch_size: int = 64  # global batch, split evenly across Ray Train workers
    seed: int = 0
    eval_splits: tuple[str, ...] = ()  # empty: every evaluation split the dataset has
    # Arithmetic of the training and evaluation passes. fp32: full precision everywhere (the paper's
    # runs; the B-cos double backward is the sensitive part). bf16: bf16 autocast on CUDA (faster,
    # less memory); a CPU run stays fp32 either way (bf16 matmuls are slow on most CPUs).
    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = True  # used on CUDA only
    explain_samples: int = 8  # validation images drawn with teacher/student maps in the PNG grid
    explain_every: int = 5  # epochs between explanation grids (always at the last epoch; 0: only then)
    # Epochs between checkpoints (always at the last epoch). auto: every epoch where a checkpoint
    # costs at most 5 % of the training time since the last one (see train_loop.Cadence).
    checkpoint_every: int | Literal["auto"] = "auto"
    # BatchNorm when one student's batch is split over several GPUs: "auto" synchronises the
    # statistics (SyncBatchNorm: every layer sees the whole batch, as on one GPU) on CUDA; true
    # also refuses to run where it cannot (CPU); false keeps per-GPU statistics.
    sync_bn: bool | Literal["auto"] = "auto"
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
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
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:  # numpy/torch seed range
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if not _is_int(self.explain_samples) or not 1 <= self.explain_samples <= MAX_EXPLAIN_SAMPLES:
            raise ValueError(f"explain_samples must be an integer in [1, {MAX_EXPLAIN_SAMPLES}], "
                             f"got {self.explain_samples!r}")
        for f, most in (("epochs", 100_000), ("batch_size", 1 << 16)):
            if getattr(self, f) > most:
                raise ValueError(f"{f} must be <= {most}, got {getattr(self, f)!r}")
        if self.student_weights is not None and (not isinstance(self.student_weights, str) or not self.student_weights):
            raise ValueError(f"student_weights must be a path (or null), got {self.student_weights!r}")
        if not _is_int(self.explain_every) or self.explain_every < 0:
            raise ValueError(f"explain_every must be an integer >= 0, got {self.explain_every!r}")
        if self.checkpoint_every != "auto" and (not _is_int(self.checkpoint_every) or self.checkpoint_every < 1):
            raise ValueError(f"checkpoint_every must be auto or an integer >= 1, got {self.checkpoint_every!r}")
        if self.sync_bn not in ("auto", True, False) or isinstance(self.sync_bn, int) and not isinstance(self.sync_bn, bool):
            raise ValueError(f"sync_bn must be auto, true or false; got {self.sync_bn!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16; got {self.precision!r}")
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
