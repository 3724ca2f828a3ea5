"""The file indexes (ImageFolder listing, parsed PASCAL VOC split): built once, reused without a
scan or an XML parse, rebuilt when the data changes."""
from __future__ import annotations

import errno
import logging
import os
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from trainables.data import DataConfig, build_dataset
from trainables.data import folders
from trainables.data import index as file_index
from trainables.data.folders import VOC_CLASSES, _list_folder, _voc_split
from trainables.data.index import IMG_EXTENSIONS
from test_data_datasets import _voc_xml  # the VOC annotation writer of the dataset tests

HOUR_AGO = time.time() - 3600


def _img(path, seed, size=(20, 16)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _age(top, when=HOUR_AGO):
    """Data written long ago: an index of directories modified seconds ago is not saved (see index.py)."""
    for d, _, _ in os.walk(top):
        os.utime(d, (when, when))


def _old_list_folder(folder, classes):
    """The directory scan _list_folder did before the index, verbatim: the reference result."""
    if classes is None:
        classes = tuple(sorted(e.name for e in os.scandir(folder) if e.is_dir()))
        if not classes:
            raise FileNotFoundError(f"no class sub-directories in {folder}")
    else:
        extra = sorted(e.name for e in os.scandir(folder) if e.is_dir() and e.name not in classes)
        if extra:
            raise ValueError(f"{folder} has classes not in the train folder: {extra[:5]}")
    paths, labels = [], []
    for c, name in enumerate(classes):
        d = os.path.join(folder, name)
        if not os.path.isdir(d):
            continue
        files = sorted(e.name for e in os.scandir(d) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
        paths += [os.path.join(os.path.basename(folder), name, f) for f in files]
        labels += [c] * len(files)
    return classes, tuple(paths), np.asarray(labels, dtype=np.int64)


@pytest.fixture(autouse=True)
def node_cache(tmp_path, monkeypatch):
    cache = tmp_path / "node-cache"
    monkeypatch.setenv("E2KD_LOCAL_CACHE", str(cache))
    monkeypatch.delenv("E2KD_NO_INDEX", raising=False)
    _list_folder.cache_clear()
    _voc_split.cache_clear()
    yield cache
    _list_folder.cache_clear()
    _voc_split.cache_clear()


@pytest.fixture
def root(tmp_path):
    """train: 3 classes of PNG/JPEG plus a non-image file; val: 2 of those classes."""
    root = tmp_path / "data"
    counts = {"cat": 4, "dog": 3, "eel": 5}
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            _img(str(root / "train" / name / f"{i:03d}.{'png' if i % 2 else 'jpg'}"), 100 * c + i)
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    for c, name in enumerate(("cat", "eel")):
        for i in range(2):
            _img(str(root / "val" / name / f"v{i}.JPEG"), 1000 + 100 * c + i)
    _age(root)
    return root


def _listing(folder, classes=None):
    """A new process's view: the per-process cache is empty."""
    _list_folder.cache_clear()
    return _list_folder(str(folder), classes)


def _scanned(folder, classes, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv("E2KD_NO_INDEX", "1")
        return _listing(folder, classes)


def _assert_same(got, want):
    assert type(got[0]) is tuple and all(type(c) is str for c in got[0])
    assert type(got[1]) is tuple and all(type(p) is str for p in got[1])
    assert isinstance(got[2], np.ndarray) and got[2].dtype == np.int64 and got[2].flags.writeable
    assert got[0] == want[0] and got[1] == want[1] and np.array_equal(got[2], want[2])


@pytest.fixture
def scandirs(monkeypatch):
    """Every directory os.scandir is called on, in any module (they all call os.scandir)."""
    calls, real = [], os.scandir

    def counting(path="."):
        calls.append(os.path.abspath(os.fspath(path)))
        return real(path)

    monkeypatch.setattr(os, "scandir", counting)
    return calls


def _class_dirs(folder):
    return {os.path.join(str(folder), e.name) for e in os.scandir(folder) if e.is_dir()}


def test_a_trial_started_twice_on_the_same_data_does_not_rescan_the_tree(root, monkeypatch, scandirs, caplog):
    train = root / "train"
    with caplog.at_level(logging.INFO, logger="e2kd"):
        first = _listing(train)
    assert f"indexed 12 files of {train}" in caplog.text
    assert os.path.isfile(file_index.shared_path(str(train)))  # next to the data: <root>/.e2kd-index/train.parquet
    assert os.path.isfile(root / ".e2kd-index" / "train.parquet")
    class_dirs = _class_dirs(train)
    scandirs.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="e2kd"):
        again = _listing(train)
    assert not class_dirs & set(scandirs) and not scandirs
    assert "indexed" not in caplog.text
    _assert_same(again, first)
    _assert_same(again, _scanned(train, None, monkeypatch))
    _assert_same(again, _old_list_folder(str(train), None))


def test_classes_argument_as_before(root, monkeypatch):
    train_classes = _listing(root / "train")[0]
    val = root / "val"
    for _ in range(2):  # build, then read the index
        _assert_same(_listing(val, train_classes), _old_list_folder(str(val), train_classes))
    # a class order other than sorted: rows follow it, names stay sorted within a class
    order = ("eel", "dog", "cat")
    _assert_same(_listing(val, order), _old_list_folder(str(val), order))
    (val / "zebra").mkdir()
    _age(root, HOUR_AGO + 5)
    for indexed in (True, False):
        with monkeypatch.context() as m:
            if not indexed:
                m.setenv("E2KD_NO_INDEX", "1")
            with pytest.raises(ValueError, match=r"has classes not in the train folder: \['zebra'\]"):
                _listing(val, train_classes)


def test_added_file_rebuilds_the_index(root, caplog):
    train = root / "train"
    before = _listing(train)
    dog = train / "dog"
    _img(str(dog / "zzz-new.png"), 7)
    os.utime(dog, (HOUR_AGO + 10, HOUR_AGO + 10))  # explicit: coarse-mtime filesystems may not tick
    with caplog.at_level(logging.INFO, logger="e2kd"):
        after = _listing(train)
    assert "rebuilt: " in caplog.text and "folder changed" in caplog.text
    assert "train/dog/zzz-new.png" in after[1] and len(after[1]) == len(before[1]) + 1
    _assert_same(after, _old_list_folder(str(train), None))
    _assert_same(_listing(train), after)  # and the rebuilt index is the one read next


def test_removed_class_directory_rebuilds(root):
    train = root / "train"
    _listing(train)
    for f in os.listdir(train / "eel"):
        os.unlink(train / "eel" / f)
    os.rmdir(train / "eel")
    _age(root, HOUR_AGO + 20)
    got = _listing(train)
    assert got[0] == ("cat", "dog")
    _assert_same(got, _old_list_folder(str(train), None))


def _permissions_apply(tmp_path) -> bool:
    """False for root with CAP_DAC_OVERRIDE (it writes into 0o555 directories), which
    os.geteuid() alone would not tell from root without it."""
    probe = tmp_path / "probe"
    probe.mkdir(mode=0o555)
    try:
        (probe / "x").touch()
        return False
    except PermissionError:
        return True
    finally:
        probe.chmod(0o755)


def test_read_only_data_indexes_in_the_node_cache(root, node_cache, scandirs, tmp_path):
    if not _permissions_apply(tmp_path):
        pytest.skip("this user ignores directory permissions (root)")
    train = root / "train"
    os.chmod(root, 0o555)
    try:
        first = _listing(train)
        assert not (root / ".e2kd-index").exists()
        local = file_index.local_path(str(train))
        assert local.startswith(str(node_cache / "indexes")) and os.path.isfile(local)
        scandirs.clear()
        again = _listing(train)
        assert not _class_dirs(train) & set(scandirs)
        _assert_same(again, first)
        _assert_same(again, _old_list_folder(str(train), None))
    finally:
        os.chmod(root, 0o755)


def test_data_mount_refusing_writes_indexes_in_the_node_cache(root, node_cache, monkeypatch, scandirs):
    """The read-only case for any user, root included: writes next to the data fail with EROFS."""
    real = file_index._write_atomic

    def read_only_mount(table, path):
        if path.startswith(str(root)):
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real(table, path)

    monkeypatch.setattr(file_index, "_write_atomic", read_only_mount)
    train = root / "train"
    first = _listing(train)
    assert os.path.isfile(file_index.local_path(str(train))) and not (root / ".e2kd-index").exists()
    scandirs.clear()
    _assert_same(_listing(train), first)
    assert not scandirs


def test_corrupt_index_is_rebuilt(root, caplog):
    train = root / "train"
    first = _listing(train)
    path = file_index.shared_path(str(train))
    with open(path, "wb") as f:
        f.write(b"\x00garbage, not parquet\xff" * 10)
    with caplog.at_level(logging.INFO, logger="e2kd"):
        got = _listing(train)
    assert "unreadable" in caplog.text
    _assert_same(got, first)
    assert file_index._read(path, str(train))[0] is not None  # replaced by a whole index


def test_other_format_version_is_rebuilt(root, monkeypatch, caplog):
    train = root / "train"
    first = _listing(train)
    monkeypatch.setattr(file_index, "FORMAT_VERSION", file_index.FORMAT_VERSION + 1)
    with caplog.at_level(logging.INFO, logger="e2kd"):
        _assert_same(_listing(train), first)
    assert "format" in caplog.text and "indexed" in caplog.text


def test_recently_modified_data_is_listed_but_not_indexed(root, caplog):
    train = root / "train"
    os.utime(train / "cat")  # now: maybe still being written
    with caplog.at_level(logging.INFO, logger="e2kd"):
        got = _listing(train)
    assert "not saved" in caplog.text and not os.path.exists(file_index.shared_path(str(train)))
    _assert_same(got, _old_list_folder(str(train), None))


def test_workers_of_one_node_build_once(root, caplog):
    train, results = str(root / "train"), []
    with caplog.at_level(logging.INFO, logger="e2kd"):
        workers = [threading.Thread(target=lambda: results.append(file_index.folder_listing(train)))
                   for _ in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert caplog.text.count("indexed") == 1 and len(results) == 4
    assert all(r.paths == results[0].paths and np.array_equal(r.labels, results[0].labels) for r in results)


def test_imagefolder_dataset_same_with_and_without_index(root, monkeypatch):
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=32, val_per_class=1)

    def split(name):
        _list_folder.cache_clear()
        ds = build_dataset(cfg, name)
        return ds.ids.copy(), ds.labels.copy(), ds.source.identity()

    for name in ("train", "val", "test"):
        indexed, indexed_again = split(name), split(name)
        with monkeypatch.context() as m:
            m.setenv("E2KD_NO_INDEX", "1")
            scanned = split(name)
        for a in (indexed_again, scanned):
            assert np.array_equal(indexed[0], a[0]) and np.array_equal(indexed[1], a[1]) and indexed[2] == a[2]
    assert {"train.parquet", "val.parquet"} <= set(os.listdir(root / ".e2kd-index"))
    assert build_dataset(cfg, "train")[0]["image"].shape == (3, 32, 32)


# ------------------------------------ PASCAL VOC ---------------------------------------------

VOC_ANN = {
    "a1": [("dog", (1, 1, 20, 16)), ("person", (11, 5, 20, 15))],
    "a2": [("cat", (5, 5, 15, 15))],
    "a3": [("dog", (10, 10, 18, 14)), ("dog", (2, 2, 8, 8)), ("car", (1, 1, 20, 16))],
    "a4": [],  # no object: boxes [0,4]
    "b1": [("car", (1, 1, 20, 16))],
}


def _age_voc(root, when=HOUR_AGO):
    """Directories and list files written long ago (an index of data modified seconds ago is not saved)."""
    _age(root, when)
    for f in os.listdir(root / "ImageSets" / "Main"):
        os.utime(root / "ImageSets" / "Main" / f, (when, when))


@pytest.fixture
def voc_root(tmp_path):
    root = tmp_path / "voc"
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "Annotations").mkdir()
    for i, (name, objs) in enumerate(VOC_ANN.items()):
        (root / "Annotations" / f"{name}.xml").write_text(_voc_xml(objs))
        _img(str(root / "JPEGImages" / f"{name}.jpg"), 500 + i)
    (root / "ImageSets" / "Main" / "train.txt").write_text("a1\na2\na3\na4\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("b1\n")
    _age_voc(root)
    return root


@pytest.fixture
def xml_parses(monkeypatch):
    """Every annotation file parse_voc_xml parses (the folders module calls it through its global)."""
    calls, real = [], folders.parse_voc_xml

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(folders, "parse_voc_xml", counting)
    return calls


def _voc(root, split="train"):
    """A new process's view: the per-process cache is empty."""
    _voc_split.cache_clear()
    return _voc_split(str(root), split)


def _voc_parsed(root, split, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv("E2KD_NO_INDEX", "1")
        return _voc(root, split)


def _assert_same_voc(got, want):
    names, anns, multi_hot = got
    assert type(names) is tuple and all(type(n) is str for n in names) and names == want[0]
    assert type(anns) is list and len(anns) == len(names) == len(want[1])
    for ann, (want_boxes, want_cls) in zip(anns, want[1]):
        assert type(ann) is tuple and len(ann) == 2
        boxes, cls = ann
        assert isinstance(boxes, np.ndarray) and boxes.dtype == np.float32 and boxes.shape == (len(cls), 4)
        assert isinstance(cls, np.ndarray) and cls.dtype == np.int64 and cls.ndim == 1
        assert boxes.flags.writeable and cls.flags.writeable and boxes.flags.c_contiguous
        assert np.array_equal(boxes, want_boxes) and np.array_equal(cls, want_cls)
    assert multi_hot.dtype == np.float32 and multi_hot.shape == (len(names), len(VOC_CLASSES))
    assert np.array_equal(multi_hot, want[2])


def _expected_voc(names):
    """What the fixture's XML files say, written out independently of the parser."""
    anns = []
    for n in names:
        objs = VOC_ANN[n]
        anns.append((np.asarray([[x1 - 1, y1 - 1, x2, y2] for _, (x1, y1, x2, y2) in objs], np.float32).reshape(-1, 4),
                     np.asarray([VOC_CLASSES.index(c) for c, _ in objs], np.int64)))
    multi_hot = np.zeros((len(names), 20), np.float32)
    for i, (_, cls) in enumerate(anns):
        multi_hot[i, cls] = 1
    return tuple(names), anns, multi_hot


def test_voc_split_listed_twice_parses_no_xml_the_second_time(voc_root, xml_parses, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="e2kd"):
        first = _voc(voc_root)
    assert len(xml_parses) == 4 and f"indexed 4 annotations of VOC {voc_root} split 'train'" in caplog.text
    assert os.path.isfile(voc_root / ".e2kd-index" / "voc-train.parquet")
    assert file_index.voc_shared_path(str(voc_root), "train") == str(voc_root / ".e2kd-index" / "voc-train.parquet")
    _assert_same_voc(first, _expected_voc(["a1", "a2", "a3", "a4"]))
    xml_parses.clear()
    caplog.clear()

    def no_read_table(*a, **k):  # it would import pyarrow.dataset in every trial process (see _read_index)
        raise AssertionError("pq.read_table")

    with caplog.at_level(logging.INFO, logger="e2kd"), monkeypatch.context() as m:
        m.setattr(file_index.pq, "read_table", no_read_table)
        again = _voc(voc_root)
    assert xml_parses == [] and "indexed" not in caplog.text
    _assert_same_voc(again, first)
    parsed = _voc_parsed(voc_root, "train", monkeypatch)  # the other code path: E2KD_NO_INDEX=1 parses
    assert len(xml_parses) == 4
    _assert_same_voc(again, parsed)
    # one index per split
    _assert_same_voc(_voc(voc_root, "val"), _expected_voc(["b1"]))
    xml_parses.clear()
    _assert_same_voc(_voc(voc_root, "val"), _expected_voc(["b1"]))
    assert xml_parses == [] and os.path.isfile(voc_root / ".e2kd-index" / "voc-val.parquet")


def test_voc_image_added_to_the_split_rebuilds(voc_root, xml_parses, monkeypatch, caplog):
    before = _voc(voc_root)
    new_objs = [("horse", (3, 4, 12, 14)), ("person", (1, 1, 5, 5))]
    (voc_root / "Annotations" / "a5.xml").write_text(_voc_xml(new_objs))
    with open(voc_root / "ImageSets" / "Main" / "train.txt", "a") as f:
        f.write("a5\n")
    _age_voc(voc_root, HOUR_AGO + 10)  # explicit: coarse-mtime filesystems may not tick
    xml_parses.clear()
    with caplog.at_level(logging.INFO, logger="e2kd"):
        after = _voc(voc_root)
    assert "rebuilt: " in caplog.text and "list file or Annotations changed" in caplog.text
    assert len(xml_parses) == 5 and after[0] == before[0] + ("a5",)
    assert np.array_equal(after[1][-1][1], [VOC_CLASSES.index("horse"), VOC_CLASSES.index("person")])
    assert after[2][-1].nonzero()[0].tolist() == sorted([VOC_CLASSES.index("horse"), VOC_CLASSES.index("person")])
    _assert_same_voc(after, _voc_parsed(voc_root, "train", monkeypatch))
    xml_parses.clear()
    _assert_same_voc(_voc(voc_root), after)  # and the rebuilt index is the one read next
    assert xml_parses == []
    # the list file alone (same size: only its mtime tells)
    (voc_root / "ImageSets" / "Main" / "train.txt").write_text("a5\na1\na2\na3\na4\n")
    _age_voc(voc_root, HOUR_AGO + 20)
    assert _voc(voc_root)[0] == ("a5", "a1", "a2", "a3", "a4")


def test_voc_annotation_edited_in_place_is_not_seen_until_the_index_goes(voc_root, monkeypatch):
    """The documented limit: an XML rewritten in place changes no keyed mtime."""
    first = _voc(voc_root)
    (voc_root / "Annotations" / "a2.xml").write_text(_voc_xml([("sheep", (2, 2, 9, 9))]))
    _age_voc(voc_root)  # the directory's mtime as before
    assert np.array_equal(_voc(voc_root)[1][1][1], first[1][1][1])  # stale: still the cat
    assert _voc_parsed(voc_root, "train", monkeypatch)[1][1][1].tolist() == [VOC_CLASSES.index("sheep")]
    os.unlink(voc_root / ".e2kd-index" / "voc-train.parquet")
    assert _voc(voc_root)[1][1][1].tolist() == [VOC_CLASSES.index("sheep")]


def test_voc_corrupt_index_is_rebuilt(voc_root, xml_parses, caplog):
    first = _voc(voc_root)
    path = file_index.voc_shared_path(str(voc_root), "train")
    with open(path, "wb") as f:
        f.write(b"\x00garbage, not parquet\xff" * 10)
    xml_parses.clear()
    with caplog.at_level(logging.INFO, logger="e2kd"):
        got = _voc(voc_root)
    assert "unreadable" in caplog.text and len(xml_parses) == 4
    _assert_same_voc(got, first)
    assert file_index._read_voc(path, str(voc_root), "train")[0] is not None  # replaced by a whole index
    # an index of another kind at that path (an ImageFolder one) is stale, not misread
    file_index._write_atomic(file_index._folder_table(file_index.scan(str(voc_root / "JPEGImages"))), path)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="e2kd"):
        _assert_same_voc(_voc(voc_root), first)
    assert "kind 'imagefolder', want 'voc'" in caplog.text


def test_voc_index_on_a_read_only_mount_goes_to_the_node_cache(voc_root, node_cache, monkeypatch, xml_parses):
    real = file_index._write_atomic

    def read_only_mount(table, path):
        if path.startswith(str(voc_root)):
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real(table, path)

    monkeypatch.setattr(file_index, "_write_atomic", read_only_mount)
    first = _voc(voc_root)
    local = file_index.voc_local_path(str(voc_root), "train")
    assert local.startswith(str(node_cache / "indexes")) and os.path.isfile(local)
    assert not (voc_root / ".e2kd-index").exists()
    xml_parses.clear()
    _assert_same_voc(_voc(voc_root), first)
    assert xml_parses == []


def test_voc_recently_modified_list_is_parsed_but_not_indexed(voc_root, caplog):
    os.utime(voc_root / "ImageSets" / "Main" / "train.txt")  # now: maybe still being written
    with caplog.at_level(logging.INFO, logger="e2kd"):
        got = _voc(voc_root)
    assert "not saved" in caplog.text and not os.path.exists(file_index.voc_shared_path(str(voc_root), "train"))
    _assert_same_voc(got, _expected_voc(["a1", "a2", "a3", "a4"]))


def test_voc_dataset_same_with_and_without_index(voc_root, monkeypatch):
    cfg = DataConfig(name="voc", root=str(voc_root), image_size=16)

    def split(name):
        _voc_split.cache_clear()
        ds = build_dataset(cfg, name)
        rec = ds[0]
        return ds.ids.copy(), ds.labels.copy(), ds.source.identity(), rec["boxes"], rec["label"]

    for name in ("train", "val"):
        indexed, indexed_again = split(name), split(name)
        with monkeypatch.context() as m:
            m.setenv("E2KD_NO_INDEX", "1")
            parsed = split(name)
        for a in (indexed_again, parsed):
            assert np.array_equal(indexed[0], a[0]) and np.array_equal(indexed[1], a[1]) and indexed[2] == a[2]
            assert torch.equal(indexed[3], a[3]) and torch.equal(indexed[4], a[4])
    assert {"voc-train.parquet", "voc-val.parquet"} <= set(os.listdir(voc_root / ".e2kd-index"))
