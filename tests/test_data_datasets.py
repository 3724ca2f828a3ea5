"""Datasets: digits / decoy-digits protocols, on-disk formats (tiny fixtures), config validation."""
from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch
from PIL import Image

from trainables.data import (DATASETS, MAX_BOXES, DataConfig, build_dataset, dataset_info, default_config,
                             sample_view)
from trainables.data.digits import decoy_positions
from trainables.data.folders import VOC_CLASSES

# ------------------------------------ config -------------------------------------------------


@pytest.mark.parametrize("field,value", [("image_size", 4), ("shots", 0), ("val_per_class", -1),
                                         ("crop_scale", (0.5, 1.5)), ("crop_scale", (0.9, 0.5)),
                                         ("decoy_size", 0), ("augment", "yes"), ("crop_ratio", "x")])
def test_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=f"data.{field}"):
        DataConfig(**{field: value})


def test_config_from_dict_and_lists():
    cfg = DataConfig.from_dict({"name": "digits", "crop_scale": [0.5, 1.0]})
    assert cfg.crop_scale == (0.5, 1.0) and hash(cfg)
    with pytest.raises(ValueError, match="data.bogus"):
        DataConfig.from_dict({"bogus": 1})
    assert DataConfig.from_dict(cfg.to_dict()) == cfg


def test_registry_and_unknown_name():
    assert {"digits", "decoy-digits", "imagefolder", "waterbirds", "voc"} <= set(DATASETS)
    with pytest.raises(ValueError, match="data.name"):
        build_dataset(DataConfig(name="nope"), "train")
    assert default_config("imagefolder").image_size == 224 and default_config("imagefolder").hflip
    assert default_config("digits").image_size == 32 and not default_config("digits").hflip


# ------------------------------------ digits -------------------------------------------------


def test_digits_splits_items_encodings():
    cfg = DataConfig()
    info = dataset_info(cfg)
    assert info.num_classes == 10 and not info.multilabel and info.splits == ("train", "val", "test")
    sizes = {s: len(build_dataset(cfg, s)) for s in info.splits}
    assert sum(sizes.values()) == 1797 and sizes["train"] == 1078
    ids = [set(build_dataset(cfg, s).ids.tolist()) for s in info.splits]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    rgb = build_dataset(cfg, "test")[0]
    assert rgb["image"].shape == (3, 32, 32) and rgb["image"].dtype == torch.float32
    assert set(rgb) == {"image", "label", "index"}
    b6 = build_dataset(cfg, "test", encoding="bcos6")[0]["image"]
    assert b6.shape == (6, 32, 32) and b6.min() >= 0 and b6.max() <= 1
    assert torch.allclose(b6[:3] + b6[3:], torch.ones(3, 32, 32))
    # rgb = normalised bcos x
    m, s = info.mean[0], info.std[0]
    assert torch.allclose(rgb["image"], (b6[:3] - m) / s, atol=1e-5)
    # splits do not depend on cfg.seed
    assert np.array_equal(build_dataset(DataConfig(seed=1), "val").ids, build_dataset(cfg, "val").ids)
    with pytest.raises(ValueError, match="no split"):
        build_dataset(cfg, "test_ood")
    with pytest.raises(ValueError, match="encoding"):
        build_dataset(cfg, "train", encoding="hsv")


def test_kshot_deterministic_exact_nested_and_too_many():
    a = build_dataset(DataConfig(shots=5, seed=3), "train")
    b = build_dataset(DataConfig(shots=5, seed=3), "train")
    c = build_dataset(DataConfig(shots=5, seed=4), "train")
    assert np.array_equal(a.ids, b.ids) and not np.array_equal(a.ids, c.ids)
    assert np.bincount(a.labels, minlength=10).tolist() == [5] * 10
    big = build_dataset(DataConfig(shots=20, seed=3), "train")
    assert set(a.ids.tolist()) <= set(big.ids.tolist())  # same seed: 5-shot inside 20-shot
    val = set(build_dataset(DataConfig(shots=5, seed=3), "val").ids.tolist())
    assert not (set(a.ids.tolist()) & val)
    fp = [dataset_info(DataConfig(shots=5, seed=s)).fingerprint for s in (3, 4)]
    assert fp[0] != fp[1]
    with pytest.raises(ValueError, match=r"data.shots=500.*class '\d'"):
        build_dataset(DataConfig(shots=500), "train")


