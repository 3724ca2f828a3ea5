"""Frozen teacher outputs ("approximate explanations", paper Table 3 ❄) as sharded Parquet.

Layout of a cache directory (written under a temporary name, renamed into place when complete,
so a half-written cache is never opened)::

    <cache>/manifest.json          what made it + per-shard sha256 (see :func:`open_cache`)
    <cache>/shard-00000.parquet    columns: index int64, logits fixed_size_list<float32>[C],
    ...                                     map_scale float32, map fixed_size_binary (float16)

``map`` holds the teacher explanation for its top-1 class at the explainer's native resolution
(GradCAM: the last feature map, e.g. 8x8 / 7x7), or area-downsampled to ``max_map_side`` when the
native map is larger (B-cos W(x) is input-sized: 6x224x224 is stored as 6x56x56). Values are
stored as float16 of ``map / map_scale`` with ``map_scale = max|map|`` per row (float32), so tiny
gradients keep full float16 relative precision. Logits are float32 and round-trip exactly.

:class:`CachedTeacherDataset` serves the cache during training: the stored map is upsampled to the
un-augmented view (bilinear, align_corners=False: what ``explain(resize=True)`` does), then the
image and the map go through the *same* sampled crop/flip (one ``View``, applied by the same
torchvision v2 kernels), so the map matches the live teacher map of the un-augmented image after
that crop/flip.

pyarrow + numpy + torch only; no Ray (the Ray Data job is orchestrator/cache_job.py).
"""
from __future__ import annotations

import datetime as _dt
import glob
import json
import os
import shutil
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

from trainables.data.base import SplitDataset, dataset_info, make_item
from trainables.data.config import DataConfig
from trainables.data.transforms import apply_view, identity_view, sample_view
from trainables.models import file_sha256

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:05d}.parquet"
_TMP_MARK = ".tmp-"
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


