"""Typed data configuration. Every validation error names the offending field as ``data.<field>``."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"
    # Dataset root on disk (imagefolder / waterbirds / voc). digits and decoy-digits ignore it.
    root: str | None = None
    # Side of the square view every split yields. Folder datasets: training crops of the full image
    # resized to it; evaluation Resize(round(image_size * 256 / 224)) + CenterCrop(image_size)
    # (VOC: the whole image resized to it). Give 224 for the paper's setup (see ``default_config``).
    image_size: int = 32
    # k images per class drawn (seeded by ``seed``) from the training split; None = all of it.
    shots: int | None = None
    # imagefolder: images per class held out of the train folder as the validation split (seed 42).
    val_per_class: int = 50
    seed: int = 42
    # train=True augmentation: RandomResizedCrop(image_size, scale=crop_scale, ratio=crop_ratio)
    # (+ horizontal flip when hflip) on the full image. The field default suits digits; the
    # per-dataset presets (paper code: ImageNet/VOC (0.08, 1), Waterbirds (0.7, 1)) are in
    # ``default_config`` and written out in the shipped specs.
    augment: bool = True
    hflip: bool = False
    crop_scale: tuple[float, float] = (0.6, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    # decoy-digits: side (pixels of the view) of the label-coding square patch.
    decoy_size: int = 4

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"data.{field}={getattr(self, field)!r}: {why}")

        if not isinstance(self.name, str) or not self.name:
            raise bad("name", "must be a non-empty string")
        if self.root is not None:
            if isinstance(self.root, os.PathLike):
                object.__setattr__(self, "root", os.fspath(self.root))
            if not isinstance(self.root, str) or not self.root:
                raise bad("root", "must be a path string or None")
        if not _is_int(self.image_size) or not 8 <= self.image_size <= 1024:
            raise bad("image_size", "must be an integer in [8, 1024]")
        if self.shots is not None and (not _is_int(self.shots) or self.shots < 1):
            raise bad("shots", "must be None or an integer >= 1")
        if not _is_int(self.val_per_class) or self.val_per_class < 0:
            raise bad("val_per_class", "must be an integer >= 0")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise bad("seed", "must be an integer in [0, 2**32)")
        for flag in ("augment", "hflip"):
            if not isinstance(getattr(self, flag), bool):
                raise bad(flag, "must be a bool")
        for pair in ("crop_scale", "crop_ratio"):
            v = getattr(self, pair)
            try:
                lo, hi = (float(a) for a in v)
            except (TypeError, ValueError):
                raise bad(pair, "must be a pair of floats (min, max)") from None
            object.__setattr__(self, pair, (lo, hi))  # lists from YAML become tuples
            if not 0 < lo <= hi or (pair == "crop_scale" and hi > 1):
                raise bad(pair, "must satisfy 0 < min <= max" + (" <= 1" if pair == "crop_scale" else ""))
        if not _is_int(self.decoy_size) or not 1 <= self.decoy_size <= self.image_size // 4:
            raise bad("decoy_size", f"must be an integer in [1, image_size // 4 = {self.image_size // 4}]")

    @classmethod
    def from_dict(cls, d: dict) -> DataConfig:
        """Build from a plain dict (YAML/JSON); unknown keys raise naming ``data.<key>``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown data option(s): {', '.join('data.' + k for k in unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        return cls(**d)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
