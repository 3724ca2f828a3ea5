"""scikit-learn's digits (1,797 real 8x8 images, ships with sklearn) and its decoy variant.

digits: 8x8 in 0..16 -> /16 -> bilinear (align_corners=False) to image_size -> 3 channels.
Splits are a fixed stratified 60/20/20 train/val/test with seed 0 (never cfg.seed), so they never
change; ``shots`` draws k per class from train with cfg.seed.

decoy-digits ("right for the right reasons", after Ross et al.'s Decoy MNIST): a bright square
(value 1.0, ``decoy_size`` pixels) on the image border at one of ``num_classes`` evenly spaced
positions along the border ring.
- train, val, test_id: position = the label's position (the decoy is perfectly predictive).
- test ("shortcut-broken"): every test image appears once at *every* position (index =
  image_id * P + position), so position and label are exactly independent: each (label, position)
  pair occurs exactly as often as the label's test images. 1/P of those items agree with the label.
group = 1 when the decoy position agrees with the label, 0 when it contradicts it.
The teacher trains on clean digits (``teacher_config``), so it never learns the shortcut.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from trainables.data.base import DatasetFamily, Record, Source, k_shot, register_dataset
from trainables.data.config import DataConfig

_SPLIT_SEED = 0  # fixed: the digits splits never change


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images.astype(np.float32) / 16.0), d.target.astype(np.int64)


@lru_cache(maxsize=1)
def _digit_splits() -> dict[str, np.ndarray]:
    from sklearn.model_selection import train_test_split

    _, y = _digits()
    pos = np.arange(len(y))
    train, rest = train_test_split(pos, test_size=0.4, stratify=y, random_state=_SPLIT_SEED)
    val, test = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=_SPLIT_SEED)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


@lru_cache(maxsize=8)
def _digit_stats(image_size: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x, _ = _digits()
    up = _upsample(torch.from_numpy(x[_digit_splits()["train"]]), image_size)
    m, s = float(up.mean()), float(up.std())
    return (m, m, m), (s, s, s)


def _upsample(x8: torch.Tensor, size: int) -> torch.Tensor:
    """[N,8,8] or [8,8] -> [..., size, size] bilinear, align_corners=False."""
    squeeze = x8.dim() == 2
    x = x8.view(-1, 1, *x8.shape[-2:])
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return y[0] if squeeze else y


def _digit_image(pos: int, size: int) -> torch.Tensor:
    x, _ = _digits()
    return _upsample(torch.from_numpy(x[pos]), size).unsqueeze(0).repeat(3, 1, 1)


class _DigitSource(Source):
    def __init__(self, positions: np.ndarray, size: int):
        _, y = _digits()
        self.positions = positions
        self.ids = positions.astype(np.int64)  # the position in load_digits(): stable forever
        self.labels = y[positions]
        self.size = size

    def load(self, pos: int) -> Record:
        p = int(self.positions[pos])
        return Record(image=_digit_image(p, self.size), label=int(self.labels[pos]), index=int(self.ids[pos]))

    def identity(self) -> list:
        return [hashlib.sha1(_digits()[0][int(p)].tobytes()).hexdigest()[:16] for p in self.positions]


@register_dataset("digits")
class Digits(DatasetFamily):
    default_image_size = 32
    default_hflip = False
    # An 8x8 digit upsampled to image_size is its own full image: train crops are cut from it, and
    # the evaluation and cache views ("full") are the identity.
    default_crop_scale = (0.6, 1.0)
    in_memory = True
    splits = ("train", "val", "test")
    eval_splits = ("val", "test")

    def stats(self, cfg: DataConfig):
        return _digit_stats(cfg.image_size)

    def class_names(self, cfg: DataConfig) -> tuple[str, ...]:
        return tuple(str(i) for i in range(10))

    def describe_view(self, cfg: DataConfig) -> str:
        return (f"sklearn load_digits 8x8 /16 -> bilinear(align_corners=False) {cfg.image_size}x{cfg.image_size}"
                " -> 3 channels; splits stratified 60/20/20 seed 0")

    def _positions(self, cfg: DataConfig, split: str) -> np.ndarray:
        pos = _digit_splits()[split]
        if split == "train" and cfg.shots is not None:
            _, y = _digits()
            pos = pos[k_shot(y[pos], cfg.shots, cfg.seed, self.class_names(cfg), "the digits train split")]
        return pos

    def source(self, cfg: DataConfig, split: str) -> Source:
        return _DigitSource(self._positions(cfg, split), cfg.image_size)


# ------------------------------------ decoy-digits -------------------------------------------


def decoy_positions(image_size: int, patch: int, count: int) -> list[tuple[int, int]]:
    """``count`` top-left corners evenly spaced along the border ring of an image_size square."""
    side = image_size - patch
    ring = 4 * side
    out = []
    for k in range(count):
        t = int(round(k * ring / count))
        s, off = divmod(t, side)
        out.append([(0, off), (off, side), (side, side - off), (side - off, 0)][s])
    return out


class _DecoySource(Source):
    """Digits images of one underlying split with a decoy patch at ``decoy[pos]``."""

    def __init__(self, base: _DigitSource, image_pos: np.ndarray, decoy: np.ndarray, ids: np.ndarray,
                 corners: list[tuple[int, int]], patch: int):
        self.base, self.image_pos, self.decoy, self.ids = base, image_pos, decoy, ids.astype(np.int64)
        self.labels = base.labels[image_pos]
        self.corners, self.patch = corners, patch

    def load(self, pos: int) -> Record:
        rec = self.base.load(int(self.image_pos[pos]))
        d = int(self.decoy[pos])
        y, x = self.corners[d]
        img = rec.image.clone()
        img[:, y:y + self.patch, x:x + self.patch] = 1.0
        return Record(image=img, label=rec.label, index=int(self.ids[pos]), group=int(d == rec.label))

    def identity(self) -> list:
        base_id = self.base.identity()
        return [(base_id[int(p)], int(d)) for p, d in zip(self.image_pos, self.decoy)]


@register_dataset("decoy-digits")
class DecoyDigits(Digits):
    splits = ("train", "val", "test_id", "test")
    eval_splits = ("val", "test_id", "test")
    has_groups = True
    group_names = ("decoy-contradicts-label", "decoy-agrees-with-label")

    def describe_view(self, cfg: DataConfig) -> str:
        return (super().describe_view(cfg) + f"; decoy {cfg.decoy_size}px value 1.0 at the label's border position "
                "(test: every image at every position)")

    def selection_fields(self, cfg: DataConfig) -> dict:
        return {**super().selection_fields(cfg), "decoy_size": cfg.decoy_size}

    def teacher_config(self, cfg: DataConfig) -> DataConfig:
        return replace(cfg, name="digits", shots=None)

    def source(self, cfg: DataConfig, split: str) -> Source:
        n_cls = len(self.class_names(cfg))
        corners = decoy_positions(cfg.image_size, cfg.decoy_size, n_cls)
        base = _DigitSource(self._positions(cfg, "test" if split.startswith("test") else split), cfg.image_size)
        n = len(base)
        if split == "test":
            image_pos = np.repeat(np.arange(n), n_cls)
            decoy = np.tile(np.arange(n_cls), n)
            ids = base.ids[image_pos] * n_cls + decoy
        else:
            image_pos = np.arange(n)
            decoy = base.labels.copy()
            ids = base.ids
        return _DecoySource(base, image_pos, decoy, ids, corners, cfg.decoy_size)
