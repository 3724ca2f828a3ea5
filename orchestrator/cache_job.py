"""Ray Data job: run a frozen teacher once over the distillation split and write the teacher cache.

    build_cache("runs/teacher", DataConfig(name="decoy-digits"), "gradcam", "s3://bucket/caches/x")

Pipeline: ``ray.data.range(N)`` (sample positions) -> ``map_batches(_TeacherActor)`` (a callable-class
actor pool: each actor loads the verified teacher and the un-augmented split once, then turns
batches of positions into rows already in the cache's column format) -> ``write_parquet`` straight
from the actors to the store (or a local directory), under the build's ``parts-<build>/`` prefix
of a :class:`trainables.data.cache.CacheTarget`. No row passes through the driver. The driver then
reads back what was written — each shard's size from the store's file info, its sha256 and its
``index`` column, computed by small Ray tasks next to the data for a store — checks every sample id
of the split is there exactly once, writes the manifest last and publishes (local: rename; store:
the manifest PUT).

Why a read-back sha256 rather than a cheaper checksum: the shards are written by Ray Data's
Parquet writer, which reports no checksum, and the store's ETag is an MD5 only for single-part
uploads. Hashing the objects as stored costs one streamed read of the cache (no disk, constant
memory, in parallel for a store), and it is exactly what :func:`open_cache` verifies later, so it
also proves the upload arrived whole.

Pool size comes from what the cluster *can* have (:func:`orchestrator.cluster.cluster_capacity`): on
an autoscaling cluster the pool starts at one actor and grows to the capacity as nodes come up
(``ActorPoolStrategy(min_size=1, max_size=N)``); it refuses only when even the capacity has no GPU.
GPU: ``use_gpu=True`` gives each actor ``num_gpus=1``. CPU: actors take ``cpus_per_actor`` each and
the pool leaves one CPU free, so Ray Data's own tasks never starve. Connects to an already
initialised Ray; otherwise starts a local one and shuts it down.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import replace

import numpy as np
import ray

from orchestrator.cluster import loopback_node_ip
from trainables import storage
from trainables.data import DataConfig
from trainables.data.cache import CacheTarget, build_manifest, check_rows, rows_table
from trainables.teacher import TeacherRunner


class _TeacherActor:
    """Ray Data callable class: positions in, cache rows (a pyarrow Table in the cache format) out."""

    def __init__(self, teacher_dir: str, data: DataConfig, explainer: str, max_map_side: int | None,
                 device: str, num_threads: int, num_classes: int, map_shape: tuple[int, ...]):
        import torch

        torch.set_num_threads(max(1, num_threads))
        self.runner = TeacherRunner(teacher_dir, data, explainer, max_map_side, device=device)
        self.num_classes, self.map_shape = num_classes, map_shape

    def __call__(self, batch: dict):
        out = self.runner.run(batch["id"])
        return rows_table(out["index"], out["logits"], out["map"], self.num_classes, self.map_shape)


def _pool_bounds(use_gpu: bool, cpus_per_actor: int) -> tuple[int, int]:
    """(min, max) actors from what the cluster can have, not what is up now (a cold autoscaling
    cluster has the head alone)."""
    from orchestrator.cluster import cluster_capacity

    cap = cluster_capacity()
    if use_gpu:
        most = int(cap.resources.get("GPU", 0))
        if most < 1:
            where = "the autoscaler's node types provide none" if cap.autoscaling else "it has none"
            raise RuntimeError(f"build_cache(use_gpu=True) (resources.use_gpu) but the Ray cluster has no GPU: {where}")
    else:
        most = max(1, (int(cap.resources.get("CPU", 1)) - 1) // cpus_per_actor)
    return (1 if cap.autoscaling else most), most


def _shard_facts(uri: str) -> tuple[str, int, np.ndarray]:
    """(sha256, bytes, sample ids) of one written shard, read back from where it is stored."""
    import pyarrow.parquet as pq

    digest, size = storage.sha256(uri)
    fs, p = storage.filesystem(uri)
    ids = pq.read_table(p, columns=["index"], filesystem=fs).column("index").to_numpy()
    return digest, size, ids


def build_cache(teacher_dir: str | os.PathLike, data: DataConfig, explainer: str, out_dir: str | os.PathLike,
                batch_size: int = 64, use_gpu: bool = False, progress: bool = True,
                max_map_side: int | None = None, num_actors: int | None = None, cpus_per_actor: int = 1,
                rows_per_shard: int = 8192, overwrite: bool = False) -> dict:
    """Build the teacher cache for ``data``'s distillation (train) split; returns the manifest.

    ``teacher_dir`` and ``out_dir``: local paths (shared storage on a multi-node cluster) or store
    URIs. The teacher explains its top-1 class on the un-augmented view, in its own input encoding.
    ``max_map_side`` bounds the stored map resolution (B-cos W(x) at 224 px -> 6x56x56 with 56);
    None stores it at full resolution, the paper's frozen maps (``teacher.cache_map_side``).
    """
    teacher_dir = storage.normalize(teacher_dir)
    if data.root is not None:  # actors may run elsewhere: make the path absolute (fingerprint ignores it)
        data = replace(data, root=os.path.abspath(data.root))
    started = False
    if not ray.is_initialized():
        with loopback_node_ip():
            ray.init(address="local", num_cpus=os.cpu_count() or 2, dashboard_host="127.0.0.1")
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        # Driver-side plan: verifies the teacher, lists the split, finds the map shape (one forward).
        plan = TeacherRunner(teacher_dir, data, explainer, max_map_side)
        meta, shape = plan.meta()
        n, num_classes, split_ids = len(plan), plan.card.num_classes, np.asarray(plan.dataset.ids)
        del plan
        lo, hi = (num_actors, num_actors) if num_actors else _pool_bounds(use_gpu, cpus_per_actor)
        target = CacheTarget(out_dir, overwrite)
        try:
            parts_dir = target.path(target.parts)
            ds = ray.data.range(n).map_batches(
                _TeacherActor,
                fn_constructor_kwargs=dict(teacher_dir=teacher_dir, data=data, explainer=explainer,
                                           max_map_side=max_map_side, device="cuda" if use_gpu else "cpu",
                                           num_threads=cpus_per_actor, num_classes=num_classes, map_shape=shape),
                batch_size=batch_size, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
                num_cpus=cpus_per_actor, num_gpus=1 if use_gpu else 0)
            ds.write_parquet(parts_dir, min_rows_per_file=rows_per_shard, compression="zstd")
            manifest = _manifest(target, meta, num_classes, shape, n, split_ids)
            target.publish(manifest)
        except BaseException:
            target.abort()
            raise
        return manifest
    finally:
        if started:
            ray.shutdown()


def _manifest(target: CacheTarget, meta: dict, num_classes: int, shape: tuple[int, ...], n: int,
              split_ids: np.ndarray) -> dict:
    """Read back what the actors wrote and check it before anything is published."""
    sizes = storage.file_sizes(target.root, ".parquet")
    files = sorted(f for f in sizes if f.startswith(target.parts + "/"))
    uris = [target.path(f) for f in files]
    if target.remote:  # hash next to the data, in parallel: no shard passes through the driver
        facts = ray.get([ray.remote(num_cpus=0.5)(_shard_facts).remote(u) for u in uris])
    else:  # a local (or shared) directory: the driver reads it from disk; a node-local disk of
        # another node would show up below as missing rows
        facts = [_shard_facts(u) for u in uris]
    shards = []
    for f, (digest, size, ids) in zip(files, facts):
        if size != sizes[f]:
            raise RuntimeError(f"cache shard {target.path(f)}: read {size} bytes, the store lists {sizes[f]}")
        shards.append({"file": f, "rows": int(len(ids)), "bytes": int(size), "sha256": digest})
    ids = np.concatenate([x[2] for x in facts]) if facts else np.zeros(0, np.int64)
    where = f"{target.out_dir} (written to {target.path(target.parts)})"
    check_rows(ids, where, expect_rows=n, expect_ids=split_ids)
    return build_manifest({**meta, "built_by": "ray-data"}, shards, len(ids), num_classes, shape)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Build a frozen teacher cache with Ray Data")
    p.add_argument("--teacher", required=True, help="teacher directory or URI (teacher.pt + teacher.json)")
    p.add_argument("--data", default="digits", help="dataset name")
    p.add_argument("--root", default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--shots", type=int, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--explainer", default="gradcam")
    p.add_argument("--out", required=True, help="cache directory or store URI (s3://bucket/caches/x)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-map-side", type=int, default=None, help="default: maps at full resolution")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    from trainables.data import default_config

    kw = {"root": a.root, "shots": a.shots, "seed": a.seed}
    if a.image_size is not None:
        kw["image_size"] = a.image_size
    m = build_cache(a.teacher, default_config(a.data, **kw), a.explainer, a.out, batch_size=a.batch_size,
                    use_gpu=a.gpu, max_map_side=a.max_map_side, overwrite=a.overwrite)
    print(f"wrote {a.out}: {m['num_rows']} rows, map {m['map_shape']}, {m['bytes_per_row']:.1f} bytes/row")


if __name__ == "__main__":
    main()
