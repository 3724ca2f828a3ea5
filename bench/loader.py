"""Training-loader throughput: the input pipeline (``trainables.data.loader``) against one process.

Writes (once) an ImageFolder of real JPEGs — ``--images`` pictures of 500x375 px (ImageNet's
typical size), 10 classes, smooth shapes plus noise so they compress like photographs — then times
full epochs of the training loader the way ``fit`` builds it (ImageFolder decode -> Resize(256) ->
CenterCrop(224) -> RandomResizedCrop(224, scale 0.08-1) + flip -> normalise -> batches of 32):

- ``num_workers=0``: decoding and augmentation in the training process (what v0.1 did);
- the pipeline: ``--workers`` loader processes (default: what a Ray Train worker holding every CPU
  of this machine gets on a GPU, ``loader.workers: null``), pinned memory when CUDA is present,
  persistent workers, prefetch 2.

Both iterate the same samples with the same augmentation seeds (the batches are identical; checked
on the first batch), in alternating order (0, K, 0, K, ...), each epoch timed from the iterator's
creation (loader start-up included). The ratio is of median images/s.

    python bench/loader.py                               # 2,000 images, 2 repetitions
    python bench/loader.py --images 4000 --json out.json # what bench/gpu.py runs on the GPU machine
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from trainables.config import LoaderConfig  # noqa: E402
from trainables.data import DataConfig, build_dataset  # noqa: E402
from trainables.data.loader import default_workers, train_loader  # noqa: E402
from trainables.storage import local_root  # noqa: E402

CLASSES = 10


def write_folder(root: str, images: int) -> str:
    """root/train/cNN/*.jpg, written once (a marker file says it is complete)."""
    from PIL import Image, ImageDraw, ImageFilter

    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return root
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for i in range(images):
        c = i % CLASSES
        d = os.path.join(root, "train", f"c{c:02d}")
        os.makedirs(d, exist_ok=True)
        base = rng.integers(0, 256, 3)
        im = Image.new("RGB", (500, 375), tuple(int(v) for v in base))
        draw = ImageDraw.Draw(im)
        for _ in range(12):
            x0, y0 = rng.integers(0, 450), rng.integers(0, 330)
            box = [int(x0), int(y0), int(x0 + rng.integers(20, 200)), int(y0 + rng.integers(20, 150))]
            draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        im = im.filter(ImageFilter.GaussianBlur(3))
        noise = rng.normal(0, 12, (375, 500, 3))
        arr = np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(d, f"{i:06d}.jpg"), quality=90)
    open(done, "w").close()
    print(f"wrote {images} JPEGs (500x375) under {root} in {time.perf_counter() - t0:.0f} s")
    return root


def epoch_rate(ds, workers: int, batch: int, cuda: bool, epoch: int) -> tuple[float, torch.Tensor]:
    dl = train_loader(ds, batch, seed=0, rank=0, world=1, cfg=LoaderConfig(), workers=workers, cuda=cuda)
    dl.sampler.set_epoch(epoch)
    t0, n, first = time.perf_counter(), 0, None
    for b in dl:
        first = b["image"][:2].clone() if first is None else first
        n += len(b["image"])
    return n / (time.perf_counter() - t0), first


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--root", default=None, help="where the JPEG folder is written (default: the node cache)")
    p.add_argument("--workers", type=int, default=None, help="loader processes of the pipeline (default: sized "
                   "for a GPU worker holding all CPUs)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=2, help="epochs per side, alternating")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the training process's own threads: it only collects batches here
    cuda = torch.cuda.is_available()
    cpus = len(os.sched_getaffinity(0))
    workers = args.workers if args.workers is not None else default_workers(LoaderConfig(), cpus, False, cuda=True)
    root = write_folder(args.root or os.path.join(local_root(), "bench", f"jpeg-folder-{args.images}"), args.images)
    ds = build_dataset(DataConfig(name="imagefolder", root=root, image_size=224, val_per_class=0, hflip=True,
                                  crop_scale=(0.08, 1.0)), "train", train=True)
    rates: dict[int, list[float]] = {0: [], workers: []}
    firsts = {}
    for rep in range(args.reps):
        for w in ((0, workers) if rep % 2 == 0 else (workers, 0)):
            r, first = epoch_rate(ds, w, args.batch, cuda, epoch=1)
            rates[w].append(r)
            firsts[w] = first
            print(f"  workers={w}: {r:7.1f} images/s")
    same = torch.equal(firsts[0], firsts[workers])
    base, ours = statistics.median(rates[0]), statistics.median(rates[workers])
    out = {"images": len(ds), "cpus": cpus, "cuda": cuda, "batch": args.batch, "workers": workers,
           "images_per_s_workers0": base, "images_per_s_pipeline": ours, "ratio": ours / base,
           "rates": {str(k): v for k, v in rates.items()}, "same_batches": same,
           "torch": torch.__version__}
    print(f"RESULT: {ours:.1f} images/s with {workers} loader processes vs {base:.1f} with num_workers=0: "
          f"{ours / base:.2f}x ({cpus} CPUs; identical batches: {same})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
