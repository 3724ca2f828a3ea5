"""Parquet file indexes of on-disk datasets, built once per dataset instead of a listing per trial.

ImageFolder. Listing ``root/train/<class>/*`` means one ``os.scandir`` per class directory and a
stat-free walk over every entry: on ImageNet 1.28 M names, often over a network mount, in every Ray
Train worker of every trial. The index holds that listing — columns ``path`` (relative to the data
root, ``train/<class>/<file>``) and ``label`` (int64, position in the folder's sorted class names),
rows sorted by class then file name — plus, in the Parquet schema metadata, the class names and a
validity key: the ``st_mtime_ns`` of the folder and of every class directory. Adding, removing or
renaming a file changes its directory's mtime, so checking the key costs one stat per class (~1000
on ImageNet) instead of a 1.28 M-entry scan.

PASCAL VOC. A split is ``ImageSets/Main/<split>.txt`` plus one ``Annotations/<name>.xml`` per line,
all parsed at every trial start (VOC2012 trainval: 11,540 XML files). The index of one
(root, split) holds the parsed result — columns ``name`` (string), ``boxes`` (list<float32>, the
image's [N,4] XYXY boxes flattened row by row) and ``classes`` (list<int64>, N class ids), rows in
list-file order — and the validity key ``{"list": [mtime_ns, size] of the list file,
"Annotations": mtime_ns of the Annotations directory}``: two stats. Editing the list file changes
its mtime and size; adding, removing or renaming an XML (including editors and tools that write a
temp file and rename it over the old one) changes the directory's mtime. Limit: an XML rewritten
in place (same name, same inode) changes neither, so that edit is not detected — delete the index
file (``<root>/.e2kd-index/voc-<split>.parquet``, or the node-local one, see below) or set
``E2KD_NO_INDEX=1`` after editing annotations in place.

Common to both (one set of functions, ``_get`` and what it calls): every index also records in its
schema metadata the format version and its kind (``imagefolder``/``voc``). Where it lives:
``<root>/.e2kd-index/<name>.parquet`` next to the data (ImageFolder: the folder's name; VOC:
``voc-<split>``) when that directory is writable (one build serves every node of a cluster over a
shared mount), else in the node-local cache ``<local_root()>/indexes/<sha256>.parquet`` (read-only
data mounts; ImageFolder keyed by the folder's absolute path, VOC by ``voc:<root>:<split>``). Both
are tried when reading, next to the data first. A stale index (any key mismatch, a missing class
directory or list file, another format version or kind) or an unreadable one is rebuilt with one
log line on the ``e2kd`` logger; a corrupt index never fails a trial. Writes are atomic (temp file
in the same directory, ``os.replace``), so concurrent builders on several nodes leave one whole
index; the workers of one node take a node lock and build once. An index is not saved while a keyed
directory or file was modified in the last few seconds (an extraction still running, or a
filesystem with coarse mtimes where a file added in the same tick would not change the key); the
next process retries. Each key is taken before the data is read, so a change during the build
leaves the saved key older than the data: the next reader rebuilds.

``E2KD_NO_INDEX=1`` disables the index: every process scans the folder / parses the XML files as
before. Like ``E2KD_LOCAL_CACHE`` it is read from each process's environment, so on a cluster set it
where the Ray nodes start.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainables.storage import local_root, node_lock

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FORMAT_VERSION = 1
INDEX_DIR = ".e2kd-index"
# A directory modified this recently may still be changing within one mtime tick; see the docstring.
RACY_NS = 3_000_000_000
# The validity key of any kind sits under "e2kd.mtimes" (its name from when only ImageFolder had an
# index); an index without "e2kd.kind" is an ImageFolder one, so those written before VOC stay valid.
_META_VERSION, _META_KIND, _META_KEY = b"e2kd.index_version", b"e2kd.kind", b"e2kd.mtimes"
_META_CLASSES = b"e2kd.classes"
_FOLDER, _VOC = "imagefolder", "voc"

log = logging.getLogger("e2kd")
T = TypeVar("T")


def disabled() -> bool:
    return os.environ.get("E2KD_NO_INDEX", "") not in ("", "0")


# ------------------------------------ common: where, read, write, build ---------------------


@dataclass(frozen=True)
class _Where:
    """One index's two places, next to the data first; the node lock sits next to the local one."""

    shared: str
    local: str

    @property
    def paths(self) -> tuple[str, str]:
        return self.shared, self.local


