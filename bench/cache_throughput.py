"""Teacher cache benchmark.

Throughput (default): samples/s of one training epoch's teacher targets from the cache loader
(CachedTeacherDataset: load + crop/flip image and stored map together) against the live teacher
(same augmented loader, then explain(teacher, x, create_graph=False, resize=True) per batch), same
data, same batch size, one run each. Prints the ratio and appends a row to bench/README.md.

    python bench/cache_throughput.py --arch small_cnn --explainer gradcam
    python bench/cache_throughput.py --arch small_bcos_cnn --explainer bcos_weight
    python bench/cache_throughput.py --teacher runs/teacher_bcos --explainer bcos_weight

Resolution study (``--resolution``): mean cosine between the live full-resolution map and the map
stored at a reduced side (area downsample, float16, bilinear upsample back), for a teacher on the
digits train split and, with ``--resolution-224``, a random-init bcos_resnet18 at 224 px.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainables.data import DataConfig, build_dataset, dataset_info, default_config  # noqa: E402
from trainables.data.cache import CachedTeacherDataset, open_cache, roundtrip_maps  # noqa: E402
from trainables.explainers import explain  # noqa: E402
from trainables.models import build_model  # noqa: E402
from trainables.teacher import build_cache_local, load_teacher, save_teacher  # noqa: E402

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
SECTION = "## Teacher cache vs live teacher (bench/cache_throughput.py)"


def _synthetic_imagefolder(root: str, per_class: int, classes: int = 8) -> str:
    """Random 320x256 JPEGs in ImageNet layout (train/<class>/, val/<class>/)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class + 2), ("val", 1)):
        for c in range(classes):
            d = os.path.join(root, split, f"class{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)).save(os.path.join(d, f"{i}.jpg"))
    return root


def _epoch(loader, step) -> tuple[int, float, float]:
    """(samples, wall seconds, process CPU seconds) of one pass (num_workers=0: all work in-process)."""
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    for batch in loader:
        step(batch)
        n += len(batch["index"])
    return n, time.perf_counter() - t0, time.process_time() - c0


def throughput(args) -> dict:
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="cache_bench_")
    if args.synthetic_imagefolder:
        root = _synthetic_imagefolder(os.path.join(tmp, "data"), args.synthetic_imagefolder)
        cfg = default_config("imagefolder", root=root, val_per_class=2)
    else:
        cfg = DataConfig(name=args.data, shots=args.shots, hflip=True)
    teacher_dir = args.teacher
    if teacher_dir is None:  # throughput does not depend on the weights
        torch.manual_seed(0)
        teacher_dir = os.path.join(tmp, "teacher")
        save_teacher(build_model(args.arch, dataset_info(cfg).num_classes), args.arch, cfg, teacher_dir)
    teacher, card = load_teacher(teacher_dir)
    t0 = time.perf_counter()
    man = build_cache_local(teacher_dir, cfg, args.explainer, os.path.join(tmp, "cache"), batch_size=args.batch)
    build_s = time.perf_counter() - t0
    cache = open_cache(os.path.join(tmp, "cache"))
    loader_kw = dict(batch_size=args.batch, shuffle=True, num_workers=0, drop_last=False,
                     generator=torch.Generator().manual_seed(0))

    cached = DataLoader(CachedTeacherDataset(build_dataset(cfg, "train", encoding=card.encoding), cache), **loader_kw)
    sink = []
    n_c, s_c, cpu_c = _epoch(cached, lambda b: sink.append(float(b["teacher_map"].sum())
                                                           + float(b["teacher_logits"].sum())))

    live = DataLoader(build_dataset(cfg, "train", encoding=card.encoding, train=True), **loader_kw)

    def live_step(b):
        e = explain(teacher, b["image"], method=args.explainer, create_graph=False, resize=True)
        sink.append(float(e.maps.sum()) + float(e.logits.sum()))

    n_l, s_l, cpu_l = _epoch(live, live_step)
    data_name = f"{cfg.name} {cfg.image_size}px" + (" (synthetic JPEGs)" if args.synthetic_imagefolder else "")
    res = {"arch": card.arch, "explainer": args.explainer, "data": f"{data_name}/train ({n_c} imgs)",
           "batch": args.batch, "threads": args.threads,
           "cache_sps": n_c / s_c, "live_sps": n_l / s_l, "ratio": (n_c / s_c) / (n_l / s_l),
           "cache_cpu_sps": n_c / cpu_c, "live_cpu_sps": n_l / cpu_l, "cpu_ratio": (n_c / cpu_c) / (n_l / cpu_l),
           "bytes_per_row": man["bytes_per_row"], "map_shape": man["map_shape"], "build_s": build_s}
    print(f"{card.arch}/{args.explainer}: cache {res['cache_sps']:.0f} samples/s wall "
          f"({res['cache_cpu_sps']:.0f} per CPU-s), live teacher {res['live_sps']:.0f} samples/s wall "
          f"({res['live_cpu_sps']:.0f} per CPU-s) -> ratio {res['ratio']:.2f}x wall, {res['cpu_ratio']:.2f}x CPU; "
          f"cache {man['bytes_per_row']:.0f} bytes/image (map {man['map_shape']}), built in {build_s:.1f}s")
    return res