def test_train_augmentation_shapes_and_randomness():
    ds = build_dataset(DataConfig(hflip=True), "train", train=True)
    torch.manual_seed(0)
    x1, x2 = ds[0]["image"], ds[0]["image"]
    assert x1.shape == (3, 32, 32) and not torch.equal(x1, x2)
    no_aug = build_dataset(DataConfig(augment=False), "train", train=True)
    assert torch.equal(no_aug[0]["image"], build_dataset(DataConfig(), "train")[0]["image"])
    v = sample_view(32, 32, (0.6, 1.0), (3 / 4, 4 / 3), True)
    assert 0.5 <= v.height * v.width / 1024 <= 1.05
    # digits: the un-augmented view is the full image, so eval = cache view = the record itself
    ds = build_dataset(DataConfig(), "train")
    assert torch.equal(ds[3]["image"], build_dataset(DataConfig(), "train", view="full")[3]["image"])
    assert ds.record(3).image.shape == (3, 32, 32)


# ------------------------------------ decoy-digits -------------------------------------------


def _decoy_position(img: torch.Tensor, corners, p: int) -> int:
    """Which border corner holds the all-1.0 patch (bcos6 x channels in [0,1])."""
    hits = [k for k, (y, x) in enumerate(corners) if bool((img[:3, y:y + p, x:x + p] == 1.0).all())]
    assert len(hits) >= 1
    return hits[0] if len(hits) == 1 else -1


def test_decoy_predictive_in_train_and_independent_in_test():
    cfg = DataConfig(name="decoy-digits")
    info = dataset_info(cfg)
    assert info.splits == ("train", "val", "test_id", "test") and info.has_groups and info.num_groups == 2
    corners = decoy_positions(32, cfg.decoy_size, 10)
    assert len(set(corners)) == 10
    train = build_dataset(cfg, "train", encoding="bcos6")
    for pos in range(0, len(train), 37):  # the patch sits at the label's position
        it = train[pos]
        assert _decoy_position(it["image"], corners, cfg.decoy_size) in (it["label"], -1)
        assert it["group"] == 1
    assert (train.source.decoy == train.labels).all()
    test = build_dataset(cfg, "test", encoding="bcos6")
    digits_test = build_dataset(DataConfig(), "test")
    assert len(test) == 10 * len(digits_test)
    table = np.zeros((10, 10), int)  # label x decoy position
    for y, d in zip(test.labels, test.source.decoy):
        table[y, d] += 1
    # exactly independent: every position occurs equally often with every label
    per_label = np.bincount(digits_test.labels, minlength=10)
    assert (table == per_label[:, None]).all()
    it = test[123]
    assert _decoy_position(it["image"], corners, cfg.decoy_size) in (int(test.source.decoy[123]), -1)
    groups = np.array([int(d == y) for y, d in zip(test.labels, test.source.decoy)])
    assert groups.mean() == pytest.approx(0.1)
    assert len(set(test.ids.tolist())) == len(test)
    test_id = build_dataset(cfg, "test_id")
    assert len(test_id) == len(digits_test) and (test_id.source.decoy == test_id.labels).all()
    # the decoy changes only the patch
    clean, dec = digits_test[0]["image"], build_dataset(cfg, "test_id")[0]["image"]
    assert (clean != dec).float().mean() < 0.05


def test_decoy_teacher_config_is_clean():
    from trainables.data.base import family

    cfg = DataConfig(name="decoy-digits", shots=5)
    t = family(cfg).teacher_config(cfg)
    assert t.name == "digits" and t.shots is None


# ------------------------------------ imagefolder --------------------------------------------