class CacheWriter:
    """Accumulate rows, write Parquet shards into a temporary directory, and on :meth:`close`
    write the manifest and rename the directory to ``out_dir``. On error (or :meth:`abort`) the
    temporary directory is removed; if the process dies, it stays behind under a name
    (``.<name>.tmp-<uuid>``) that :func:`open_cache` never opens.

    ``meta``: what made the cache (teacher_sha256, explainer, fingerprint, encoding, transform,
    ...); it goes into the manifest and is what ``open_cache(expect=...)`` checks.
    """

    def __init__(self, out_dir: str | os.PathLike, meta: Mapping, num_classes: int, map_shape: tuple[int, ...],
                 rows_per_shard: int = 8192, expect_rows: int | None = None, overwrite: bool = False,
                 compression: str = "zstd"):
        self.out_dir = os.path.abspath(os.fspath(out_dir))
        if os.path.exists(self.out_dir) and not overwrite:
            raise FileExistsError(f"teacher cache {self.out_dir} already exists (pass overwrite=True to replace it)")
        parent, name = os.path.split(self.out_dir)
        os.makedirs(parent, exist_ok=True)
        self.tmp_dir = os.path.join(parent, f".{name}{_TMP_MARK}{uuid.uuid4().hex[:12]}")
        os.makedirs(self.tmp_dir)
        self.meta, self.num_classes, self.map_shape = dict(meta), int(num_classes), tuple(int(s) for s in map_shape)
        self.rows_per_shard, self.expect_rows, self.overwrite = rows_per_shard, expect_rows, overwrite
        self.compression = compression
        self.map_bytes = int(np.prod(self.map_shape)) * 2
        self._buf: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._buffered = 0
        self._shards: list[dict] = []
        self._ids: list[np.ndarray] = []
        self._closed = False

    def add(self, index, logits, maps) -> None:
        """Rows: ``index`` [B] sample ids, ``logits`` [B,C], ``maps`` [B,*map_shape] (float)."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        logits = np.asarray(logits.detach().cpu() if isinstance(logits, Tensor) else logits, dtype=np.float32)
        maps = np.asarray(maps.detach().cpu() if isinstance(maps, Tensor) else maps, dtype=np.float32)
        b = len(index)
        if logits.shape != (b, self.num_classes):
            raise ValueError(f"logits shape {logits.shape}, expected {(b, self.num_classes)}")
        if maps.shape != (b, *self.map_shape):
            raise ValueError(f"maps shape {maps.shape}, expected {(b, *self.map_shape)}")
        q, scale = encode_maps(maps)
        self._buf.append((index, logits, q, scale))
        self._buffered += b
        while self._buffered >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, n: int) -> None:
        if not self._buf:
            return
        idx, lg, q, sc = (np.concatenate(parts) for parts in zip(*self._buf))
        take = min(n, len(idx))
        rest = (idx[take:], lg[take:], q[take:], sc[take:])
        self._buf = [rest] if len(rest[0]) else []
        self._buffered = len(rest[0])
        idx, lg, q, sc = idx[:take], lg[:take], q[:take], sc[:take]
        table = pa.table({
            "index": pa.array(idx, pa.int64()),
            "logits": pa.FixedSizeListArray.from_arrays(pa.array(lg.reshape(-1), pa.float32()), self.num_classes),
            "map_scale": pa.array(sc, pa.float32()),
            "map": pa.Array.from_buffers(
                pa.binary(self.map_bytes), take, [None, pa.py_buffer(np.ascontiguousarray(q).tobytes())]),
        })
        name = SHARD_PATTERN.format(len(self._shards))
        path = os.path.join(self.tmp_dir, name)
        pq.write_table(table, path, compression=self.compression, row_group_size=max(take, 1))
        self._shards.append({"file": name, "rows": take, "bytes": os.path.getsize(path), "sha256": sha256_file(path)})
        self._ids.append(idx)

    def close(self) -> dict:
        """Flush, check every row is there exactly once, write the manifest, rename into place."""
        if self._closed:
            raise RuntimeError("CacheWriter already closed")
        try:
            while self._buffered:
                self._flush(self.rows_per_shard)
            ids = np.concatenate(self._ids) if self._ids else np.zeros(0, np.int64)
            uniq = np.unique(ids)
            if len(uniq) != len(ids):
                raise CacheError(f"{len(ids) - len(uniq)} duplicate sample ids written to {self.out_dir}")
            if self.expect_rows is not None and len(ids) != self.expect_rows:
                raise CacheError(f"cache {self.out_dir}: {len(ids)} rows written, expected {self.expect_rows}")
            total = sum(s["bytes"] for s in self._shards)
            manifest = {
                **self.meta,
                "format_version": FORMAT_VERSION,
                "num_rows": int(len(ids)),
                "num_classes": self.num_classes,
                "map_shape": list(self.map_shape),
                "map_dtype": "float16",
                "map_scaling": "per-row max|map| (column map_scale, float32)",
                "logits_dtype": "float32",
                "shards": self._shards,
                "bytes_total": int(total),
                "bytes_per_row": total / max(len(ids), 1),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
            with open(os.path.join(self.tmp_dir, MANIFEST), "w") as f:
                json.dump(manifest, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            self._publish()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return manifest

    def _publish(self) -> None:
        if os.path.exists(self.out_dir):
            if not self.overwrite:
                raise FileExistsError(f"teacher cache {self.out_dir} appeared while writing")
            parent, name = os.path.split(self.out_dir)
            old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:12]}")
            os.rename(self.out_dir, old)
            os.rename(self.tmp_dir, self.out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp_dir, self.out_dir)

    def abort(self) -> None:
        self._closed = True
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


# ------------------------------------ reader -------------------------------------------------


class TeacherCache:
    """An opened, verified cache held in memory: ids sorted, logits float32, maps float16."""

    def __init__(self, path: str, manifest: dict, ids: np.ndarray, logits: np.ndarray, scale: np.ndarray,
                 maps: np.ndarray):
        order = np.argsort(ids, kind="stable")
        self.path, self.manifest = path, manifest
        self.ids, self.logits, self.scale, self.maps = ids[order], logits[order], scale[order], maps[order]
        self.map_shape = tuple(manifest["map_shape"])

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
        m = torch.from_numpy(self.maps[r].astype(np.float32)) * float(self.scale[r])
        return torch.from_numpy(self.logits[r].copy()), m

    def missing(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        return ids[~np.isin(ids, self.ids)]


def _read_shard(path: str, info: dict, num_classes: int, map_shape: tuple[int, ...], verify: bool):
    if not os.path.isfile(path):
        raise CacheError(f"cache shard {path} is missing")
    if verify:
        actual = sha256_file(path)
        if actual != info["sha256"]:
            raise CacheError(f"cache shard {path} is corrupt: sha256 {actual} != {info['sha256']} in the manifest")
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
        raise CacheError(f"cache shard {path} is unreadable: {e}") from e
    if len(ids) != info["rows"]:
        raise CacheError(f"cache shard {path} holds {len(ids)} rows, the manifest says {info['rows']}")
    return ids, logits, scale, maps


def unfinished_caches(path: str | os.PathLike) -> list[str]:
    """Temporary directories a crashed writer of ``path`` left behind (never opened)."""
    parent, name = os.path.split(os.path.abspath(os.fspath(path)))
    return sorted(glob.glob(os.path.join(parent, f".{glob.escape(name)}{_TMP_MARK}*")))


def read_manifest(path: str | os.PathLike) -> dict:
    path = os.path.abspath(os.fspath(path))
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        left = unfinished_caches(path)
        hint = f" (found unfinished writes, ignored: {', '.join(left)})" if left else ""
        raise FileNotFoundError(f"teacher cache {path} does not exist{hint}")
    if not os.path.isfile(mpath):
        raise CacheError(f"{path} is not a complete teacher cache: {MANIFEST} is missing")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CacheError(f"cache manifest {mpath} is unreadable: {e}") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"cache {path} has format_version {manifest.get('format_version')!r}, "
                         f"this code reads {FORMAT_VERSION}")
    return manifest


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


def open_cache(path: str | os.PathLike, expect: Mapping | None = None, verify: bool = True) -> TeacherCache:
    """Open a finished cache. ``expect`` maps manifest fields to required values (e.g.
    ``{"teacher_sha256": card.sha256, "explainer": "gradcam", "fingerprint": info.fingerprint}``;
    ``teacher_sha`` is accepted for ``teacher_sha256``); any difference raises :class:`CacheError`
    naming the field and both values. ``verify`` checks every shard's sha256 (a corrupt or
    truncated shard raises naming the file)."""
    path = os.path.abspath(os.fspath(path))
    manifest = read_manifest(path)
    check_expect(path, manifest, expect)
    num_classes, map_shape = int(manifest["num_classes"]), tuple(manifest["map_shape"])
    parts = [_read_shard(os.path.join(path, s["file"]), s, num_classes, map_shape, verify) for s in manifest["shards"]]
    if parts:
        ids, logits, scale, maps = (np.concatenate(p) for p in zip(*parts))
    else:
        ids, logits = np.zeros(0, np.int64), np.zeros((0, num_classes), np.float32)
        scale, maps = np.zeros(0, np.float32), np.zeros((0, *map_shape), np.float16)
    if len(ids) != manifest["num_rows"]:
        raise CacheError(f"cache {path} holds {len(ids)} rows, the manifest says {manifest['num_rows']}")
    return TeacherCache(path, manifest, ids, logits, scale, maps)


# ------------------------------------ training-time dataset ----------------------------------


class CachedTeacherDataset(Dataset):
    """Training items with frozen teacher outputs.

    ``base`` is the distillation split built *without* augmentation (``train=False``), in the
    student's encoding. Items: ``image`` (augmented view), ``label``, ``index`` (+ ``group``,
    ``boxes``), ``teacher_logits`` [C] float32, ``teacher_map`` ([S,S] or [6,S,S], the stored map
    upsampled to the view and cropped/flipped exactly like the image) and ``view`` (int64
    [top, left, height, width, flipped] in the un-augmented view).
    ``cfg`` (default ``base.cfg``) supplies augment / crop_scale / crop_ratio / hflip.
    """

    def __init__(self, base: SplitDataset, cache: TeacherCache, cfg: DataConfig | None = None):
        if not isinstance(base, SplitDataset):
            raise TypeError(f"base must be a SplitDataset, got {type(base).__name__}")
        if base.train:
            raise ValueError("CachedTeacherDataset needs the un-augmented split (build_dataset(..., train=False)); "
                             "it applies the augmentation itself, to the image and the map together")
        self.base, self.cache, self.cfg = base, cache, cfg or base.cfg
        man = cache.manifest
        for field, have in (("dataset", base.cfg.name), ("split", base.split)):
            if field in man and man[field] != have:
                raise CacheError(f"cache {cache.path} does not match: {field} is {man[field]!r} in the cache, "
                                 f"the dataset has {have!r}")
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

    def __getitem__(self, pos: int) -> dict:
        rec = self.base.record(int(pos))
        logits, m = self.cache.get(rec.index)
        h, w = rec.image.shape[-2:]
        chan = m.dim() == 3
        tmap = tv_tensors.Image(expand_map(m, (h, w)) if chan else expand_map(m, (h, w)).unsqueeze(0))
        image, boxes = tv_tensors.Image(rec.image), None
        if rec.boxes is not None:
            boxes = tv_tensors.BoundingBoxes(rec.boxes, format="XYXY", canvas_size=(h, w))
        if self.cfg.augment:
            view = sample_view(h, w, self.cfg.crop_scale, self.cfg.crop_ratio, self.cfg.hflip)
            image, tmap, *rest = apply_view(view, (h, w), image, tmap, *([boxes] if boxes is not None else []))
            boxes = rest[0] if rest else None
        else:
            view = identity_view(h, w)
        item = make_item(self.base, rec, self.base.encode(image), boxes)
        tmap = tmap.as_subclass(Tensor)
        item["teacher_logits"] = logits
        item["teacher_map"] = (tmap if chan else tmap[0]).contiguous()
        item["view"] = view.as_tensor()
        return item


__all__ = ["CacheError", "CacheWriter", "CachedTeacherDataset", "TeacherCache", "encode_maps", "expand_map",
           "open_cache", "read_manifest", "roundtrip_maps", "shrink_maps", "stored_map_shape", "unfinished_caches",
           "FORMAT_VERSION"]
