"""Frozen teacher outputs ("approximate explanations", paper Table 3 ❄) as sharded Parquet.

Layout of a cache directory, local or on an object store (``s3://bucket/caches/x``)::

    <cache>/manifest.json          what made it + per-shard file, rows, bytes, sha256
    <cache>/shard-00000.parquet    columns: index int64, logits fixed_size_list<float32>[C],
    <cache>/parts-<build>/*.parquet         map_scale float32, map fixed_size_binary (float16)

Shards are listed by the manifest (paths relative to the cache). A cache is complete exactly when
its manifest exists, and the manifest is always written last: locally the whole directory is
written under a temporary name and renamed into place; on a store (no rename) the shards go under
``parts-<build>/`` in the final prefix and the manifest PUT (atomic per object) publishes them.

``map`` holds the teacher explanation for its top-1 class, computed on the *full image* resized
to image_size x image_size (``transforms.full_view``; manifest ``map_view``), at the explainer's
native resolution (GradCAM: the last feature map, e.g. 8x8 / 7x7), or area-downsampled to
``max_map_side`` when that is set and the native map is larger (B-cos W(x) is input-sized:
6x224x224, or 6x56x56 with ``max_map_side=56``). Values are
stored as float16 of ``map / map_scale`` with ``map_scale = max|map|`` per row (float32), so tiny
gradients keep full float16 relative precision. Logits are float32 and round-trip exactly.

:class:`CachedTeacherDataset` serves the cache during training: the stored map, which covers the
whole image, is resized to the full image's H x W (bilinear, align_corners=False: what
``explain(resize=True)`` does), then the full image, the map and the boxes go through the *same*
training crop box/flip (one ``View`` in full-image pixels, applied by the same torchvision v2
kernels) that live training cuts from the same full image. Format version 2: version 1 stored maps
of the centre-cropped view, from which a full-image crop box cannot be cut; it is refused.

Reading (:func:`open_cache`) decodes the shards once per node into uncompressed, id-sorted ``.npy``
files under :func:`trainables.storage.local_root` (keyed by the manifest's sha256) and memory-maps
them: every Ray Train worker of a node shares one page-cached copy and pages in only the rows it
touches, instead of each holding the whole cache in its own memory.

pyarrow + numpy + torch only; no Ray (the Ray Data job is orchestrator/cache_job.py).
"""
from __future__ import annotations

import datetime as _dt
import glob
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from trainables import storage
from trainables.data.base import SplitDataset, dataset_info, make_item, record_tensors, split_key, train_view
from trainables.data.config import DataConfig
from trainables.data.transforms import apply_view
from trainables.models import file_sha256

# 2: maps cover the full image resized to image_size x image_size (manifest "map_view"); 1 stored
# maps of the Resize + CenterCrop view, which the full-image training crops cannot be cut from.
FORMAT_VERSION = 2
# What the stored map covers (manifest "map_view"), checked when a cache is opened for training.
MAP_VIEW = "full image resized to image_size x image_size"
MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:05d}.parquet"
_TMP_MARK = ".tmp-"
_PARTS = "parts-"  # data prefix of one build on an object store (no rename to hide it until done)
_LOCAL_KIND = "caches"  # storage.local_root()/caches/<manifest sha256>: decoded, memory-mapped copies
_LOCAL_KEEP = 4  # decoded caches kept per node (least recently opened ones are removed)
# expect= aliases accepted by open_cache
_ALIASES = {"teacher_sha": "teacher_sha256", "dataset_fingerprint": "fingerprint", "data_fingerprint": "fingerprint"}


class CacheError(ValueError):
    """A cache that does not match what the caller expects, or is corrupt."""


# ------------------------------------ map resolution -----------------------------------------


def stored_map_shape(native_shape: tuple[int, ...], max_side: int | None) -> tuple[int, ...]:
    """Shape the cache stores for a per-sample map of ``native_shape`` ([h,w] or [C,h,w])."""
    *lead, h, w = native_shape
    if max_side is None or max(h, w) <= max_side:
        return tuple(native_shape)
    f = max(h, w) / max_side
    return (*lead, max(1, round(h / f)), max(1, round(w / f)))


