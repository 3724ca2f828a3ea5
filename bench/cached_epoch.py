"""Cached-teacher epoch vs live-teacher epoch: what `teacher.mode: cached` saves per training epoch.

Runs :func:`trainables.train_loop.fit` (the loop every Ray Train worker runs; no Ray here, so the
number is about the loop, not orchestration) on the same ``TrainConfig`` twice per round, once
with ``teacher.mode=live`` (teacher forward + explanation every batch) and once with
``teacher.mode=cached`` (logits and maps read from the Parquet cache, cropped/flipped with the
image), for ``--rounds`` rounds in alternating order (live first, then cached first) to bracket
drift in the load of a shared machine. Each epoch's ``train_time_s`` / ``train_cpu_s`` are the
loop's own wall and process-CPU timers around the training batches (DataLoader in-process); the
first epoch of every run is dropped (warm-up). Printed: medians per mode and the ratios cached /
live (< 1: the cache is faster), plus one cache build's time. On a machine shared with other
jobs read the CPU ratio: preemption inflates wall time, not this process's CPU time.

Two set-ups:
- default: the quickstart (digits, ``small_cnn`` teacher -> ``tiny_cnn`` student, 32 px) with its
  trained teacher (trained first when missing, ~2 min);
- ``--synthetic-imagefolder N``: N random JPEGs per class (8 classes) in ImageNet layout at
  ``--size`` px, a random-init ``--teacher-arch`` -> ``--student`` pair (timing does not depend on
  the weights): the paper's regime, where the teacher is the expensive part.

    python bench/cached_epoch.py
    python bench/cached_epoch.py --synthetic-imagefolder 12 --teacher-arch resnet34 --student resnet18 --size 112
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


def run(cfg) -> list[tuple[float, float]]:
    """[(wall s, process CPU s)] of each epoch's training batches."""
    from trainables.train_loop import Hooks, fit

    times: list[tuple[float, float]] = []
    fit(cfg, Hooks(report=lambda m, ckpt: times.append((m["train_time_s"], m["train_cpu_s"])), log=lambda s: None))
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default=os.path.join(ROOT, "sweeps", "quickstart.yaml"))
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--synthetic-imagefolder", type=int, default=0, metavar="N")
    p.add_argument("--teacher-arch", default="resnet34")
    p.add_argument("--student", default="resnet18")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()

    os.chdir(ROOT)
    os.environ["E2KD_TORCH_THREADS"] = str(args.threads)
    import torch

    from orchestrator.cli import ensure_teacher
    from orchestrator.spec import load_spec
    from trainables.config import with_overrides
    from trainables.data import dataset_info, default_config
    from trainables.models import build_model
    from trainables.teacher import build_cache_local, save_teacher

    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="e2kd-cached-epoch-")
    spec = load_spec(args.spec)
    if args.synthetic_imagefolder:
        from cache_throughput import _synthetic_imagefolder

        root = _synthetic_imagefolder(os.path.join(tmp, "data"), args.synthetic_imagefolder)
        data = default_config("imagefolder", root=root, val_per_class=2, image_size=args.size)
        torch.manual_seed(0)
        teacher_dir = os.path.join(tmp, "teacher")
        save_teacher(build_model(args.teacher_arch, dataset_info(data).num_classes), args.teacher_arch, data, teacher_dir)
        cfg = with_overrides(spec.train, {"data": data, "student": args.student, "batch_size": args.batch,
                                          "teacher.arch": args.teacher_arch, "teacher.path": teacher_dir,
                                          "explain_samples": 2})
        setup = (f"{args.teacher_arch} -> {args.student}, synthetic imagefolder {args.size} px, "
                 f"{8 * args.synthetic_imagefolder} train images, batch {args.batch}")
    else:
        ensure_teacher(spec)
        cfg = spec.train
        setup = (f"{cfg.teacher.arch} -> {cfg.student}, {cfg.data.name} {cfg.data.image_size} px, "
                 f"{cfg.data.shots} shots/class, batch {cfg.batch_size}")
    cfg = with_overrides(cfg, {"epochs": args.epochs})

    cache_dir = os.path.join(tmp, "cache")
    t0 = time.perf_counter()
    build_cache_local(cfg.teacher.path, cfg.data, cfg.loss.explainer, cache_dir, batch_size=64)
    build_s = time.perf_counter() - t0
    live = with_overrides(cfg, {"teacher.mode": "live"})
    cached = with_overrides(cfg, {"teacher.mode": "cached", "teacher.cache_dir": cache_dir})

    load0 = os.getloadavg()
    per_mode: dict[str, list[tuple[float, float]]] = {"live": [], "cached": []}
    for r in range(args.rounds):
        order = [("live", live), ("cached", cached)] if r % 2 == 0 else [("cached", cached), ("live", live)]
        for mode, c in order:
            t = run(c)
            print(f"[cached_epoch] round {r + 1} {mode:6s} per epoch, wall/CPU s: "
                  + " ".join(f"{w:.3f}/{c:.3f}" for w, c in t), flush=True)
            per_mode[mode] += t[1:]
    load1 = os.getloadavg()
    wall = {m: statistics.median(w for w, _ in v) for m, v in per_mode.items()}
    cpu = {m: statistics.median(c for _, c in v) for m, v in per_mode.items()}
    print(f"\n{setup}; {cfg.loss.explainer}, λ={cfg.loss.lam}; {args.threads} torch thread(s); "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"load average {load0[0]:.1f} -> {load1[0]:.1f}")
    print(f"cache build (in-process, once): {build_s:.1f} s")
    print("| mode | epoch wall s (median) | epoch CPU s (median) | epochs |")
    print("|---|---:|---:|---:|")
    for m in ("live", "cached"):
        print(f"| {m} | {wall[m]:.3f} | {cpu[m]:.3f} | {len(per_mode[m])} |")
    print(f"\n**cached / live epoch time: wall {wall['cached'] / wall['live']:.2f}, CPU {cpu['cached'] / cpu['live']:.2f}** "
          f"(on a shared machine read the CPU ratio)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
