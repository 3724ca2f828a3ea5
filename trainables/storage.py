"""Files on a local disk or in an object store (``s3://``, ``gs://``, any pyarrow URI), one API.

Teachers and teacher caches live wherever the spec says: a local or shared-filesystem path, or a
bucket. Everything that reads or writes them goes through here, so a path is handled the same way
in the CLI, in the Ray Data job and in the Ray Train workers.

Endpoint and credentials come only from the environment the ecosystem reads (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...): :func:`filesystem` builds every store filesystem with
``pyarrow.fs.FileSystem.from_uri``, which honours them; a bare ``S3FileSystem()`` does not.
Nothing here prints or stores a credential.

Atomicity: a local file is written to a temp file and renamed over the target; an object store
has no rename, but one PUT (or one completed multipart upload) is atomic per object. Callers that
write several objects write the data first and the object that makes them valid (a manifest, a
model card) last, so a reader sees either nothing valid or everything.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Mapping

import pyarrow.fs as pafs

_CHUNK = 1 << 20


def is_uri(path: str | os.PathLike) -> bool:
    """True for a store URI (``s3://bucket/x``); False for a local path (``file://`` counts as local)."""
    p = os.fspath(path)
    return "://" in p and not p.startswith("file://")


def normalize(path: str | os.PathLike) -> str:
    """Local paths absolute (Ray workers do not share the driver's working dir); URIs unchanged
    except for a trailing slash, so joins never produce ``//``."""
    p = os.fspath(path)
    if p.startswith("file://"):
        p = p[len("file://"):]
    return p.rstrip("/") if is_uri(p) else os.path.abspath(p)


def join(base: str | os.PathLike, *parts: str) -> str:
    b = normalize(base)
    if is_uri(b):
        return "/".join([b, *(q.strip("/") for q in parts)])
    return os.path.join(b, *parts)


def parent_and_name(path: str | os.PathLike) -> tuple[str, str]:
    p = normalize(path)
    if is_uri(p):
        head, _, name = p.rpartition("/")
        return head, name
    return os.path.split(p)


def filesystem(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it). Store filesystems come from ``FileSystem.from_uri`` only."""
    p = normalize(path)
    if is_uri(p):
        return pafs.FileSystem.from_uri(p)
    return pafs.LocalFileSystem(), p


def _info(path: str) -> pafs.FileInfo:
    fs, p = filesystem(path)
    return fs.get_file_info(p)


def is_file(path: str | os.PathLike) -> bool:
    return _info(os.fspath(path)).type == pafs.FileType.File


def exists(path: str | os.PathLike) -> bool:
    """A file, a directory, or (on a store) a prefix holding at least one object."""
    return _info(os.fspath(path)).type != pafs.FileType.NotFound


def file_size(path: str | os.PathLike) -> int:
    info = _info(os.fspath(path))
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{os.fspath(path)} does not exist")
    return int(info.size)


def file_sizes(prefix: str | os.PathLike, suffix: str = "") -> dict[str, int]:
    """{path relative to ``prefix``: size} of every file under it (recursive) ending in ``suffix``;
    one listing (on a store: LIST requests, no reads)."""
    fs, p = filesystem(prefix)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True, allow_not_found=True))
    return {i.path[len(p):].lstrip("/"): int(i.size) for i in infos
            if i.type == pafs.FileType.File and i.path.endswith(suffix)}


def list_files(prefix: str | os.PathLike, suffix: str = "") -> list[str]:
    """Every file under ``prefix`` (recursive) ending in ``suffix``, as full paths/URIs, sorted."""
    return [join(prefix, r) for r in sorted(file_sizes(prefix, suffix))]


def list_dirs(prefix: str | os.PathLike) -> list[str]:
    """Names of the direct subdirectories (store: common prefixes) of ``prefix``."""
    fs, p = filesystem(prefix)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def read_bytes(path: str | os.PathLike) -> bytes:
    fs, p = filesystem(path)
    try:
        with fs.open_input_stream(p) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{os.fspath(path)} does not exist") from None


def sha256(path: str | os.PathLike) -> tuple[str, int]:
    """(sha256 hex, size) of a file, streamed: constant memory whatever its size."""
    fs, p = filesystem(path)
    h, n = hashlib.sha256(), 0
    with fs.open_input_stream(p) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomic: locally temp file + fsync + rename; on a store one object upload."""
    p = normalize(path)
    if not is_uri(p):
        from trainables.checkpoint import atomic_write_bytes

        os.makedirs(os.path.dirname(p), exist_ok=True)
        atomic_write_bytes(p, data)
        return
    fs, fp = filesystem(p)
    with fs.open_output_stream(fp) as f:
        f.write(data)


def upload(local_file: str, path: str | os.PathLike) -> None:
    """Copy a local file to ``path`` (atomic as :func:`write_bytes`), streamed."""
    p = normalize(path)
    if not is_uri(p):
        os.makedirs(os.path.dirname(p), exist_ok=True)
        tmp = f"{p}.{uuid.uuid4().hex[:8]}.tmp"
        shutil.copyfile(local_file, tmp)
        os.replace(tmp, p)
        return
    fs, fp = filesystem(p)
    with open(local_file, "rb") as src, fs.open_output_stream(fp) as dst:
        while chunk := src.read(_CHUNK):
            dst.write(chunk)


def download(path: str | os.PathLike, local_file: str) -> str:
    """Stream ``path`` into ``local_file``; returns its sha256 (computed on the way, no re-read)."""
    fs, p = filesystem(path)
    h = hashlib.sha256()
    with fs.open_input_stream(p) as src, open(local_file, "wb") as dst:
        while chunk := src.read(_CHUNK):
            h.update(chunk)
            dst.write(chunk)
    return h.hexdigest()


def delete_dir(path: str | os.PathLike) -> None:
    """Remove a directory / every object under a prefix; missing is fine (best-effort cleanup)."""
    p = normalize(path)
    if not is_uri(p):
        shutil.rmtree(p, ignore_errors=True)
        return
    fs, fp = filesystem(p)
    try:
        fs.delete_dir(fp)
    except (FileNotFoundError, OSError):
        pass


# ------------------------------------ node-local copies --------------------------------------


def local_root() -> str:
    """Where a node keeps downloaded teachers and decoded caches: ``E2KD_LOCAL_CACHE``, else
    ``~/.cache/e2kd`` (a disk, not /tmp, which is RAM-backed on some images)."""
    return os.path.abspath(os.environ.get("E2KD_LOCAL_CACHE") or
                           os.path.join(os.path.expanduser("~"), ".cache", "e2kd"))


class node_lock:
    """An exclusive lock shared by every process on this node (``fcntl.flock`` on a file), so the
    workers of one node download or decode a thing once instead of once each."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> node_lock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._f = open(self.path, "a")
        fcntl.flock(self._f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._f, fcntl.LOCK_UN)
        self._f.close()


def local_copy(src_dir: str, key: str, files: Mapping[str, str | None], kind: str = "files") -> str:
    """A local directory holding ``files`` (name -> expected sha256, or None) of ``src_dir``.

    A local ``src_dir`` is returned as is. A store directory is downloaded once per node into
    ``<local_root>/<kind>/<key>`` — ``key`` must be a content hash (a teacher's weights sha256), so
    a copy is never stale: new content, new key. Each file's sha256 is checked while it
    downloads (a mismatch names the store file); the directory is renamed into place complete.
    """
    if not is_uri(src_dir):
        return normalize(src_dir)
    dest = os.path.join(local_root(), kind, key)
    done = os.path.join(dest, ".complete")
    if os.path.isfile(done):
        return dest
    with node_lock(dest + ".lock"):
        if os.path.isfile(done):  # another process on this node finished it while we waited
            return dest
        tmp = tempfile.mkdtemp(dir=os.path.dirname(dest), prefix=f".{key}.tmp-")
        try:
            for name, want in files.items():
                got = download(join(src_dir, name), os.path.join(tmp, name))
                if want is not None and got != want:
                    raise ValueError(f"{join(src_dir, name)} fails its checksum: sha256 {got}, expected {want} "
                                     "(object modified or corrupt)")
            open(os.path.join(tmp, ".complete"), "w").close()
            shutil.rmtree(dest, ignore_errors=True)  # an incomplete leftover of a killed process
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def prune_local(kind: str, keep: int, protect: Iterable[str] = ()) -> None:
    """Remove all but the ``keep`` most recently used entries of ``<local_root>/<kind>`` (by
    mtime of their directory). Removing one that a process still has memory-mapped is safe on
    POSIX: the data stays until the last mapping closes."""
    root = os.path.join(local_root(), kind)
    if not os.path.isdir(root):
        return
    entries = [e for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".") and e.name not in protect]
    entries.sort(key=lambda e: e.stat().st_mtime, reverse=True)
    for e in entries[keep:]:
        shutil.rmtree(e.path, ignore_errors=True)
        try:
            os.unlink(e.path + ".lock")
        except OSError:
            pass


__all__ = ["delete_dir", "download", "exists", "file_size", "file_sizes", "filesystem", "is_file", "is_uri", "join",
           "list_dirs", "list_files", "local_copy", "local_root", "node_lock", "normalize", "parent_and_name",
           "prune_local", "read_bytes", "sha256", "upload", "write_bytes"]