def shrink_maps(maps: Tensor, max_side: int | None) -> Tensor:
    """[B,h,w] / [B,C,h,w] -> stored resolution: area averaging (exact box filter when the factor
    is an integer), unchanged when already small enough."""
    target = stored_map_shape(tuple(maps.shape[1:]), max_side)
    if tuple(maps.shape[1:]) == target:
        return maps
    squeeze = maps.dim() == 3
    m = maps.unsqueeze(1) if squeeze else maps
    m = F.interpolate(m.float(), size=target[-2:], mode="area")
    return m.squeeze(1) if squeeze else m


def expand_map(m: Tensor, size: tuple[int, int]) -> Tensor:
    """[h,w] / [C,h,w] -> size, bilinear, align_corners=False (as explain(resize=True))."""
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    x = m.view(1, -1, *m.shape[-2:])
    y = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)[0]
    return y if m.dim() == 3 else y[0]


def encode_maps(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float maps [B,...] -> (float16 of map/scale [B,...], scale [B] float32 = max|map|)."""
    maps = np.asarray(maps, dtype=np.float32)
    scale = np.abs(maps.reshape(len(maps), -1)).max(axis=1) if maps.size else np.zeros(len(maps), np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = (maps / safe.reshape(-1, *([1] * (maps.ndim - 1)))).astype(np.float16)
    return q, scale.astype(np.float32)


def roundtrip_maps(maps: Tensor, max_side: int | None) -> Tensor:
    """What training sees for live ``maps`` [B,...] at input resolution: shrink to the stored
    resolution, float16-encode, decode, upsample back (bilinear). For fidelity measurements."""
    small = shrink_maps(maps.float(), max_side)
    q, scale = encode_maps(small.cpu().numpy())
    dec = torch.from_numpy(q.astype(np.float32)) * torch.from_numpy(scale).view(-1, *([1] * (q.ndim - 1)))
    return torch.stack([expand_map(m, tuple(maps.shape[-2:])) for m in dec])


def sha256_file(path: str) -> str:
    return file_sha256(path)


# ------------------------------------ writer -------------------------------------------------


def rows_table(index, logits, maps, num_classes: int, map_shape: tuple[int, ...]) -> pa.Table:
    """Rows in the cache's column format: ``index`` [B], ``logits`` [B,C], ``maps`` [B,*map_shape]
    (float; stored per-row scaled float16). Shared by :class:`CacheWriter` and the Ray Data job,
    whose actors return it so the shards they write are already in the final format."""
    index = np.asarray(index, dtype=np.int64).reshape(-1)
    logits = np.asarray(logits.detach().cpu() if isinstance(logits, Tensor) else logits, dtype=np.float32)
    maps = np.asarray(maps.detach().cpu() if isinstance(maps, Tensor) else maps, dtype=np.float32)
    b = len(index)
    if logits.shape != (b, num_classes):
        raise ValueError(f"logits shape {logits.shape}, expected {(b, num_classes)}")
    if maps.shape != (b, *map_shape):
        raise ValueError(f"maps shape {maps.shape}, expected {(b, *map_shape)}")
    q, scale = encode_maps(maps)
    return pa.table({
        "index": pa.array(index, pa.int64()),
        "logits": pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1), pa.float32()), num_classes),
        "map_scale": pa.array(scale, pa.float32()),
        "map": pa.Array.from_buffers(pa.binary(int(np.prod(map_shape)) * 2), b,
                                     [None, pa.py_buffer(np.ascontiguousarray(q).tobytes())]),
    })


class CacheTarget:
    """Where one build of a cache goes, and how it is published.

    Local: a temporary sibling directory ``.<name>.tmp-<build>`` (``root``), renamed into place by
    :meth:`publish`; a killed process leaves it behind under a name :func:`open_cache` never opens.
    Store: the final prefix itself (``root`` = the cache URI), data under ``parts-<build>/``; the
    manifest, written last by :meth:`publish`, is what makes it a cache. An overwrite writes the new
    parts beside the old ones, swaps the manifest (one PUT) and only then deletes the parts the
    old manifest listed, so a reader sees the old or the new cache, never a mix.
    """

    def __init__(self, out_dir: str | os.PathLike, overwrite: bool = False):
        self.out_dir = storage.normalize(out_dir)
        self.remote = storage.is_uri(self.out_dir)
        self.overwrite = overwrite
        self.build = uuid.uuid4().hex[:12]
        self.parts = f"{_PARTS}{self.build}"
        if self.remote:
            if storage.is_file(storage.join(self.out_dir, MANIFEST)) and not overwrite:
                raise FileExistsError(f"teacher cache {self.out_dir} already exists (pass overwrite=True to replace it)")
            self.root = self.out_dir
        else:
            if os.path.exists(self.out_dir) and not overwrite:
                raise FileExistsError(f"teacher cache {self.out_dir} already exists (pass overwrite=True to replace it)")
            parent, name = os.path.split(self.out_dir)
            os.makedirs(parent, exist_ok=True)
            self.root = os.path.join(parent, f".{name}{_TMP_MARK}{self.build}")
            os.makedirs(self.root)

    def path(self, rel: str) -> str:
        return storage.join(self.root, rel)

    def publish(self, manifest: dict) -> None:
        data = json.dumps(manifest, indent=2, sort_keys=True).encode()
        if not self.remote:
            storage.write_bytes(os.path.join(self.root, MANIFEST), data)
            self._rename_into_place()
            return
        old_parts: set[str] = set()
        try:
            old = json.loads(storage.read_bytes(storage.join(self.out_dir, MANIFEST)))
            if not self.overwrite:
                raise FileExistsError(f"teacher cache {self.out_dir} appeared while writing")
            old_parts = {s["file"].split("/")[0] for s in old.get("shards", []) if "/" in s["file"]}
        except FileNotFoundError:
            pass
        storage.write_bytes(storage.join(self.out_dir, MANIFEST), data)  # last: publishes the parts
        for d in sorted(old_parts - {self.parts}):
            storage.delete_dir(storage.join(self.out_dir, d))

    def _rename_into_place(self) -> None:
        if os.path.exists(self.out_dir):
            if not self.overwrite:
                raise FileExistsError(f"teacher cache {self.out_dir} appeared while writing")
            parent, name = os.path.split(self.out_dir)
            old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:12]}")
            os.rename(self.out_dir, old)
            os.rename(self.root, self.out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.root, self.out_dir)

    def abort(self) -> None:
        storage.delete_dir(storage.join(self.root, self.parts) if self.remote else self.root)


def build_manifest(meta: Mapping, shards: list[dict], num_rows: int, num_classes: int,
                   map_shape: tuple[int, ...]) -> dict:
    total = sum(s["bytes"] for s in shards)
    return {
        **meta,
        "format_version": FORMAT_VERSION,
        "map_view": MAP_VIEW,
        "num_rows": int(num_rows),
        "num_classes": int(num_classes),
        "map_shape": [int(x) for x in map_shape],
        "map_dtype": "float16",
        "map_scaling": "per-row max|map| (column map_scale, float32)",
        "logits_dtype": "float32",
        "shards": shards,
        "bytes_total": int(total),
        "bytes_per_row": total / max(num_rows, 1),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def check_rows(ids: np.ndarray, where: str, expect_rows: int | None = None, expect_ids=None) -> None:
    """Every row exactly once: no duplicate sample id, the expected count, and (when given) exactly
    the expected ids."""
    uniq = np.unique(ids)
    if len(uniq) != len(ids):
        raise CacheError(f"{len(ids) - len(uniq)} duplicate sample ids written to {where}")
    if expect_rows is not None and len(ids) != expect_rows:
        raise CacheError(f"cache {where}: {len(ids)} rows written, expected {expect_rows}")
    if expect_ids is not None:
        want = np.unique(np.asarray(expect_ids, dtype=np.int64))
        if not np.array_equal(uniq, want):
            miss, extra = np.setdiff1d(want, uniq), np.setdiff1d(uniq, want)
            raise CacheError(f"cache {where}: sample ids differ from the split: {len(miss)} missing "
                             f"(e.g. {miss[:5].tolist()}), {len(extra)} unexpected (e.g. {extra[:5].tolist()})")


class CacheWriter:
    """Accumulate rows, write Parquet shards, and on :meth:`close` check every row is there
    exactly once and publish (write the manifest last; locally rename the temporary directory to
    ``out_dir``). ``out_dir`` is a local path or a store URI (see :class:`CacheTarget`). On error
    (or :meth:`abort`) the partial build is removed; if the process dies it stays behind where
    :func:`open_cache` never opens it.

    ``meta``: what made the cache (teacher_sha256, explainer, fingerprint, encoding, transform,
    ...); it goes into the manifest and is what ``open_cache(expect=...)`` checks.
    """

    def __init__(self, out_dir: str | os.PathLike, meta: Mapping, num_classes: int, map_shape: tuple[int, ...],
                 rows_per_shard: int = 8192, expect_rows: int | None = None, overwrite: bool = False,
                 compression: str = "zstd"):
        self.target = CacheTarget(out_dir, overwrite)
        self.out_dir, self.tmp_dir = self.target.out_dir, self.target.root
        # A store shard is written to local disk first, hashed, then uploaded (one object each).
        self._stage = tempfile.mkdtemp(prefix="e2kd-shard-") if self.target.remote else None
        self.meta, self.num_classes, self.map_shape = dict(meta), int(num_classes), tuple(int(s) for s in map_shape)
        self.rows_per_shard, self.expect_rows, self.overwrite = rows_per_shard, expect_rows, overwrite
        self.compression = compression
        self._buf: list[pa.Table] = []
        self._buffered = 0
        self._shards: list[dict] = []
        self._ids: list[np.ndarray] = []
        self._closed = False

    def add(self, index, logits, maps) -> None:
        """Rows: ``index`` [B] sample ids, ``logits`` [B,C], ``maps`` [B,*map_shape] (float)."""
        table = rows_table(index, logits, maps, self.num_classes, self.map_shape)
        self._buf.append(table)
        self._buffered += table.num_rows
        while self._buffered >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, n: int) -> None:
        if not self._buf:
            return
        rows = pa.concat_tables(self._buf).combine_chunks()
        take = min(n, rows.num_rows)
        table, rest = rows.slice(0, take), rows.slice(take)
        self._buf = [rest] if rest.num_rows else []
        self._buffered = rest.num_rows
        if self.target.remote:
            name = f"{self.target.parts}/{SHARD_PATTERN.format(len(self._shards))}"
            local = os.path.join(self._stage, SHARD_PATTERN.format(len(self._shards)))
        else:
            name = SHARD_PATTERN.format(len(self._shards))
            local = os.path.join(self.tmp_dir, name)
        pq.write_table(table, local, compression=self.compression, row_group_size=max(take, 1))
        self._shards.append({"file": name, "rows": take, "bytes": os.path.getsize(local), "sha256": sha256_file(local)})
        if self.target.remote:
            storage.upload(local, self.target.path(name))
            os.unlink(local)
        self._ids.append(table.column("index").to_numpy())

    def close(self) -> dict:
        """Flush, check every row is there exactly once, write the manifest, publish."""
        if self._closed:
            raise RuntimeError("CacheWriter already closed")
        try:
            while self._buffered:
                self._flush(self.rows_per_shard)
            ids = np.concatenate(self._ids) if self._ids else np.zeros(0, np.int64)
            check_rows(ids, self.out_dir, self.expect_rows)
            manifest = build_manifest(self.meta, self._shards, len(ids), self.num_classes, self.map_shape)
            self.target.publish(manifest)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._drop_stage()
        return manifest

    def abort(self) -> None:
        self._closed = True
        self.target.abort()
        self._drop_stage()

    def _drop_stage(self) -> None:
        if self._stage:
            shutil.rmtree(self._stage, ignore_errors=True)

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


# ------------------------------------ reader -------------------------------------------------


class TeacherCache:
    """An opened, verified cache: ids sorted (in memory, 8 bytes/row); logits float32, scales and
    float16 maps memory-mapped from this node's decoded copy (``local_dir``), so a process holds
    only the pages of the rows it reads and processes of one node share them."""

    def __init__(self, path: str, manifest: dict, local_dir: str):
        self.path, self.manifest, self.local_dir = path, manifest, local_dir
        self.ids = np.load(os.path.join(local_dir, "ids.npy"))
        self.logits = np.load(os.path.join(local_dir, "logits.npy"), mmap_mode="r")
        self.scale = np.load(os.path.join(local_dir, "scale.npy"), mmap_mode="r")
        self.maps = np.load(os.path.join(local_dir, "maps.npy"), mmap_mode="r")
        self.map_shape = tuple(manifest["map_shape"])

    def __reduce__(self):
        # Pickled (spawned DataLoader workers, Ray): reopen the mapping, never copy the arrays.
        return TeacherCache, (self.path, self.manifest, self.local_dir)

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, index: int) -> int:
        r = int(np.searchsorted(self.ids, index))
        if r >= len(self.ids) or self.ids[r] != index:
            raise KeyError(f"sample id {index} is not in teacher cache {self.path} "
                           f"({self.manifest.get('dataset')}/{self.manifest.get('split')}, {len(self)} rows)")
        return r

    def get(self, index: int) -> tuple[Tensor, Tensor]:
        """(logits float32 [C], map float32 [*map_shape] at the stored resolution) for sample id."""
        r = self.row(index)
        m = torch.from_numpy(np.asarray(self.maps[r], dtype=np.float32)) * float(self.scale[r])
        return torch.from_numpy(np.array(self.logits[r], dtype=np.float32)), m

    def missing(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        return ids[~np.isin(ids, self.ids)]


def _read_shard(path: str, name: str, info: dict, num_classes: int, map_shape: tuple[int, ...]):
    """Decode one local shard file; ``name`` (its place in the cache) is what errors name."""
    try:
        t = pq.read_table(path)
        ids = t.column("index").to_numpy()
        lg = t.column("logits").combine_chunks()
        logits = lg.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, num_classes)
        scale = t.column("map_scale").to_numpy().astype(np.float32)
        mp = t.column("map").combine_chunks()
        nbytes = int(np.prod(map_shape)) * 2
        raw = np.frombuffer(mp.buffers()[1], dtype=np.uint8)[mp.offset * nbytes:(mp.offset + len(mp)) * nbytes]
        maps = raw.view(np.float16).reshape(len(mp), *map_shape)
    except (pa.ArrowException, OSError, KeyError, ValueError) as e:
        raise CacheError(f"cache shard {name} is unreadable: {e}") from e
    if len(ids) != info["rows"]:
        raise CacheError(f"cache shard {name} holds {len(ids)} rows, the manifest says {info['rows']}")
    return ids, logits, scale, maps


def unfinished_caches(path: str | os.PathLike) -> list[str]:
    """What crashed writers of ``path`` left behind (never opened): local temporary directories;
    on a store, ``parts-*`` prefixes that the manifest (if any) does not list."""
    path = storage.normalize(path)
    if not storage.is_uri(path):
        parent, name = os.path.split(path)
        return sorted(glob.glob(os.path.join(parent, f".{glob.escape(name)}{_TMP_MARK}*")))
    listed: set[str] = set()
    try:
        listed = {s["file"].split("/")[0] for s in json.loads(storage.read_bytes(storage.join(path, MANIFEST)))["shards"]}
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        pass
    return [storage.join(path, d) for d in storage.list_dirs(path) if d.startswith(_PARTS) and d not in listed]


def _read_manifest(path: str) -> tuple[dict, bytes]:
    """(manifest, its raw bytes: their sha256 names this node's decoded copy)."""
    mpath = storage.join(path, MANIFEST)
    remote = storage.is_uri(path)
    if not (storage.exists(path) if remote else os.path.isdir(path)):
        left = unfinished_caches(path)
        hint = f" (found unfinished writes, ignored: {', '.join(left)})" if left else ""
        raise FileNotFoundError(f"teacher cache {path} does not exist{hint}")
    if not storage.is_file(mpath):
        left = unfinished_caches(path) if remote else []
        hint = f" (unfinished writes: {', '.join(left)})" if left else ""
        raise CacheError(f"{path} is not a complete teacher cache: {MANIFEST} is missing{hint}")
    try:
        raw = storage.read_bytes(mpath)
        manifest = json.loads(raw)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"cache manifest {mpath} is unreadable: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        have = manifest.get("format_version") if isinstance(manifest, dict) else None
        why = (" (version 1 stored maps of the centre-cropped view; training crops now come from the full "
               "image, so its maps cannot be cropped like the image)") if have == 1 else ""
        raise CacheError(f"cache {path} has format_version {have!r}, this code reads {FORMAT_VERSION}{why}; "
                         "rebuild it (e2kd cache SPEC --force)")
    return manifest, raw


def read_manifest(path: str | os.PathLike) -> dict:
    return _read_manifest(storage.normalize(path))[0]


def check_expect(path: str, manifest: dict, expect: Mapping | None) -> None:
    for key, want in (expect or {}).items():
        field = _ALIASES.get(key, key)
        if field not in manifest:
            raise CacheError(f"cache {path}: cannot check {key!r}, the manifest has no such field "
                             f"(fields: {', '.join(sorted(manifest))})")
        have = manifest[field]
        norm = (lambda v: list(v) if isinstance(v, tuple) else v)
        if norm(have) != norm(want):
            raise CacheError(f"cache {path} does not match: {field} is {have!r} in the cache, expected {want!r}")


def _fetch_shard(path: str, info: dict, into: str, verify: bool) -> str:
    """A local file holding the shard ``info`` of cache ``path`` (a store shard is downloaded into
    ``into``, hashed on the way); its sha256 checked against the manifest when ``verify``."""
    name = storage.join(path, info["file"])
    if storage.is_uri(path):
        local = os.path.join(into, f"shard-{uuid.uuid4().hex[:8]}.parquet")
        try:
            actual = storage.download(name, local)
        except FileNotFoundError:
            raise CacheError(f"cache shard {name} is missing") from None
    else:
        if not os.path.isfile(name):
            raise CacheError(f"cache shard {name} is missing")
        local, actual = name, (sha256_file(name) if verify else None)
    if verify and actual != info["sha256"]:
        raise CacheError(f"cache shard {name} is corrupt: sha256 {actual} != {info['sha256']} in the manifest")
    return local


def _decode(path: str, manifest: dict, dest: str, verify: bool) -> None:
    """Decode every shard of cache ``path`` into ``dest``: ids.npy (sorted), logits.npy, scale.npy,
    maps.npy in id order. Two passes over the shards (ids first, to place rows; then the rows,
    scattered into memory-mapped files), so peak memory is one shard, not the cache."""
    num_classes, map_shape = int(manifest["num_classes"]), tuple(int(x) for x in manifest["map_shape"])
    shards = manifest["shards"]
    files = [_fetch_shard(path, s, dest, verify) for s in shards]
    names = [storage.join(path, s["file"]) for s in shards]
    parts = []
    for f, name, s in zip(files, names, shards):
        try:
            parts.append(pq.read_table(f, columns=["index"]).column("index").to_numpy())
        except (pa.ArrowException, OSError, KeyError, ValueError) as e:
            raise CacheError(f"cache shard {name} is unreadable: {e}") from e
        if len(parts[-1]) != s["rows"]:
            raise CacheError(f"cache shard {name} holds {len(parts[-1])} rows, the manifest says {s['rows']}")
    ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if len(ids) != manifest["num_rows"]:
        raise CacheError(f"cache {path} holds {len(ids)} rows, the manifest says {manifest['num_rows']}")
    order = np.argsort(ids, kind="stable")
    place = np.empty(len(ids), np.int64)
    place[order] = np.arange(len(ids))
    np.save(os.path.join(dest, "ids.npy"), ids[order])
    n = len(ids)
    out = {k: np.lib.format.open_memmap(os.path.join(dest, f"{k}.npy"), mode="w+", dtype=dt, shape=shape)
           for k, dt, shape in (("logits", np.float32, (n, num_classes)), ("scale", np.float32, (n,)),
                                ("maps", np.float16, (n, *map_shape)))}
    off = 0
    for f, name, s in zip(files, names, shards):
        _, lg, sc, mp = _read_shard(f, name, s, num_classes, map_shape)
        rows = place[off:off + len(lg)]
        out["logits"][rows], out["scale"][rows], out["maps"][rows] = lg, sc, mp
        off += len(lg)
        if f.startswith(dest):  # a downloaded copy: no longer needed
            os.unlink(f)
    for a in out.values():
        a.flush()
    # Arrow's allocator keeps freed decode buffers for reuse; this process is about to train, so
    # hand them back rather than carry a shard's worth of dead memory.
    pa.default_memory_pool().release_unused()


def _check_present(path: str, manifest: dict) -> None:
    """Every shard the manifest lists exists with its recorded size: one listing, no reads, on
    every open (sha256 is checked when a node decodes the shards, see :func:`open_cache`)."""
    have = storage.file_sizes(path, ".parquet")
    for s in manifest["shards"]:
        name = storage.join(path, s["file"])
        if s["file"] not in have:
            raise CacheError(f"cache shard {name} is missing")
        if have[s["file"]] != s["bytes"]:
            raise CacheError(f"cache shard {name} is corrupt: {have[s['file']]} bytes, the manifest says {s['bytes']}")


def open_cache(path: str | os.PathLike, expect: Mapping | None = None, verify: bool = True) -> TeacherCache:
    """Open a finished cache (local path or store URI). ``expect`` maps manifest fields to required
    values (e.g. ``{"teacher_sha256": card.sha256, "explainer": "gradcam", "fingerprint":
    info.fingerprint}``; ``teacher_sha`` is accepted for ``teacher_sha256``); any difference raises
    :class:`CacheError` naming the field and both values. ``verify`` checks every shard's sha256
    when a node decodes it (a corrupt or truncated shard raises naming the file); every open checks
    that every shard exists with its recorded size (a missing or truncated one raises naming it).

    The first open on a node decodes the shards into ``storage.local_root()/caches/<sha256 of the
    path and the manifest>`` (the manifest lists every shard's sha256, so it names the content);
    later opens on that node, by any process, only map those files."""
    path = storage.normalize(path)
    manifest, raw = _read_manifest(path)
    check_expect(path, manifest, expect)
    _check_present(path, manifest)
    # The path is part of the key so that a damaged cache is reported as such even when an intact
    # copy of the same content, from elsewhere, was decoded on this node before.
    key = hashlib.sha256(path.encode() + b"\0" + raw).hexdigest()
    dest = os.path.join(storage.local_root(), _LOCAL_KIND, key)
    done = os.path.join(dest, ".complete")

    def ready() -> bool:  # a copy decoded without checksums does not serve a verifying open
        try:
            with open(done) as f:
                return json.load(f)["verified"] or not verify
        except (OSError, ValueError, KeyError):
            return False

    if not ready():
        with storage.node_lock(dest + ".lock"):
            if not ready():
                tmp = tempfile.mkdtemp(dir=os.path.dirname(dest), prefix=f".{key}{_TMP_MARK}")
                try:
                    _decode(path, manifest, tmp, verify)
                    with open(os.path.join(tmp, ".complete"), "w") as f:
                        json.dump({"verified": verify, "source": path}, f)
                    shutil.rmtree(dest, ignore_errors=True)
                    os.rename(tmp, dest)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
    os.utime(dest)  # "recently used" for prune_local
    storage.prune_local(_LOCAL_KIND, _LOCAL_KEEP, protect={key})
    return TeacherCache(path, manifest, dest)


# ------------------------------------ training-time dataset ----------------------------------


class CachedTeacherDataset(Dataset):
    """Training items with frozen teacher outputs.

    ``base`` is the distillation split built *without* augmentation (``train=False``), in the
    student's encoding; only its records (full images) are used. Items: ``image`` (the training
    view), ``label``, ``index`` (+ ``group``, ``boxes``), ``teacher_logits`` [C] float32,
    ``teacher_map`` ([S,S] or [6,S,S]: the stored full-image map resized to the full image and
    cropped/flipped exactly like the image) and ``view`` (int64 [top, left, height, width, flipped]
    in full-image pixels). ``cfg`` (default ``base.cfg``) supplies augment / crop_scale /
    crop_ratio / hflip. The geometry is :func:`trainables.data.base.train_view`, as in live
    training, and the same seed gives the same crop box.
    """

    def __init__(self, base: SplitDataset, cache: TeacherCache, cfg: DataConfig | None = None):
        if not isinstance(base, SplitDataset):
            raise TypeError(f"base must be a SplitDataset, got {type(base).__name__}")
        if base.train:
            raise ValueError("CachedTeacherDataset needs the un-augmented split (build_dataset(..., train=False)); "
                             "it applies the augmentation itself, to the image and the map together")
        self.base, self.cache, self.cfg = base, cache, cfg or base.cfg
        man = cache.manifest
        for field, have in (("dataset", base.cfg.name), ("split", base.split), ("map_view", MAP_VIEW)):
            if man.get(field, have) != have:
                raise CacheError(f"cache {cache.path} does not match: {field} is {man[field]!r} in the cache, "
                                 f"this code needs {have!r}")
        info = dataset_info(base.cfg)
        if base.split == info.train_split and "fingerprint" in man and man["fingerprint"] != info.fingerprint:
            raise CacheError(f"cache {cache.path} does not match: fingerprint is {man['fingerprint']!r} in the cache, "
                             f"the dataset has {info.fingerprint!r}")
        missing = cache.missing(base.ids)
        if len(missing):
            raise CacheError(f"cache {cache.path} lacks {len(missing)} of {len(base)} samples "
                             f"(e.g. ids {missing[:5].tolist()})")

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        pos, seed = split_key(key)
        rec = self.base.record(pos)
        logits, m = self.cache.get(rec.index)
        full_hw = tuple(rec.image.shape[-2:])
        chan = m.dim() == 3
        # The stored map covers the whole image (at image_size^2 or less): back to the full image's
        # pixels, so the crop box the image gets (full-image coordinates) is the map's crop box too.
        full = expand_map(m, full_hw)
        tmap = tv_tensors.Image(full if chan else full.unsqueeze(0))
        view = train_view(self.cfg, rec, seed)
        img, *box = record_tensors(rec)
        image, tmap, *rest = apply_view(view, self.cfg.image_size, img, tmap, *box)
        boxes = rest[0] if rest else None
        item = make_item(self.base, rec, self.base.encode(image), boxes)
        tmap = tmap.as_subclass(Tensor)
        item["teacher_logits"] = logits
        item["teacher_map"] = (tmap if chan else tmap[0]).contiguous()
        item["view"] = view.as_tensor()
        return item


__all__ = ["CacheError", "CacheTarget", "CacheWriter", "CachedTeacherDataset", "TeacherCache", "build_manifest",
           "check_expect", "check_rows", "encode_maps", "expand_map", "open_cache", "read_manifest", "roundtrip_maps",
           "rows_table", "shrink_maps", "stored_map_shape", "unfinished_caches", "FORMAT_VERSION", "MAP_VIEW"]
