"""Ray Data job: run a frozen teacher once over the distillation split and write the teacher cache.

    build_cache("runs/teacher", DataConfig(name="decoy-digits"), "gradcam", "runs/cache-gradcam")

Pipeline: ``ray.data.range(N)`` (sample positions) -> ``map_batches(_TeacherActor)`` (a callable-class
actor pool: each actor loads the verified teacher and the un-augmented split once, then turns
batches of positions into logits + maps) -> the driver streams the result batches into a
:class:`trainables.data.cache.CacheWriter`, which writes Parquet shards into a temporary directory
and renames it into place when every row is there exactly once.

GPU: ``use_gpu=True`` gives each actor ``num_gpus=1`` (pool size = the cluster's GPUs). CPU: actors
take ``cpus_per_actor`` each and the pool leaves one CPU free, so Ray Data's own tasks never
starve. Connects to an already initialised Ray; otherwise starts a local one and shuts it down.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import replace

import ray

from trainables.data import DataConfig
from trainables.data.cache import CacheWriter
from trainables.teacher import TeacherRunner


class _TeacherActor:
    """Ray Data callable class: positions in, cache rows out."""

    def __init__(self, teacher_dir: str, data: DataConfig, explainer: str, max_map_side: int | None,
                 device: str, num_threads: int):
        import torch

        torch.set_num_threads(max(1, num_threads))
        self.runner = TeacherRunner(teacher_dir, data, explainer, max_map_side, device=device)

    def __call__(self, batch: dict) -> dict:
        return self.runner.run(batch["id"])


def _pool_size(use_gpu: bool, cpus_per_actor: int) -> int:
    res = ray.cluster_resources()
    if use_gpu:
        gpus = int(res.get("GPU", 0))
        if gpus < 1:
            raise RuntimeError("build_cache(use_gpu=True) but the Ray cluster has no GPU")
        return gpus
    return max(1, (int(res.get("CPU", 1)) - 1) // cpus_per_actor)


def build_cache(teacher_dir: str | os.PathLike, data: DataConfig, explainer: str, out_dir: str | os.PathLike,
                batch_size: int = 64, use_gpu: bool = False, progress: bool = True,
                max_map_side: int | None = 56, num_actors: int | None = None, cpus_per_actor: int = 1,
                rows_per_shard: int = 8192, overwrite: bool = False) -> dict:
    """Build the teacher cache for ``data``'s distillation (train) split; returns the manifest.

    The teacher explains its top-1 class on the un-augmented view, in its own input encoding.
    ``max_map_side`` bounds the stored map resolution (B-cos W(x) at 224 px -> 6x56x56).
    """
    teacher_dir = os.path.abspath(os.fspath(teacher_dir))
    if data.root is not None:  # actors may run elsewhere: make the path absolute (fingerprint ignores it)
        data = replace(data, root=os.path.abspath(data.root))
    started = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=os.cpu_count() or 2)
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        # Driver-side plan: verifies the teacher, lists the split, finds the map shape (one forward).
        plan = TeacherRunner(teacher_dir, data, explainer, max_map_side)
        meta, shape = plan.meta()
        n, num_classes = len(plan), plan.card.num_classes
        del plan
        size = num_actors or _pool_size(use_gpu, cpus_per_actor)
        ds = ray.data.range(n).map_batches(
            _TeacherActor,
            fn_constructor_kwargs=dict(teacher_dir=teacher_dir, data=data, explainer=explainer,
                                       max_map_side=max_map_side, device="cuda" if use_gpu else "cpu",
                                       num_threads=cpus_per_actor),
            batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=cpus_per_actor, num_gpus=1 if use_gpu else 0)
        with CacheWriter(out_dir, {**meta, "built_by": "ray-data"}, num_classes, shape,
                         rows_per_shard=rows_per_shard, expect_rows=n, overwrite=overwrite) as writer:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                writer.add(batch["index"], batch["logits"], batch["map"])
            return writer.close()
    finally:
        if started:
            ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Build a frozen teacher cache with Ray Data")
    p.add_argument("--teacher", required=True, help="teacher directory (teacher.pt + teacher.json)")
    p.add_argument("--data", default="digits", help="dataset name")
    p.add_argument("--root", default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--shots", type=int, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--explainer", default="gradcam")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-map-side", type=int, default=56)
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
