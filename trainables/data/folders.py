"""On-disk datasets: ImageFolder (ImageNet layout), Waterbirds (metadata.csv), PASCAL VOC (XML).

All three decode with PIL to the full image (boxes in its pixels); the views are cut from it by
``SplitDataset`` (transforms.py): training = RandomResizedCrop on the full image; evaluation =
Resize(image_size*256/224) + CenterCrop for ImageFolder and Waterbirds, the whole image resized to
image_size x image_size for VOC (its boxes must stay in the view). Listings are cached per process; an
ImageFolder listing and a VOC split's parsed annotations come from a Parquet index built once per
dataset (``trainables.data.index``; ``E2KD_NO_INDEX=1`` scans and parses instead).
"""
from __future__ import annotations

import csv
import os
import xml.etree.ElementTree as ET
from functools import lru_cache

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from trainables.data import index
from trainables.data.base import (DatasetFamily, Record, Source, holdout_per_class, k_shot, k_shot_multilabel,
                                  register_dataset)
from trainables.data.config import DataConfig
from trainables.data.transforms import VIEW_DESCRIPTIONS

HOLDOUT_SEED = 42  # the paper's fixed seed for the per-class validation hold-out


def require_root(cfg: DataConfig, *must_exist: str) -> str:
    if cfg.root is None:
        raise ValueError(f"data.root must be set for dataset {cfg.name!r}")
    root = os.path.abspath(os.path.expanduser(cfg.root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data.root={cfg.root!r}: dataset directory {root} does not exist")
    for rel in must_exist:
        p = os.path.join(root, rel)
        if not os.path.exists(p):
            raise FileNotFoundError(f"data.root={cfg.root!r}: expected {p} ({cfg.name} layout) but it does not exist")
    return root


def load_rgb(path: str) -> torch.Tensor:
    """[3,H,W] float in [0,1]."""
    try:
        with Image.open(path) as im:
            t = TF.pil_to_tensor(im.convert("RGB"))
    except OSError as e:
        raise OSError(f"cannot read image {path}: {e}") from e
    return t.float().div_(255.0)


def view_description(fam: DatasetFamily, cfg: DataConfig) -> str:
    # "full image" is part of the fingerprint: caches and teachers made when training crops came
    # from the centre crop (fingerprinted "... -> CenterCrop(S)") no longer match.
    return (f"PIL RGB /255, full image; train: RandomResizedCrop({cfg.image_size}) of the full image; "
            f"eval: {VIEW_DESCRIPTIONS[fam.eval_view]}; image_size {cfg.image_size}")


class _FileSource(Source):
    def __init__(self, root: str, rel_paths: list[str], labels: np.ndarray, ids: np.ndarray,
                 groups: np.ndarray | None = None):
        self.root, self.rel_paths, self.labels, self.ids = root, rel_paths, labels, ids.astype(np.int64)
        self.groups = groups

    def load(self, pos: int) -> Record:
        img = load_rgb(os.path.join(self.root, self.rel_paths[pos]))
        group = None if self.groups is None else int(self.groups[pos])
        return Record(image=img, label=int(self.labels[pos]), index=int(self.ids[pos]), group=group)

    def identity(self) -> list:
        return list(self.rel_paths)


# ------------------------------------ ImageFolder --------------------------------------------


@lru_cache(maxsize=16)
def _list_folder(folder: str, classes: tuple[str, ...] | None) -> tuple[tuple[str, ...], tuple[str, ...], np.ndarray]:
    """(class names, relative paths sorted by class then name, labels). ``classes`` (the train
    folder's) labels another folder by those names; a class directory not among them is an error.
    One lookup per process: the file index (``E2KD_NO_INDEX=1``: a scan), then this cache."""
    folder = os.path.abspath(folder)
    own = index.scan(folder) if index.disabled() else index.folder_listing(folder)
    if classes is None:
        if not own.classes:
            raise FileNotFoundError(f"no class sub-directories in {folder}")
        return own.classes, own.paths, own.labels
    return (classes, *_relabel(own, classes, folder))


def _relabel(own: index.Listing, classes: tuple[str, ...], folder: str) -> tuple[tuple[str, ...], np.ndarray]:
    """The folder's own listing with labels = positions in ``classes``, rows in ``classes`` order."""
    extra = [c for c in own.classes if c not in classes]
    if extra:
        raise ValueError(f"{folder} has classes not in the train folder: {extra[:5]}")
    position = {c: i for i, c in enumerate(classes)}
    labels = np.asarray([position[c] for c in own.classes], dtype=np.int64)[own.labels]
    if np.all(labels[:-1] <= labels[1:]):  # same class order (the usual case): nothing to move
        return own.paths, labels
    order = np.argsort(labels, kind="stable")  # stable: names stay sorted within a class
    return tuple(own.paths[i] for i in order), labels[order]


@register_dataset("imagefolder")
class ImageFolderData(DatasetFamily):
    """root/train/<class>/* and root/val/<class>/*. Protocol of the paper: hold out
    ``val_per_class`` images per class of the train folder as ``val`` (seed 42), draw ``shots`` per
    class from the rest (cfg.seed) as ``train``; the official val folder is ``test``. Sample ids are
    positions in the sorted folder listing."""

    splits = ("train", "val", "test")
    eval_splits = ("val", "test")
    eval_view = "center-crop"

    def _train_listing(self, cfg: DataConfig):
        root = require_root(cfg, "train")
        return root, _list_folder(os.path.join(root, "train"), None)

    def class_names(self, cfg: DataConfig) -> tuple[str, ...]:
        return self._train_listing(cfg)[1][0]

    def available_splits(self, cfg: DataConfig) -> tuple[str, ...]:
        return self.splits if cfg.val_per_class > 0 else ("train", "test")

    def available_eval_splits(self, cfg: DataConfig) -> tuple[str, ...]:
        return self.eval_splits if cfg.val_per_class > 0 else ("test",)

    def selection_fields(self, cfg: DataConfig) -> dict:
        return {**super().selection_fields(cfg), "val_per_class": cfg.val_per_class}

    def describe_view(self, cfg: DataConfig) -> str:
        return view_description(self, cfg)

    def source(self, cfg: DataConfig, split: str) -> Source:
        root, (classes, paths, labels) = self._train_listing(cfg)
        if split == "test":
            require_root(cfg, "val")
            _, tpaths, tlabels = _list_folder(os.path.join(root, "val"), classes)
            return _FileSource(root, list(tpaths), tlabels, np.arange(len(tpaths)))
        rest, held = holdout_per_class(labels, cfg.val_per_class, HOLDOUT_SEED, classes)
        if split == "val":
            pos = held
        else:
            pos = rest
            if cfg.shots is not None:
                where = f"the train folder after holding out data.val_per_class={cfg.val_per_class} per class"
                pos = rest[k_shot(labels[rest], cfg.shots, cfg.seed, classes, where)]
        return _FileSource(root, [paths[p] for p in pos], labels[pos], pos)


# ------------------------------------ Waterbirds ---------------------------------------------


@lru_cache(maxsize=16)
def _waterbirds_meta(path: str, mtime: float) -> tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray]:
    files, y, place, split = [], [], [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"img_filename", "y", "place", "split"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} lacks column(s) {sorted(missing)}")
        for row in reader:
            files.append(row["img_filename"])
            y.append(int(row["y"]))
            place.append(int(row["place"]))
            split.append(int(row["split"]))
    return tuple(files), np.asarray(y, np.int64), np.asarray(place, np.int64), np.asarray(split, np.int64)


@register_dataset("waterbirds")
class Waterbirds(DatasetFamily):
    """metadata.csv (img_filename, y, place, split 0/1/2 = train/val/test). group = 2*y + place.
    test_id: test groups with y == place; test_ood: y != place. Sample id = metadata row."""

    splits = ("train", "val", "test", "test_id", "test_ood")
    eval_splits = ("val", "test", "test_id", "test_ood")
    has_groups = True
    eval_view = "center-crop"
    default_crop_scale = (0.7, 1.0)  # the paper code's Waterbirds preset (ImageNet's is (0.08, 1))
    group_names = ("landbird-on-land", "landbird-on-water", "waterbird-on-land", "waterbird-on-water")
    _split_code = {"train": 0, "val": 1, "test": 2, "test_id": 2, "test_ood": 2}

    def _meta(self, cfg: DataConfig):
        root = require_root(cfg, "metadata.csv")
        path = os.path.join(root, "metadata.csv")
        return root, _waterbirds_meta(path, os.path.getmtime(path))

    def class_names(self, cfg: DataConfig) -> tuple[str, ...]:
        return ("landbird", "waterbird")

    def describe_view(self, cfg: DataConfig) -> str:
        return view_description(self, cfg)

    def source(self, cfg: DataConfig, split: str) -> Source:
        root, (files, y, place, code) = self._meta(cfg)
        mask = code == self._split_code[split]
        if split == "test_id":
            mask &= y == place
        elif split == "test_ood":
            mask &= y != place
        pos = np.flatnonzero(mask)
        if split == "train" and cfg.shots is not None:
            pos = pos[k_shot(y[pos], cfg.shots, cfg.seed, self.class_names(cfg), "the waterbirds train split")]
        return _FileSource(root, [files[p] for p in pos], y[pos], pos, groups=2 * y[pos] + place[pos])


# ------------------------------------ PASCAL VOC ---------------------------------------------

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def parse_voc_xml(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(boxes [N,4] XYXY 0-based pixel edges, class ids [N]). VOC pixel indices are 1-based and
    inclusive, so x1 = xmin - 1, x2 = xmax. Difficult objects are kept (they are in the image)."""
    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError) as e:
        raise ValueError(f"cannot parse VOC annotation {path}: {e}") from e
    boxes, cls = [], []
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise ValueError(f"{path}: unknown VOC class {name!r}")
        bb = obj.find("bndbox")
        x1, y1, x2, y2 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([x1 - 1, y1 - 1, x2, y2])
        cls.append(VOC_CLASSES.index(name))
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(cls, np.int64)


def _parse_voc_split(root: str, split: str) -> tuple[tuple[str, ...], list[tuple[np.ndarray, np.ndarray]]]:
    """The list file's names and every one of their XML files, parsed (what the index replaces)."""
    with open(index.voc_list_file(root, split)) as f:
        names = tuple(line.split()[0] for line in f if line.strip())
    return names, [parse_voc_xml(os.path.join(root, "Annotations", f"{n}.xml")) for n in names]


@lru_cache(maxsize=16)
def _voc_split(root: str, split: str):
    """(names, [(boxes float32 [N,4], class ids int64 [N])] per image, multi-hot float32 [n,20]).
    One lookup per process: the split's file index (``E2KD_NO_INDEX=1``: parse every XML), then
    this cache. The index does not see an XML edited in place (see ``trainables.data.index``)."""
    root = os.path.abspath(root)
    if index.disabled():
        names, anns = _parse_voc_split(root, split)
    else:
        names, anns = index.voc_split_listing(root, split, _parse_voc_split)
    multi_hot = np.zeros((len(names), len(VOC_CLASSES)), np.float32)
    for i, (_, cls) in enumerate(anns):
        multi_hot[i, cls] = 1.0
    return names, anns, multi_hot


class _VOCSource(Source):
    def __init__(self, root: str, names, anns, multi_hot: np.ndarray, pos: np.ndarray):
        self.root = root
        self.names = [names[p] for p in pos]
        self.anns = [anns[p] for p in pos]
        self.labels = multi_hot[pos]
        self.ids = pos.astype(np.int64)

    def load(self, pos: int) -> Record:
        img = load_rgb(os.path.join(self.root, "JPEGImages", f"{self.names[pos]}.jpg"))
        boxes, cls = self.anns[pos]
        return Record(image=img, label=torch.from_numpy(self.labels[pos].copy()), index=int(self.ids[pos]),
                      boxes=torch.from_numpy(boxes.copy()), box_labels=torch.from_numpy(cls))

    def identity(self) -> list:
        return list(self.names)


@register_dataset("voc")
class VOC(DatasetFamily):
    """root/{Annotations,JPEGImages,ImageSets/Main/{train,val[,test]}.txt}. 20 classes, multi-hot
    labels, per-object boxes. ``val`` doubles as the evaluation split (``test`` when test.txt exists).
    Sample id = line number in the split's list file."""

    multilabel = True
    has_boxes = True
    splits = ("train", "val", "test")
    eval_splits = ("val", "test")
    # The localisation protocol (EPG/IoU, and F1 on the same view): the whole image resized to
    # image_size x image_size, so no box is cropped away. Training crops: the paper code's
    # RandomResizedCrop default scale (0.08, 1).
    eval_view = "full"
    default_crop_scale = (0.08, 1.0)

    def _root(self, cfg: DataConfig) -> str:
        return require_root(cfg, "Annotations", "JPEGImages", os.path.join("ImageSets", "Main", "train.txt"))

    def available_splits(self, cfg: DataConfig) -> tuple[str, ...]:
        root = self._root(cfg)
        return tuple(s for s in self.splits if os.path.isfile(os.path.join(root, "ImageSets", "Main", f"{s}.txt")))

    def available_eval_splits(self, cfg: DataConfig) -> tuple[str, ...]:
        return tuple(s for s in self.available_splits(cfg) if s != "train")

    def class_names(self, cfg: DataConfig) -> tuple[str, ...]:
        return VOC_CLASSES

    def describe_view(self, cfg: DataConfig) -> str:
        return view_description(self, cfg)

    def source(self, cfg: DataConfig, split: str) -> Source:
        root = self._root(cfg)
        names, anns, multi_hot = _voc_split(root, split)
        pos = np.arange(len(names))
        if split == "train" and cfg.shots is not None:
            pos = k_shot_multilabel(multi_hot, cfg.shots, cfg.seed, VOC_CLASSES, "the VOC train split")
        return _VOCSource(root, names, anns, multi_hot, pos)
