"""A Parquet file index of one ImageFolder split, built once per dataset instead of a scan per trial.

Listing ``root/train/<class>/*`` means one ``os.scandir`` per class directory and a stat-free
walk over every entry: on ImageNet 1.28 M names, often over a network mount, in every Ray Train
worker of every trial. The index holds that listing — columns ``path`` (relative to the data root,
``train/<class>/<file>``) and ``label`` (int64, position in the folder's sorted class names),
rows sorted by class then file name — plus, in the Parquet schema metadata, the format version,
the class names and a validity key: the ``st_mtime_ns`` of the folder and of every class
directory. Adding, removing or renaming a file changes its directory's mtime, so checking the key
costs one stat per class (~1000 on ImageNet) instead of a 1.28 M-entry scan.

Where it lives: ``<root>/.e2kd-index/<folder name>.parquet`` next to the data when that directory
is writable (one build serves every node of a cluster over a shared mount), else in the node-local
cache ``<local_root()>/indexes/<sha256 of the folder's absolute path>.parquet`` (read-only data
mounts). Both are tried when reading, next to the data first. A stale index (any key mismatch, a
missing class directory, another format version) or an unreadable one is rebuilt with one log line
on the ``e2kd`` logger; a corrupt index never fails a trial. Writes are atomic (temp file in the
same directory, ``os.replace``), so concurrent builders on several nodes leave one whole index;
the workers of one node take a node lock and build once. An index is not saved while a directory
was modified in the last few seconds (an extraction still running, or a filesystem with coarse
mtimes where a file added in the same tick would not change the key); the next process retries.

``E2KD_NO_INDEX=1`` disables the index: every process scans the folder as before. Like
``E2KD_LOCAL_CACHE`` it is read from each process's environment, so on a cluster set it where the
Ray nodes start.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainables.storage import local_root, node_lock

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FORMAT_VERSION = 1
INDEX_DIR = ".e2kd-index"
# A directory modified this recently may still be changing within one mtime tick; see the docstring.
RACY_NS = 3_000_000_000
_META_VERSION, _META_CLASSES, _META_MTIMES = b"e2kd.index_version", b"e2kd.classes", b"e2kd.mtimes"

log = logging.getLogger("e2kd")


def disabled() -> bool:
    return os.environ.get("E2KD_NO_INDEX", "") not in ("", "0")


@dataclass(frozen=True)
class Listing:
    """One folder's own listing: its sorted class directories, their files, and the validity key."""

    classes: tuple[str, ...]
    paths: tuple[str, ...]
    labels: np.ndarray
    mtimes: dict[str, int]  # "." = the folder itself, then one entry per class directory


# ------------------------------------ scan ---------------------------------------------------


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


# ------------------------------------ where ---------------------------------------------------


def shared_path(folder: str) -> str:
    """Next to the data: ``<root>/.e2kd-index/<folder name>.parquet``."""
    head, name = os.path.split(folder)
    return os.path.join(head, INDEX_DIR, f"{name}.parquet")


def local_path(folder: str) -> str:
    """The node-local fallback, keyed by the folder's absolute path."""
    return os.path.join(local_root(), "indexes", f"{hashlib.sha256(folder.encode()).hexdigest()}.parquet")


# ------------------------------------ read ---------------------------------------------------


def _read(path: str, folder: str) -> tuple[Listing | None, str]:
    """(listing, "") when ``path`` is a valid index of ``folder``, else (None, why not)."""
    try:
        meta = pq.read_schema(path).metadata or {}
        if meta.get(_META_VERSION) != str(FORMAT_VERSION).encode():
            return None, f"format {meta.get(_META_VERSION)!r}, want {FORMAT_VERSION}"
        classes = tuple(json.loads(meta[_META_CLASSES]))
        mtimes = json.loads(meta[_META_MTIMES])
        try:
            if current_mtimes(folder, classes) != mtimes:
                return None, "folder changed"
        except FileNotFoundError:
            return None, "a class directory is gone"
        table = pq.read_table(path, columns=["path", "label"])
        paths = tuple(table.column("path").to_pylist())
        labels = np.array(table.column("label").to_numpy(), dtype=np.int64)  # writable, as a scan gives
    except FileNotFoundError:
        return None, ""
    except Exception as e:  # a corrupt or foreign file: rebuild it, never fail the trial over it
        return None, f"unreadable: {type(e).__name__}: {e}"
    return Listing(classes, paths, labels, mtimes), ""


def _load_valid(folder: str) -> tuple[Listing | None, str]:
    reasons = []
    for path in (shared_path(folder), local_path(folder)):
        got, why = _read(path, folder)
        if got is not None:
            return got, ""
        if why:
            reasons.append(f"{path}: {why}")
    return None, "; ".join(reasons)


# ------------------------------------ write --------------------------------------------------


def _table(listing: Listing) -> pa.Table:
    meta = {_META_VERSION: str(FORMAT_VERSION).encode(), _META_CLASSES: json.dumps(list(listing.classes)).encode(),
            _META_MTIMES: json.dumps(listing.mtimes).encode()}
    schema = pa.schema([("path", pa.string()), ("label", pa.int64())], metadata=meta)
    return pa.table({"path": list(listing.paths), "label": listing.labels}, schema=schema)


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


def _save(listing: Listing, folder: str) -> str | None:
    """Write next to the data, else node-locally; the path written, or None when neither is writable."""
    table = _table(listing)
    for path in (shared_path(folder), local_path(folder)):
        try:
            _write_atomic(table, path)
            return path
        except OSError:  # read-only mount, permissions, full disk: try the next place
            continue
    return None


def _racy(mtimes: dict[str, int], started_ns: int) -> bool:
    return max(mtimes.values()) > started_ns - RACY_NS


def _build(folder: str, why: str) -> Listing:
    t0, started_ns = time.perf_counter(), time.time_ns()
    listing = scan(folder)
    if _racy(listing.mtimes, started_ns):
        where = "not saved: a directory changed in the last seconds"
    else:
        where = _save(listing, folder) or "not saved: no writable place"
    stale = f" (rebuilt: {why})" if why else ""
    log.info(f"[e2kd] indexed {len(listing.paths):,} files of {folder} in {time.perf_counter() - t0:.1f} s"
             f" -> {where}{stale}")
    return listing


@contextlib.contextmanager
def _build_lock(folder: str) -> Iterator[None]:
    """The workers of one node build once; without a writable local cache each builds for itself."""
    lock = node_lock(local_path(folder) + ".lock")
    try:
        lock.__enter__()
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def folder_listing(folder: str) -> Listing:
    """The listing of ``folder`` (absolute) from a valid index, built and saved when there is none."""
    got, why = _load_valid(folder)
    if got is not None:
        return got
    with _build_lock(folder):
        got, _ = _load_valid(folder)  # another worker of this node built it while we waited
        return got if got is not None else _build(folder, why)


__all__ = ["FORMAT_VERSION", "INDEX_DIR", "Listing", "current_mtimes", "disabled", "folder_listing", "local_path",
           "scan", "shared_path"]