def append_readme(res: dict, command: str) -> None:
    text = open(README).read() if os.path.exists(README) else ""
    row = (f"| {res['arch']} / {res['explainer']} | {res['data']} | {res['batch']} | {res['threads']} | "
           f"{res['cache_sps']:.0f} / {res['cache_cpu_sps']:.0f} | {res['live_sps']:.0f} / {res['live_cpu_sps']:.0f} | "
           f"{res['ratio']:.1f}x / **{res['cpu_ratio']:.1f}x** | {res['bytes_per_row']:.0f} | `{command}` |")
    if SECTION not in text:
        block = (f"\n{SECTION}\n\nOne epoch of teacher targets (logits + map for the augmented view) per run, "
                 f"CPU, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                 f"torch {torch.__version__}. *cache*: CachedTeacherDataset (stored map cropped/flipped with the "
                 "image); *live*: the same augmented loader + `explain(teacher, x, create_graph=False)`. "
                 "DataLoader num_workers=0, so all work is in-process: samples/s are given per wall second / per "
                 "process-CPU second. Single runs on a machine shared with other jobs: read the CPU numbers.\n\n"
                 "| teacher / explainer | data | batch | threads | cache samples/s (wall / CPU) | "
                 "live samples/s (wall / CPU) | ratio (wall / CPU) | cache bytes/image | command |\n"
                 "|---|---|---|---|---|---|---|---|---|\n")
        with open(README, "a") as f:
            f.write(("\n" if text and not text.endswith("\n") else "") + block + row + "\n")
        return
    # insert the row at the end of this section's table
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip() == SECTION)
    end = start + 1
    while end < len(lines) and not lines[end].startswith("## "):
        end += 1
    last_row = max(i for i in range(start, end) if lines[i].startswith("|"))
    lines.insert(last_row + 1, row + "\n")
    with open(README, "w") as f:
        f.write("".join(lines))


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-12)


def _bytes_per_row(maps: torch.Tensor, side: int, num_classes: int) -> float:
    """Parquet bytes per row of a one-shard cache of these maps (stored at ``side``) + random logits."""
    from trainables.data.cache import CacheWriter, shrink_maps

    small = shrink_maps(maps, side)
    with tempfile.TemporaryDirectory() as d:
        with CacheWriter(os.path.join(d, "c"), {}, num_classes, tuple(small.shape[1:])) as w:
            w.add(range(len(small)), torch.randn(len(small), num_classes) * 3, small)
            return w.close()["bytes_per_row"]


def resolution(args) -> None:
    torch.set_num_threads(args.threads)
    sides = [int(s) for s in args.sides.split(",")]
    if args.teacher:
        teacher, card = load_teacher(args.teacher)
        ds = build_dataset(DataConfig(), "train", encoding=card.encoding)
        x = torch.stack([ds[i]["image"] for i in range(min(args.n, len(ds)))])
        maps = explain(teacher, x, method=args.explainer, resize=True).maps
        print(f"{card.arch}/{args.explainer} on digits train ({len(x)} images), live map {tuple(maps.shape[1:])}:")
        for s in sides:
            c = _cos(roundtrip_maps(maps, s), maps)
            print(f"  stored side {s:>3}: mean cos {c.mean():.4f}  min {c.min():.4f}")
    if args.resolution_224:
        torch.manual_seed(0)
        m = build_model("bcos_resnet18", 1000).eval()
        from trainables.data.digits import _digits, _upsample

        digits = _upsample(torch.from_numpy(_digits()[0][: args.n224]), 224)[:, None].repeat(1, 3, 1, 1)
        for name, x01 in [("uniform noise", torch.rand(args.n224, 3, 224, 224)),
                          ("digits upsampled to 224", digits)]:
            x = torch.cat([x01, 1 - x01], 1)
            t0 = time.perf_counter()
            maps = explain(m, x, method="bcos_weight", resize=True).maps
            print(f"random-init bcos_resnet18, {name} ({len(x)} images, {time.perf_counter() - t0:.0f}s), "
                  f"live W(x) {tuple(maps.shape[1:])}:")
            for s in [112, 56, 54, 28]:
                c = _cos(roundtrip_maps(maps, s), maps)
                print(f"  stored side {s:>3}: mean cos {c.mean():.4f}  min {c.min():.4f}; "
                      f"{_bytes_per_row(maps, s, 1000):.0f} bytes/image on disk with 1000 float32 logits")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=None, help="teacher dir (default: a random-init --arch)")
    p.add_argument("--arch", default="small_cnn")
    p.add_argument("--explainer", default="gradcam")
    p.add_argument("--data", default="decoy-digits")
    p.add_argument("--shots", type=int, default=None)
    p.add_argument("--synthetic-imagefolder", type=int, default=0, metavar="K",
                   help="use a temporary imagefolder of random 320x256 JPEGs, K train images per class, 224 px")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-readme", action="store_true")
    p.add_argument("--resolution", action="store_true", help="map-resolution fidelity study instead")
    p.add_argument("--resolution-224", action="store_true")
    p.add_argument("--sides", default="32,16,8")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--n224", type=int, default=8)
    args = p.parse_args(argv)
    if args.resolution or args.resolution_224:
        resolution(args)
        return
    res = throughput(args)
    if not args.no_readme:
        append_readme(res, "python bench/cache_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
