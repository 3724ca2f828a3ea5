"""Geometry and encoding shared by every dataset and by the teacher cache.

Every sample is first decoded to its *full image* (``Record.image``: folder datasets at their own
H x W, digits at ``image_size``). Three views are cut from it:

- **training** (paper protocol, torchvision's ``RandomResizedCrop(image_size, scale, ratio)`` +
  optional horizontal flip): a crop box sampled on the *full* image (:func:`sample_view`), resized
  to image_size x image_size (:func:`apply_view`). Not from a centre crop: that would never show
  the student the image's borders and would shrink every crop.
- **evaluation** (:data:`EVAL_VIEWS`, chosen per dataset family): ``center-crop`` =
  Resize(image_size * 256/224) + CenterCrop(image_size), the classification protocol (ImageNet,
  Waterbirds); ``full`` = the whole image resized to image_size x image_size, the localisation
  protocol (VOC: no box can leave the view) and what digits' single view already is.
- **teacher cache** (:func:`full_view`): the whole image resized to image_size x image_size. A
  frozen teacher map computed on it covers the full image, so any training crop box (full-image
  coordinates) can be cut from it: the map is resized back to the full image's H x W and goes
  through the *same* :func:`apply_view` call as the image (see ``cache.CachedTeacherDataset``).

Parameters are sampled once (:func:`sample_view`) and applied with :func:`apply_view` to any number
of tv_tensors (images, maps wrapped as images, bounding boxes), so all of them receive exactly the
same geometry.
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
        canvas = tuple(x.canvas_size) if isinstance(x, tv_tensors.BoundingBoxes) else tuple(x.shape[-2:])
        if (view.top, view.left, view.height, view.width, view.flip) == (0, 0, *size, False) == (0, 0, *canvas, False):
            out.append(x)  # the identity (digits without augmentation): exactly the input
            continue
        y = TF.resized_crop(x, view.top, view.left, view.height, view.width, size, antialias=True)
        if view.flip:
            y = TF.horizontal_flip(y)
        out.append(y)
    return tuple(out)


def eval_resize_size(image_size: int) -> int:
    """Shorter side before the center crop: 256 for 224 (the ImageNet eval protocol), scaled."""
    return int(round(image_size * 256 / 224))


def _with_boxes(image: Tensor, boxes: Tensor | None) -> list[Tensor]:
    items = [tv_tensors.Image(image)]
    if boxes is not None:
        items.append(tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image.shape[-2:])))
    return items


def center_crop_view(image: Tensor, image_size: int, boxes: Tensor | None = None):
    """Resize(shorter side -> image_size*256/224) + CenterCrop(image_size); boxes follow (a box
    outside the crop is clamped to zero area, and ``pad_boxes`` drops it)."""
    out = [TF.center_crop(TF.resize(x, [eval_resize_size(image_size)], antialias=True), [image_size, image_size])
           for x in _with_boxes(image, boxes)]
    return (out[0], out[1] if boxes is not None else None)


def full_view(image: Tensor, image_size: int, boxes: Tensor | None = None):
    """The whole image resized to image_size x image_size (aspect not kept); boxes are scaled with
    it, so every box stays in the view with positive area. An image already at that size is
    returned as it is (digits)."""
    items = _with_boxes(image, boxes)
    if tuple(image.shape[-2:]) != (image_size, image_size):
        items = [TF.resize(x, [image_size, image_size], antialias=True) for x in items]
    return (items[0], items[1] if boxes is not None else None)


# Evaluation views by name (``DatasetFamily.eval_view``): the family picks its protocol.
EVAL_VIEWS = {"center-crop": center_crop_view, "full": full_view}
VIEW_DESCRIPTIONS = {
    "center-crop": "Resize(round(image_size*256/224), bilinear, antialias) -> CenterCrop(image_size)",
    "full": "Resize((image_size, image_size), bilinear, antialias) of the whole image",
}


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