def _img(path, seed, size=(40, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    counts = {"cat": 9, "dog": 7, "eel": 12}
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            _img(str(root / "train" / name / f"{i:03d}.png"), 100 * c + i)
        for i in range(3):
            _img(str(root / "val" / name / f"v{i}.jpg"), 1000 + 100 * c + i)
    return str(root)


def test_imagefolder_protocol(folder_root):
    cfg = DataConfig(name="imagefolder", root=folder_root, image_size=16, val_per_class=2, shots=3, seed=1)
    info = dataset_info(cfg)
    assert info.class_names == ("cat", "dog", "eel") and info.splits == ("train", "val", "test")
    train, val, test = (build_dataset(cfg, s) for s in ("train", "val", "test"))
    assert np.bincount(train.labels).tolist() == [3, 3, 3]
    assert np.bincount(val.labels).tolist() == [2, 2, 2]
    assert len(test) == 9
    assert not (set(train.ids.tolist()) & set(val.ids.tolist()))
    # validation does not depend on cfg.seed (fixed seed 42); shots do
    val2 = build_dataset(DataConfig(name="imagefolder", root=folder_root, image_size=16, val_per_class=2,
                                    shots=3, seed=2), "val")
    assert np.array_equal(val.ids, val2.ids)
    again = build_dataset(cfg, "train")
    assert np.array_equal(train.ids, again.ids)
    it = train[0]
    assert it["image"].shape == (3, 16, 16) and isinstance(it["label"], int)
    assert build_dataset(cfg, "train", train=True)[1]["image"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match=r"data.shots=6 but class 'dog' has only 5"):
        build_dataset(DataConfig(name="imagefolder", root=folder_root, val_per_class=2, shots=6), "train")


def test_missing_root_names_path_and_field(tmp_path):
    missing = str(tmp_path / "nowhere")
    for name in ("imagefolder", "waterbirds", "voc"):
        with pytest.raises(FileNotFoundError, match="data.root") as e:
            build_dataset(DataConfig(name=name, root=missing), "train")
        assert missing in str(e.value)
    with pytest.raises(ValueError, match="data.root"):
        dataset_info(DataConfig(name="imagefolder"))


# ------------------------------------ waterbirds ---------------------------------------------


@pytest.fixture(scope="module")
def waterbirds_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("waterbirds")
    rows = []
    k = 0
    for split, spec in [(0, {(0, 0): 3, (1, 1): 3}), (1, {(0, 0): 1, (0, 1): 1, (1, 0): 1, (1, 1): 1}),
                        (2, {(0, 0): 2, (0, 1): 2, (1, 0): 2, (1, 1): 2})]:
        for (y, place), n in spec.items():
            for _ in range(n):
                f = f"{k:03d}.Bird/img_{k}.jpg"
                _img(str(root / f), k)
                rows.append({"img_id": k, "img_filename": f, "y": y, "split": split, "place": place})
                k += 1
    with open(root / "metadata.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["img_id", "img_filename", "y", "split", "place"])
        w.writeheader()
        w.writerows(rows)
    return str(root)


def test_waterbirds_groups_and_splits(waterbirds_root):
    cfg = DataConfig(name="waterbirds", root=waterbirds_root, image_size=16)
    info = dataset_info(cfg)
    assert info.num_groups == 4 and info.has_groups and info.num_classes == 2
    assert set(info.splits) == {"train", "val", "test", "test_id", "test_ood"}
    sizes = {s: len(build_dataset(cfg, s)) for s in info.splits}
    assert sizes == {"train": 6, "val": 4, "test": 8, "test_id": 4, "test_ood": 4}
    for s in info.splits:
        ds = build_dataset(cfg, s)
        for i in range(len(ds)):
            it = ds[i]
            y, g = it["label"], it["group"]
            assert g // 2 == y  # group = 2*y + place
            if s == "train":
                assert g in (0, 3)  # fully correlated training data in this fixture
            if s == "test_id":
                assert g in (0, 3)
            if s == "test_ood":
                assert g in (1, 2)
    ood = build_dataset(cfg, "test_ood")
    assert set(ood.ids.tolist()) <= set(build_dataset(cfg, "test").ids.tolist())
    shots = build_dataset(DataConfig(name="waterbirds", root=waterbirds_root, image_size=16, shots=2), "train")
    assert np.bincount(shots.labels).tolist() == [2, 2]


# ------------------------------------ VOC ----------------------------------------------------


def _voc_xml(objs, size=(40, 30)):
    parts = [f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"]
    for name, (x1, y1, x2, y2) in objs:
        parts.append(f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x1}</xmin>"
                     f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>"


def _write_voc(root, ann: dict, splits: dict[str, str], size=(40, 30)) -> None:
    """A VOC folder: one XML + JPEG (``size``) per image of ``ann``, and the split lists."""
    (root / "Annotations").mkdir()
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for name, objs in ann.items():
        (root / "Annotations" / f"{name}.xml").write_text(_voc_xml(objs, size))
        _img(str(root / "JPEGImages" / f"{name}.jpg"), hash(name) % 1000, size=size)
    for split, names in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text(names)


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    ann = {
        "a1": [("dog", (1, 1, 20, 30)), ("person", (21, 5, 40, 25))],
        "a2": [("cat", (5, 5, 15, 15))],
        "a3": [("dog", (10, 10, 30, 20)), ("dog", (2, 2, 8, 8))],
        "b1": [("car", (1, 1, 40, 30))],
    }
    _write_voc(root, ann, {"train": "a1\na2\na3\n", "val": "b1\n"})
    return str(root)


def test_voc_labels_and_boxes(voc_root):
    cfg = DataConfig(name="voc", root=voc_root, image_size=30, augment=True, hflip=True)
    info = dataset_info(cfg)
    assert info.multilabel and info.has_boxes and info.num_classes == 20 and info.splits == ("train", "val")
    ds = build_dataset(cfg, "train")
    it = ds[0]
    assert it["label"].dtype == torch.float32 and it["label"].shape == (20,)
    assert it["label"].nonzero().flatten().tolist() == sorted([VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")])
    boxes = it["boxes"]
    assert boxes.shape == (MAX_BOXES, 5)
    real = boxes[boxes[:, 0] >= 0]
    assert sorted(real[:, 0].long().tolist()) == sorted([VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")])
    # evaluation view: the whole 40x30 image resized to 30x30 (no crop); VOC xmin 1 -> x 0
    sx, sy = 30 / 40, 30 / 30
    dog = real[real[:, 0] == VOC_CLASSES.index("dog")][0, 1:]
    expect = torch.tensor([0 * sx, 0 * sy, 20 * sx, 30 * sy])
    assert torch.allclose(dog, expect, atol=1e-4)
    assert ds[2]["label"].sum() == 1 and (ds[2]["boxes"][:, 0] >= 0).sum() == 2
    # boxes follow the augmentation: stay inside the view; a flipped sample mirrors them
    aug = build_dataset(cfg, "train", train=True)
    torch.manual_seed(0)
    for _ in range(5):
        b = aug[0]["boxes"]
        r = b[b[:, 0] >= 0]
        assert (r[:, 1:] >= 0).all() and (r[:, 1:] <= 30).all()
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["boxes"].shape == (2, MAX_BOXES, 5) and batch["label"].shape == (2, 20)
    with pytest.raises(ValueError, match="data.shots=2 but class 'aeroplane'"):
        build_dataset(DataConfig(name="voc", root=voc_root, shots=2), "train")


def test_multilabel_kshot_covers_every_class():
    from trainables.data.base import k_shot_multilabel

    rng = np.random.default_rng(0)
    mh = (rng.random((300, 20)) < 0.1).astype(np.float32)
    sel = k_shot_multilabel(mh, 4, seed=1, class_names=VOC_CLASSES)
    assert (mh[sel].sum(0) >= 4).all() and len(set(sel.tolist())) == len(sel)
    assert np.array_equal(sel, k_shot_multilabel(mh, 4, seed=1, class_names=VOC_CLASSES))


# ------------------------------------ the paper's training view ------------------------------
# Golden checks of the training crop against torchvision's own RandomResizedCrop (+ flip), driven
# by the same seeds: an independent code path (v1 transforms, applied to the decoded file).

PRESETS = {"imagefolder": (0.08, 1.0), "waterbirds": (0.7, 1.0), "voc": (0.08, 1.0)}


@pytest.mark.parametrize("name,scale", sorted(PRESETS.items()))
def test_presets_carry_the_paper_code_crop_scale(name, scale):
    cfg = default_config(name)
    assert cfg.crop_scale == scale and cfg.crop_ratio == pytest.approx((3 / 4, 4 / 3)) and cfg.hflip
    assert cfg.image_size == 224


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.7, 1.0)])
def test_crop_box_statistics_match_torchvision_sampler(scale):
    """Over 2,000 seeds on a 375x500 image: every box equals torchvision's
    RandomResizedCrop.get_params under the same seed, its area fraction lies in the preset's scale
    range, and the mean area fraction (golden value within sampling error) is the sampler's."""
    import torchvision.transforms as T

    h, w, ratio = 375, 500, (3 / 4, 4 / 3)
    ours, theirs = [], []
    for seed in range(2000):
        v = sample_view(h, w, scale, ratio, hflip=True, seed=seed)
        torch.manual_seed(seed)
        i, j, hh, ww = T.RandomResizedCrop.get_params(torch.empty(3, h, w), scale, ratio)
        flip = bool(torch.rand(1) < 0.5)  # what RandomHorizontalFlip draws next
        assert (v.top, v.left, v.height, v.width, v.flip) == (i, j, hh, ww, flip), seed
        assert 0 <= v.top and v.top + v.height <= h and 0 <= v.left and v.left + v.width <= w
        ours.append(v.height * v.width / (h * w))
        theirs.append(hh * ww / (h * w))
    ours = np.asarray(ours)
    # int() truncation of the sampled side lengths can put a box a hair under the lower bound
    assert ours.min() >= scale[0] * 0.97 and ours.max() <= scale[1]
    assert ours.mean() == pytest.approx(np.mean(theirs), abs=1e-12)
    # uniform target area, minus rejected draws (boxes that do not fit): below the midpoint
    lo, hi = scale
    assert lo < ours.mean() < (lo + hi) / 2 + 0.02


@pytest.fixture(scope="module")
def framed_root(tmp_path_factory):
    """One-class ImageFolder of 60x40 images: grey inside, a pure red band on the left 8 columns.
    The 16 px centre-crop view (Resize 18 -> 27x18, CenterCrop 16 at left 6, top 1: full-image
    x in [13.3, 48.9], y in [2.2, 37.8]) never shows red; crops of the full image do."""
    root = tmp_path_factory.mktemp("framed")
    for c in ("a", "b"):
        for i in range(4):
            a = np.full((40, 60, 3), 128, np.uint8)
            a[:, :8] = (255, 0, 0)
            a[:, 8:] += np.uint8(10 * i)
            p = root / "train" / c / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(p)
    return str(root)


def test_training_crops_come_from_the_full_image_not_the_centre_crop(framed_root):
    import torchvision.transforms as T

    cfg = DataConfig(name="imagefolder", root=framed_root, image_size=16, val_per_class=1, hflip=True,
                     crop_scale=(0.08, 1.0))
    ev = build_dataset(cfg, "train", encoding="bcos6")
    tr = build_dataset(cfg, "train", encoding="bcos6", train=True)

    def red(x):  # pixels that are (close to) pure red
        return ((x[0] > 0.9) & (x[1] < 0.1) & (x[2] < 0.1)).sum().item()

    assert red(ev[0]["image"]) == 0  # the evaluation view is the centre crop: no red
    full = tr.record(0).image
    assert full.shape == (3, 40, 60)
    with_red, outside = 0, 0
    for seed in range(60):
        x = tr[(0, seed)]["image"][:3]
        # the same pixels as torchvision's RandomResizedCrop(16) + RandomHorizontalFlip on the decoded file
        torch.manual_seed(seed)
        want = T.Compose([T.RandomResizedCrop(16, scale=(0.08, 1.0), antialias=True),
                          T.RandomHorizontalFlip()])(full)
        assert torch.allclose(x, want, atol=1e-5), seed
        with_red += red(x) > 0
        v = sample_view(40, 60, cfg.crop_scale, cfg.crop_ratio, True, seed)
        outside += v.left < 13.3 or v.left + v.width > 48.9 or v.top < 2.2 or v.top + v.height > 37.8
    assert with_red >= 5 and outside >= 10  # content and boxes beyond the centre crop occur


# ------------------------------------ VOC: boxes never leave the evaluation view -------------


@pytest.fixture(scope="module")
def voc_edges(tmp_path_factory):
    """Boxes in the corners and along the borders of 60x40 images (the centre crop cuts them)."""
    root = tmp_path_factory.mktemp("voc_edges")
    ann = {
        "e1": [("bird", (1, 1, 4, 4)), ("cat", (57, 37, 60, 40)), ("dog", (1, 30, 60, 40))],
        "e2": [("car", (1, 1, 6, 40)), ("bus", (55, 1, 60, 40))],
    }
    _write_voc(root, ann, {"train": "e1\ne2\n", "val": "e1\ne2\n"}, size=(60, 40))
    return str(root), ann


def test_voc_boxes_survive_the_evaluation_view_scaled(voc_edges):
    root, ann = voc_edges
    cfg = DataConfig(name="voc", root=root, image_size=32)
    ds = build_dataset(cfg, "val")
    sx, sy = 32 / 60, 32 / 40
    for pos, name in enumerate(("e1", "e2")):
        it = ds[pos]
        assert it["image"].shape == (3, 32, 32)
        rows = it["boxes"][it["boxes"][:, 0] >= 0]
        assert len(rows) == len(ann[name])  # every box survives
        assert ((rows[:, 3] - rows[:, 1]) > 0).all() and ((rows[:, 4] - rows[:, 2]) > 0).all()
        for row, (cls, (x1, y1, x2, y2)) in zip(rows, ann[name]):
            assert int(row[0]) == VOC_CLASSES.index(cls)
            want = torch.tensor([(x1 - 1) * sx, (y1 - 1) * sy, x2 * sx, y2 * sy])
            assert torch.allclose(row[1:], want, atol=1e-4), (name, cls)
            assert (row[1:] >= 0).all() and (row[1:] <= 32).all()
    # the view is the whole image resized: the same pixels as torchvision's Resize((32, 32))
    import torchvision.transforms.v2.functional as TF

    full = ds.record(0).image
    want = TF.resize(full, [32, 32], antialias=True)
    enc = build_dataset(cfg, "val", encoding="bcos6")[0]["image"][:3]
    assert torch.allclose(enc, want, atol=1e-6)
