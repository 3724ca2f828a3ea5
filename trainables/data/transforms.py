"""Geometry and encoding shared by every dataset and by the teacher cache.

One augmentation policy everywhere: the random view (RandomResizedCrop + optional horizontal flip)
is cut from the *un-augmented* view of a sample (the fixed eval view: digits at ``image_size``,
folder datasets after Resize + CenterCrop). That is also the image the frozen teacher explanations
are computed on, so live and frozen training see the same distribution of views, and the cache can
apply the identical crop/flip to the stored map.

Parameters are sampled once (:func:`sample_view`, torchvision's own RandomResizedCrop sampler) and
applied with :func:`apply_view` to any number of tv_tensors (images, maps wrapped as images,
bounding boxes), so all of them receive exactly the same geometry.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision import tv_tensors

ENCODINGS = ("rgb", "bcos6")


@dataclass(frozen=True)
class View:
    """One sampled augmentation: crop box in the un-augmented view, then an optional flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool

    def as_tensor(self) -> Tensor:
        return torch.tensor([self.top, self.left, self.height, self.width, int(self.flip)], dtype=torch.int64)


def sample_view(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                hflip: bool, seed: int | None = None) -> View:
    """Sample RandomResizedCrop parameters (torchvision's algorithm and RNG use) and a coin flip.

    ``seed``: draw from a generator seeded with it (the global RNG is left as it was) — the
    training loader gives every (epoch, sample) its own seed, so a view does not depend on which
    loader process makes it or on how many there are."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return sample_view(height, width, scale, ratio, hflip)
    rrc = v2.RandomResizedCrop(size=(height, width), scale=scale, ratio=ratio)
    p = rrc.make_params([tv_tensors.Image(torch.empty(1, height, width))])
    flip = bool(hflip and torch.rand(1).item() < 0.5)
    return View(int(p["top"]), int(p["left"]), int(p["height"]), int(p["width"]), flip)


def identity_view(height: int, width: int) -> View:
    return View(0, 0, height, width, False)


def apply_view(view: View, size: int | tuple[int, int], *inputs: Tensor) -> tuple[Tensor, ...]:
    """Crop ``view`` out of each input, resize to ``size`` (bilinear, align_corners=False, antialias
    as torchvision's RandomResizedCrop), flip if sampled. Inputs are tv_tensors (Image,
    BoundingBoxes); plain tensors are treated as images."""
    size = [size, size] if isinstance(size, int) else list(size)
    out = []
    for x in inputs:
        y = TF.resized_crop(x, view.top, view.left, view.height, view.width, size, antialias=True)
        if view.flip:
            y = TF.horizontal_flip(y)
        out.append(y)
    return tuple(out)


def eval_resize_size(image_size: int) -> int:
    """Shorter side before the center crop: 256 for 224 (the ImageNet eval protocol), scaled."""
    return int(round(image_size * 256 / 224))


def eval_view(image: Tensor, image_size: int, boxes: Tensor | None = None):
    """Resize(shorter side -> image_size*256/224) + CenterCrop(image_size); boxes follow."""
    img = tv_tensors.Image(image)
    items = [img]
    if boxes is not None:
        items.append(tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image.shape[-2:])))
    out = []
    for x in items:
        x = TF.resize(x, [eval_resize_size(image_size)], antialias=True)
        out.append(TF.center_crop(x, [image_size, image_size]))
    return (out[0], out[1] if boxes is not None else None)


def encode(image01: Tensor, encoding: str, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """[3,H,W] in [0,1] -> model input. "rgb": (x - mean) / std; "bcos6": [x, 1 - x]."""
    x = image01.as_subclass(Tensor) if isinstance(image01, tv_tensors.TVTensor) else image01
    if encoding == "rgb":
        m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
        s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
        return (x - m) / s
    if encoding == "bcos6":
        return torch.cat([x, 1 - x], dim=0)
    raise ValueError(f"unknown input encoding {encoding!r}; known: {', '.join(ENCODINGS)}")


def check_encoding(encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown input encoding {encoding!r}; known: {', '.join(ENCODINGS)}")


MAX_BOXES = 64  # VOC has at most 56 objects in one image


def pad_boxes(boxes: Tensor | None, box_labels: Tensor | None, canvas: tuple[int, int]) -> Tensor:
    """[N,4] XYXY + [N] class ids -> fixed [MAX_BOXES, 5] rows (class, x1, y1, x2, y2), clamped to the
    canvas; boxes cropped away (zero area) and padding rows have class -1. Fixed size so the default
    collate batches them."""
    out = torch.full((MAX_BOXES, 5), -1.0)
    if boxes is None or len(boxes) == 0:
        return out
    if len(boxes) > MAX_BOXES:
        raise ValueError(f"{len(boxes)} boxes in one image, more than MAX_BOXES={MAX_BOXES}")
    b = boxes.as_subclass(Tensor).float().clone()
    h, w = canvas
    b[:, 0::2] = b[:, 0::2].clamp(0, w)
    b[:, 1::2] = b[:, 1::2].clamp(0, h)
    keep = ((b[:, 2] - b[:, 0]) > 0) & ((b[:, 3] - b[:, 1]) > 0)
    n = int(keep.sum())
    out[:n, 0] = box_labels[keep].float()
    out[:n, 1:] = b[keep]
    return out


def box_mask(boxes: Tensor, cls: int, size: tuple[int, int]) -> Tensor:
    """Union mask [H,W] of the (padded) ``boxes`` rows of class ``cls`` (pixel centres inside)."""
    h, w = size
    ys = torch.arange(h, dtype=torch.float32).view(-1, 1) + 0.5
    xs = torch.arange(w, dtype=torch.float32).view(1, -1) + 0.5
    m = torch.zeros(h, w, dtype=torch.bool)
    for row in boxes:
        if int(row[0]) == cls:
            m |= (xs >= row[1]) & (xs <= row[3]) & (ys >= row[2]) & (ys <= row[4])
    return m