def _shared_at(root: str, name: str) -> str:
    return os.path.join(root, INDEX_DIR, f"{name}.parquet")


def _local_at(key: str) -> str:
    return os.path.join(local_root(), "indexes", f"{hashlib.sha256(key.encode()).hexdigest()}.parquet")


def _read_index(path: str, kind: str, key_now: Callable[[dict], object], changed: str,
                decode: Callable[[pq.ParquetFile, dict], T]) -> tuple[T | None, str]:
    """(value, "") when ``path`` is a valid index of this ``kind`` whose stored key equals
    ``key_now(metadata)``, else (None, why not; "" when there is no file). ``key_now`` raising
    FileNotFoundError means the indexed data is gone: stale. One open file for the metadata and the
    columns, through ``pq.ParquetFile``: ``pq.read_table`` would import ``pyarrow.dataset`` in each
    fresh process (~130 ms where pandas is already loaded, as in a Ray worker; ~0.5 s where not),
    several times the cost of reading an index."""
    try:
        with pq.ParquetFile(path) as pf:
            return _check_and_decode(pf, kind, key_now, changed, decode)
    except FileNotFoundError:
        return None, ""
    except Exception as e:  # a corrupt or foreign file: rebuild it, never fail the trial over it
        return None, f"unreadable: {type(e).__name__}: {e}"


def _check_and_decode(pf: pq.ParquetFile, kind: str, key_now: Callable[[dict], object], changed: str,
                      decode: Callable[[pq.ParquetFile, dict], T]) -> tuple[T | None, str]:
    meta = pf.schema_arrow.metadata or {}
    if meta.get(_META_VERSION) != str(FORMAT_VERSION).encode():
        return None, f"format {meta.get(_META_VERSION)!r}, want {FORMAT_VERSION}"
    got_kind = meta.get(_META_KIND, _FOLDER.encode()).decode()  # indexes without a kind: ImageFolder's
    if got_kind != kind:
        return None, f"an index of kind {got_kind!r}, want {kind!r}"
    try:
        now = key_now(meta)
    except FileNotFoundError as e:
        return None, f"{e.filename or 'indexed data'} is gone"
    if json.loads(meta[_META_KEY]) != now:
        return None, changed
    return decode(pf, meta), ""


def _load_valid(where: _Where, read: Callable[[str], tuple[T | None, str]]) -> tuple[T | None, str]:
    reasons = []
    for path in where.paths:
        got, why = read(path)
        if got is not None:
            return got, ""
        if why:
            reasons.append(f"{path}: {why}")
    return None, "; ".join(reasons)


def _table(columns: dict, fields: list[tuple[str, pa.DataType]], kind: str, key: object,
           extra: dict[bytes, bytes] | None = None) -> pa.Table:
    meta = {_META_VERSION: str(FORMAT_VERSION).encode(), _META_KIND: kind.encode(),
            _META_KEY: json.dumps(key).encode(), **(extra or {})}
    return pa.table(columns, schema=pa.schema(fields, metadata=meta))


def _write_atomic(table: pa.Table, path: str) -> None:
    """Temp file in the same directory, then rename: readers on any node see no index or a whole one."""
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the index next to shared data serves other users too
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _save(table: pa.Table, where: _Where) -> str | None:
    """Write next to the data, else node-locally; the path written, or None when neither is writable."""
    for path in where.paths:
        try:
            _write_atomic(table, path)
            return path
        except OSError:  # read-only mount, permissions, full disk: try the next place
            continue
    return None


def _racy(mtimes: Iterable[int], started_ns: int) -> bool:
    return max(mtimes, default=0) > started_ns - RACY_NS


@dataclass(frozen=True)
class _Built:
    """What a builder hands to ``_get``: the value, its index table, the key's mtimes (for the race
    check) and the log line's count."""

    value: object
    table: pa.Table
    mtimes: tuple[int, ...]
    count: str


def _build(where: _Where, what: str, make: Callable[[], _Built], why: str):
    t0, started_ns = time.perf_counter(), time.time_ns()
    built = make()
    if _racy(built.mtimes, started_ns):
        saved = "not saved: the indexed data changed in the last seconds"
    else:
        saved = _save(built.table, where) or "not saved: no writable place"
    stale = f" (rebuilt: {why})" if why else ""
    log.info(f"[e2kd] indexed {built.count} of {what} in {time.perf_counter() - t0:.1f} s -> {saved}{stale}")
    return built.value


