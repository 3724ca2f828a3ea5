"""Dataset registry, the split dataset every family shares, and k-shot sampling.

A *family* (digits, imagefolder, ...) knows how to list a split and load one sample as a
:class:`Record` (the full decoded image in [0,1]). :class:`SplitDataset` turns records into the item
dicts training code consumes (the training, evaluation or cache view; encoding; padded boxes).
Families register themselves in :data:`DATASETS`; nothing dispatches on names with if/elif.
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from trainables.data.config import DataConfig
from trainables.data.transforms import (EVAL_VIEWS, apply_view, check_encoding, encode, full_view, identity_view,
                                        pad_boxes, sample_view)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DataInfo:
    name: str
    num_classes: int
    multilabel: bool
    splits: tuple[str, ...]
    eval_splits: tuple[str, ...]
    has_groups: bool
    num_groups: int
    has_boxes: bool
    # sha256 over what identifies the distillation (train) split: family, view, selection, sample ids.
    fingerprint: str
    image_size: int
    class_names: tuple[str, ...]
    group_names: tuple[str, ...] = ()
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    train_split: str = "train"
    val_split: str = "val"


@dataclass
class Record:
    """One sample as decoded: ``image`` [3,H,W] float in [0,1], the *full* image (folder datasets:
    the file's own size; digits: image_size x image_size). Every view is cut from it."""

    image: Tensor
    label: int | Tensor
    index: int
    group: int | None = None
    boxes: Tensor | None = None  # [N,4] XYXY in full-image pixels
    box_labels: Tensor | None = None  # [N] class ids


class Source(ABC):
    """A listed split: stable sample ids, labels, and a loader for the full decoded image."""

    ids: np.ndarray  # [N] int64 stable sample ids within the split
    labels: np.ndarray  # [N] int64, or [N, C] float32 multi-hot

    def __len__(self) -> int:
        return len(self.ids)

    @abstractmethod
    def load(self, pos: int) -> Record: ...

    @abstractmethod
    def identity(self) -> list:
        """Per-sample identity (e.g. relative path) for the fingerprint, in position order."""


class DatasetFamily(ABC):
    multilabel: bool = False
    has_groups: bool = False
    group_names: tuple[str, ...] = ()
    has_boxes: bool = False
    default_image_size: int = 224
    default_hflip: bool = True  # natural images flip; digits do not
    # RandomResizedCrop scale range of the family's preset (``default_config``): the paper code's.
    default_crop_scale: tuple[float, float] = (0.08, 1.0)
    # How evaluation splits are viewed (a key of transforms.EVAL_VIEWS): "full" resizes the whole
    # image to image_size x image_size (localisation: boxes never leave it; digits: the identity),
    # "center-crop" is the classification protocol Resize(256) + CenterCrop(224).
    eval_view: str = "full"
    splits: tuple[str, ...] = ("train", "val", "test")
    eval_splits: tuple[str, ...] = ("val", "test")
    name: str = "?"
    # Samples are in memory (no decoding): loader processes cost more than they save.
    in_memory: bool = False

    def stats(self, cfg: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return IMAGENET_MEAN, IMAGENET_STD

    def available_splits(self, cfg: DataConfig) -> tuple[str, ...]:
        return self.splits

    def available_eval_splits(self, cfg: DataConfig) -> tuple[str, ...]:
        return self.eval_splits

    @abstractmethod
    def class_names(self, cfg: DataConfig) -> tuple[str, ...]: ...

    @abstractmethod
    def source(self, cfg: DataConfig, split: str) -> Source: ...

    @abstractmethod
    def describe_view(self, cfg: DataConfig) -> str:
        """How a sample is decoded and viewed, in words (goes into the fingerprint and the cache
        manifest: a change here makes old caches refuse to open)."""

    def teacher_config(self, cfg: DataConfig) -> DataConfig:
        """Data the teacher is trained on: the full clean training split."""
        return replace(cfg, shots=None)

    def selection_fields(self, cfg: DataConfig) -> dict:
        """Config fields that change which samples or pixels the train split holds."""
        d = {"name": cfg.name, "image_size": cfg.image_size, "shots": cfg.shots}
        if cfg.shots is not None:
            d["seed"] = cfg.seed
        return d


DATASETS: dict[str, DatasetFamily] = {}


def register_dataset(name: str):
    def deco(cls: type[DatasetFamily]) -> type[DatasetFamily]:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} registered twice")
        fam = cls()
        fam.name = name
        DATASETS[name] = fam
        return cls

    return deco


def family(cfg: DataConfig) -> DatasetFamily:
    if cfg.name not in DATASETS:
        raise ValueError(f"data.name={cfg.name!r} is not a known dataset; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[cfg.name]


def _check_split(fam: DatasetFamily, cfg: DataConfig, split: str) -> None:
    splits = fam.available_splits(cfg)
    if split not in splits:
        raise ValueError(f"dataset {cfg.name!r} has no split {split!r}; splits: {', '.join(splits)}")


_INFO_CACHE: dict[DataConfig, DataInfo] = {}


def dataset_info(cfg: DataConfig) -> DataInfo:
    """Static facts about the dataset ``cfg`` names, plus the fingerprint of its train split."""
    key = replace(cfg, augment=True, hflip=False, crop_scale=(0.6, 1.0), crop_ratio=(3 / 4, 4 / 3))
    if key in _INFO_CACHE:
        return _INFO_CACHE[key]
    fam = family(cfg)
    names = fam.class_names(cfg)
    src = fam.source(cfg, "train")
    payload = {"family": fam.name, "view": fam.describe_view(cfg), "selection": fam.selection_fields(cfg),
               "ids": [int(i) for i in src.ids], "identity": src.identity(),
               "labels": np.asarray(src.labels).tolist()}
    fp = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    mean, std = fam.stats(cfg)
    info = DataInfo(name=cfg.name, num_classes=len(names), multilabel=fam.multilabel,
                    splits=fam.available_splits(cfg), eval_splits=fam.available_eval_splits(cfg),
                    has_groups=fam.has_groups, num_groups=len(fam.group_names), has_boxes=fam.has_boxes,
                    fingerprint=fp, image_size=cfg.image_size, class_names=names,
                    group_names=fam.group_names, mean=tuple(mean), std=tuple(std))
    _INFO_CACHE[key] = info
    return info


def default_config(name: str, **overrides) -> DataConfig:
    """A DataConfig with the family's preset: 224 px + horizontal flip + the paper code's crop
    scale for the folder datasets (RandomResizedCrop(224, scale) + flip; ImageNet and VOC (0.08, 1),
    Waterbirds (0.7, 1)), 32 px without flip for digits."""
    if name not in DATASETS:
        raise ValueError(f"data.name={name!r} is not a known dataset; known: {', '.join(sorted(DATASETS))}")
    fam = DATASETS[name]
    overrides.setdefault("image_size", fam.default_image_size)
    overrides.setdefault("hflip", fam.default_hflip)
    overrides.setdefault("crop_scale", fam.default_crop_scale)
    return DataConfig(name=name, **overrides)


VIEWS = ("eval", "full")  # SplitDataset(view=...) when not training


class SplitDataset(Dataset):
    """Items: ``image`` [C,S,S] (encoded), ``label`` (int, or multi-hot float for multi-label),
    ``index`` (stable sample id), plus ``group`` (int) and ``boxes`` ([MAX_BOXES,5] rows
    class,x1,y1,x2,y2 in view pixels; class -1 = padding) when the dataset has them.

    Views (transforms.py): ``train=True`` cuts the random training view from the full image
    (``cfg.augment=False``: the whole image, resized — the crop box is then the full image, as in
    the cached path). Otherwise ``view="eval"`` is the family's evaluation view and ``view="full"``
    the whole image resized to image_size x image_size, what the teacher cache explains."""

    def __init__(self, cfg: DataConfig, split: str, encoding: str = "rgb", train: bool = False, view: str = "eval"):
        check_encoding(encoding)
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r}; known: {', '.join(VIEWS)}")
        self.family = family(cfg)
        _check_split(self.family, cfg, split)
        self.cfg, self.split, self.encoding, self.train, self.view = cfg, split, encoding, train, view
        self.source = self.family.source(cfg, split)
        self.mean, self.std = self.family.stats(cfg)

    @property
    def ids(self) -> np.ndarray:
        return self.source.ids

    @property
    def labels(self) -> np.ndarray:
        return self.source.labels

    def __len__(self) -> int:
        return len(self.source)

    def record(self, pos: int) -> Record:
        if not 0 <= pos < len(self.source):
            raise IndexError(f"position {pos} out of range for {self.cfg.name}/{self.split} ({len(self)} samples)")
        return self.source.load(pos)

    def encode(self, image01: Tensor) -> Tensor:
        return encode(image01, self.encoding, self.mean, self.std)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        pos, seed = split_key(key)
        rec = self.record(pos)
        size = self.cfg.image_size
        if self.train:
            view = train_view(self.cfg, rec, seed)
            image, *rest = apply_view(view, size, *record_tensors(rec))
            boxes = rest[0] if rest else None
        else:
            fn = {"full": full_view, "eval": EVAL_VIEWS[self.family.eval_view]}[self.view]
            image, boxes = fn(rec.image, size, rec.boxes)
        return make_item(self, rec, self.encode(image), boxes)


def train_view(cfg: DataConfig, rec: Record, seed: int | None):
    """The training view's geometry in full-image pixels: a RandomResizedCrop box (+ flip) sampled
    on the full image, or the whole image when ``cfg.augment`` is off. Live and cached training
    both take it from here."""
    h, w = rec.image.shape[-2:]
    if not cfg.augment:
        return identity_view(h, w)
    return sample_view(h, w, cfg.crop_scale, cfg.crop_ratio, cfg.hflip, seed)


def record_tensors(rec: Record) -> list:
    """The record's image (and boxes) as tv_tensors on the full-image canvas."""
    out = [tv_tensors.Image(rec.image)]
    if rec.boxes is not None:
        out.append(tv_tensors.BoundingBoxes(rec.boxes, format="XYXY", canvas_size=tuple(rec.image.shape[-2:])))
    return out


def split_key(key: int | tuple[int, int]) -> tuple[int, int | None]:
    """A dataset key: a position, or (position, augmentation seed) from the training loader's
    sampler (``trainables.data.loader``)."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), None


def make_item(ds: SplitDataset, rec: Record, image: Tensor, boxes: Tensor | None) -> dict:
    item = {"image": image.as_subclass(Tensor).contiguous(), "label": rec.label, "index": int(rec.index)}
    if ds.family.has_groups:
        item["group"] = int(rec.group)
    if ds.family.has_boxes:
        item["boxes"] = pad_boxes(boxes, rec.box_labels, tuple(image.shape[-2:]))
    return item


def build_dataset(cfg: DataConfig, split: str, encoding: str = "rgb", train: bool = False,
                  view: str = "eval") -> SplitDataset:
    return SplitDataset(cfg, split, encoding=encoding, train=train, view=view)


# ------------------------------------ sampling ------------------------------------------------


def holdout_per_class(labels: np.ndarray, n: int, seed: int, class_names) -> tuple[np.ndarray, np.ndarray]:
    """Split positions into (rest, held_out) with ``n`` per class held out (seeded)."""
    rng = np.random.default_rng(seed)
    rest, held = [], []
    for c in range(len(class_names)):
        pos = np.flatnonzero(labels == c)
        if len(pos) <= n and n > 0:
            raise ValueError(f"class {class_names[c]!r} has {len(pos)} training images, too few to hold out "
                             f"data.val_per_class={n} for validation and keep any for training")
        perm = rng.permutation(pos)
        held.append(perm[:n])
        rest.append(perm[n:])
    return np.sort(np.concatenate(rest)), np.sort(np.concatenate(held))


def k_shot(labels: np.ndarray, k: int, seed: int, class_names, where: str = "the training split") -> np.ndarray:
    """Exactly ``k`` positions per class, drawn with ``seed``. Per class the draw is a prefix of one
    seeded permutation, so with the same seed the 50-shot set is inside the 200-shot set."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(len(class_names)):
        pos = np.flatnonzero(labels == c)
        perm = rng.permutation(pos)
        if len(pos) < k:
            raise ValueError(f"data.shots={k} but class {class_names[c]!r} has only {len(pos)} images in {where}")
        out.append(perm[:k])
    return np.sort(np.concatenate(out))


def k_shot_multilabel(multi_hot: np.ndarray, k: int, seed: int, class_names,
                      where: str = "the training split") -> np.ndarray:
    """Multi-label k-shot: for each class in turn, add seeded images containing it until the
    selection holds at least ``k`` images of that class (every class ends with >= k)."""
    rng = np.random.default_rng(seed)
    chosen: set[int] = set()
    for c in range(len(class_names)):
        pos = np.flatnonzero(multi_hot[:, c] > 0)
        if len(pos) < k:
            raise ValueError(f"data.shots={k} but class {class_names[c]!r} has only {len(pos)} images in {where}")
        have = sum(1 for p in pos if int(p) in chosen)
        for p in rng.permutation(pos):
            if have >= k:
                break
            if int(p) not in chosen:
                chosen.add(int(p))
                have += 1
    return np.array(sorted(chosen), dtype=np.int64)


__all__ = ["DATASETS", "DataInfo", "DatasetFamily", "Record", "Source", "SplitDataset", "build_dataset",
           "dataset_info", "default_config", "register_dataset", "family", "split_key",
           "train_view", "record_tensors", "holdout_per_class", "k_shot",
           "k_shot_multilabel", "IMAGENET_MEAN", "IMAGENET_STD"]