@contextlib.contextmanager
def _build_lock(where: _Where) -> Iterator[None]:
    """The workers of one node build once; without a writable local cache each builds for itself."""
    lock = node_lock(where.local + ".lock")
    try:
        lock.__enter__()
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def _get(where: _Where, what: str, read: Callable[[str], tuple[T | None, str]], make: Callable[[], _Built]) -> T:
    """The value from a valid index at ``where``, else built by ``make`` (once per node) and saved."""
    got, why = _load_valid(where, read)
    if got is not None:
        return got
    with _build_lock(where):
        got, _ = _load_valid(where, read)  # another worker of this node built it while we waited
        return got if got is not None else _build(where, what, make, why)


# ------------------------------------ ImageFolder --------------------------------------------


@dataclass(frozen=True)
class Listing:
    """One folder's own listing: its sorted class directories, their files, and the validity key."""

    classes: tuple[str, ...]
    paths: tuple[str, ...]
    labels: np.ndarray
    mtimes: dict[str, int]  # "." = the folder itself, then one entry per class directory


def scan(folder: str) -> Listing:
    """The directory walk the index replaces. Each mtime is taken before its directory is read, so a
    file added during the scan leaves the key older than the directory: the next reader rebuilds."""
    mtimes = {".": os.stat(folder).st_mtime_ns}
    classes = tuple(sorted(e.name for e in os.scandir(folder) if e.is_dir()))
    paths: list[str] = []
    labels: list[int] = []
    base = os.path.basename(folder)
    for c, name in enumerate(classes):
        d = os.path.join(folder, name)
        mtimes[name] = os.stat(d).st_mtime_ns
        files = sorted(e.name for e in os.scandir(d) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
        paths += [os.path.join(base, name, f) for f in files]
        labels += [c] * len(files)
    return Listing(classes, tuple(paths), np.asarray(labels, dtype=np.int64), mtimes)


def current_mtimes(folder: str, classes: tuple[str, ...]) -> dict[str, int]:
    """The validity key as it is now; raises OSError when a class directory is gone."""
    return {".": os.stat(folder).st_mtime_ns, **{c: os.stat(os.path.join(folder, c)).st_mtime_ns for c in classes}}


def shared_path(folder: str) -> str:
    """Next to the data: ``<root>/.e2kd-index/<folder name>.parquet``."""
    head, name = os.path.split(folder)
    return _shared_at(head, name)


def local_path(folder: str) -> str:
    """The node-local fallback, keyed by the folder's absolute path."""
    return _local_at(folder)


def _read(path: str, folder: str) -> tuple[Listing | None, str]:
    """(listing, "") when ``path`` is a valid index of ``folder``, else (None, why not)."""

    def key_now(meta: dict) -> dict[str, int]:
        return current_mtimes(folder, tuple(json.loads(meta[_META_CLASSES])))

    def decode(pf: pq.ParquetFile, meta: dict) -> Listing:
        table = pf.read(columns=["path", "label"])
        labels = np.array(table.column("label").to_numpy(), dtype=np.int64)  # writable, as a scan gives
        return Listing(tuple(json.loads(meta[_META_CLASSES])), tuple(table.column("path").to_pylist()), labels,
                       json.loads(meta[_META_KEY]))

    return _read_index(path, _FOLDER, key_now, "folder changed", decode)


def _folder_table(listing: Listing) -> pa.Table:
    return _table({"path": list(listing.paths), "label": listing.labels},
                  [("path", pa.string()), ("label", pa.int64())], _FOLDER, listing.mtimes, {_META_CLASSES: json.dumps(list(listing.classes)).encode()})


def folder_listing(folder: str) -> Listing:
    """The listing of ``folder`` (absolute) from a valid index, built and saved when there is none."""

    def make() -> _Built:
        listing = scan(folder)
        return _Built(listing, _folder_table(listing), tuple(listing.mtimes.values()), f"{len(listing.paths):,} files")

    return _get(_Where(shared_path(folder), local_path(folder)), folder, lambda p: _read(p, folder), make)


# ------------------------------------ PASCAL VOC ---------------------------------------------

VOCAnnotations = list[tuple[np.ndarray, np.ndarray]]  # per image: (boxes float32 [N,4], class ids int64 [N])


def voc_list_file(root: str, split: str) -> str:
    return os.path.join(root, "ImageSets", "Main", f"{split}.txt")


def voc_key(root: str, split: str) -> dict[str, object]:
    """The VOC validity key as it is now (see the module docstring for what it does not see);
    raises FileNotFoundError when the list file or the Annotations directory is gone."""
    lst = os.stat(voc_list_file(root, split))
    annotations = os.stat(os.path.join(root, "Annotations"))
    return {"list": [lst.st_mtime_ns, lst.st_size], "Annotations": annotations.st_mtime_ns}


def voc_shared_path(root: str, split: str) -> str:
    """Next to the data: ``<root>/.e2kd-index/voc-<split>.parquet``."""
    return _shared_at(root, f"voc-{split}")


def voc_local_path(root: str, split: str) -> str:
    return _local_at(f"voc:{root}:{split}")


def _split_rows(col: pa.ChunkedArray, dtype, width: int) -> list[np.ndarray]:
    """A list<...> column back to one writable array per row ([n, width] when width > 1)."""
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if len(arr) == 0:
        return []
    offsets = arr.offsets.to_numpy()
    flat = np.array(arr.flatten().to_numpy(zero_copy_only=False), dtype=dtype)  # one writable copy
    rows = np.split(flat, offsets[1:-1] - offsets[0])  # views of it, C-contiguous
    return [r.reshape(-1, width) for r in rows] if width > 1 else rows


def _read_voc(path: str, root: str, split: str) -> tuple[tuple[tuple[str, ...], VOCAnnotations] | None, str]:
    def decode(pf: pq.ParquetFile, meta: dict):
        # a small file (~0.25 MB for VOC2012 trainval): starting arrow's thread pool would cost more
        table = pf.read(columns=["name", "boxes", "classes"], use_threads=False)
        names = tuple(table.column("name").to_pylist())
        boxes = _split_rows(table.column("boxes"), np.float32, 4)
        classes = _split_rows(table.column("classes"), np.int64, 1)
        if not (len(names) == len(boxes) == len(classes)) or any(len(b) != len(c) for b, c in zip(boxes, classes)):
            raise ValueError("rows of unequal length")
        return names, list(zip(boxes, classes))

    return _read_index(path, _VOC, lambda meta: voc_key(root, split), "list file or Annotations changed", decode)


def _list_column(rows: list[np.ndarray], dtype, typ: pa.DataType) -> pa.ListArray:
    """One list<typ> row per array (flattened), built from offsets + values, not row by row."""
    lengths = np.fromiter((r.size for r in rows), np.int64, len(rows))
    offsets = np.zeros(len(rows) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate([r.reshape(-1) for r in rows]).astype(dtype, copy=False) if rows else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, typ))


def _voc_table(names: tuple[str, ...], anns: VOCAnnotations, key: dict) -> pa.Table:
    boxes = _list_column([b for b, _ in anns], np.float32, pa.float32())
    classes = _list_column([c for _, c in anns], np.int64, pa.int64())
    return _table({"name": pa.array(list(names), pa.string()), "boxes": boxes, "classes": classes},
                  [("name", pa.string()), ("boxes", pa.list_(pa.float32())), ("classes", pa.list_(pa.int64()))],
                  _VOC, key)


def voc_split_listing(root: str, split: str, parse: Callable[[str, str], tuple[tuple[str, ...], VOCAnnotations]]
                      ) -> tuple[tuple[str, ...], VOCAnnotations]:
    """(names, annotations) of one VOC split (``root`` absolute) from a valid index, else from
    ``parse(root, split)`` (reads the list file and every XML), saved for the next process."""

    def make() -> _Built:
        key = voc_key(root, split)  # before parsing: a change while parsing leaves the key stale
        names, anns = parse(root, split)
        return _Built((names, anns), _voc_table(names, anns, key), (key["list"][0], key["Annotations"]),
                      f"{len(names):,} annotations")

    return _get(_Where(voc_shared_path(root, split), voc_local_path(root, split)), f"VOC {root} split {split!r}",
                lambda p: _read_voc(p, root, split), make)


__all__ = ["FORMAT_VERSION", "INDEX_DIR", "Listing", "VOCAnnotations", "current_mtimes", "disabled", "folder_listing",
           "local_path", "scan", "shared_path", "voc_key", "voc_list_file", "voc_local_path", "voc_shared_path",
           "voc_split_listing"]
