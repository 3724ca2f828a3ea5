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

``--ray-data`` adds a third side in the same run, interleaved (0, K, R, R, K, 0, ...): a Ray Data
pipeline doing the same per-sample work with our functions (``load_rgb`` -> ``sample_view`` on
the full image with the sampler's seed -> ``apply_view`` -> ``encode``) on the same samples (the
sampler's epoch order, the full batches the DataLoader yields): ``ray.data.from_items`` of
(path, label, position, seed) rows -> ``map_batches`` (batches of ``--batch`` rows, one task per CPU) ->
``iter_torch_batches``, on a local Ray instance with ``--cpus`` CPUs (default: this machine's),
``DataContext`` defaults, no progress bars. An epoch is timed from building the dataset to its last
batch. Not timed but reported: ``ray.init`` (on a Ray Train worker the cluster already runs) and the
first, cold epoch (Ray worker processes start and import torch; the DataLoader's processes fork an
already-loaded parent). The samples are checked against the Dataset's (first batch, two images).

    python bench/loader.py                               # 2,000 images, 2 repetitions
    python bench/loader.py --ray-data --json out.json    # + the Ray Data side
    python bench/loader.py --images 4000 --json out.json # what bench/gpu.py runs on the GPU machine
"""
from __future__ import annotations

import argparse
import json
import logging
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


# ------------------------------------ Ray Data side ------------------------------------------


def ray_rows(ds, batch: int, epoch: int) -> list[dict]:
    """The training loader's epoch as rows: (path, label, pos, seed) in the sampler's order, only
    the full batches (what ``drop_last`` leaves), so both sides decode exactly the same samples."""
    dl = train_loader(ds, batch, seed=0, rank=0, world=1, cfg=LoaderConfig(), workers=0, cuda=False)
    dl.sampler.set_epoch(epoch)
    keys = list(dl.sampler)[: len(dl) * batch]
    src = ds.source
    return [{"path": os.path.join(src.root, src.rel_paths[pos]), "label": int(src.labels[pos]), "pos": int(pos),
             "seed": int(seed)} for pos, seed in keys]


class RaySamples:
    """The per-sample work of ``SplitDataset.__getitem__`` (train, rgb) for a batch of rows, with
    our functions; a callable object so Ray pickles only the few settings it needs."""

    def __init__(self, ds):
        cfg = ds.cfg
        self.size, self.scale, self.ratio, self.hflip = cfg.image_size, cfg.crop_scale, cfg.crop_ratio, cfg.hflip
        self.mean, self.std = ds.mean, ds.std

    def __call__(self, rows: dict) -> dict:
        from trainables.data.folders import load_rgb
        from trainables.data.transforms import apply_view, encode, sample_view

        images = []
        for path, seed in zip(rows["path"], rows["seed"]):
            img = load_rgb(str(path))  # the full image: training crops are cut from it
            h, w = img.shape[-2:]
            view = sample_view(h, w, self.scale, self.ratio, self.hflip, int(seed))
            (img,) = apply_view(view, self.size, img)
            images.append(encode(img, "rgb", self.mean, self.std).numpy())
        return {"image": np.stack(images), "label": rows["label"], "pos": rows["pos"]}


def ray_epoch_rate(ds, rows: list[dict], batch: int) -> tuple[float, torch.Tensor, list[int]]:
    import ray.data

    t0, n, first, first_pos = time.perf_counter(), 0, None, None
    pipe = ray.data.from_items(rows).map_batches(RaySamples(ds), batch_size=batch, batch_format="numpy")
    for b in pipe.iter_torch_batches(batch_size=batch, drop_last=True):
        if first is None:
            first, first_pos = b["image"][:2].clone(), [int(p) for p in b["pos"][:2]]
        n += len(b["image"])
    return n / (time.perf_counter() - t0), first, first_pos


def same_as_dataset(ds, rows: list[dict], images: torch.Tensor, positions: list[int]) -> bool:
    seed = {r["pos"]: r["seed"] for r in rows}
    return all(torch.equal(img, ds[(p, seed[p])]["image"]) for img, p in zip(images, positions))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--root", default=None, help="where the JPEG folder is written (default: the node cache)")
    p.add_argument("--workers", type=int, default=None, help="loader processes of the pipeline (default: sized "
                   "for a GPU worker holding all CPUs)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=2, help="epochs per side, alternating")
    p.add_argument("--json", default=None)
    p.add_argument("--ray-data", action="store_true", help="also time a Ray Data pipeline doing the same work")
    p.add_argument("--cpus", type=int, default=None, help="ray.init(num_cpus=...) for --ray-data (default: this "
                   "machine's CPUs)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the training process's own threads: it only collects batches here
    cuda = torch.cuda.is_available()
    cpus = len(os.sched_getaffinity(0))
    workers = args.workers if args.workers is not None else default_workers(LoaderConfig(), cpus, False, cuda=True)
    root = write_folder(args.root or os.path.join(local_root(), "bench", f"jpeg-folder-{args.images}"), args.images)
    ds = build_dataset(DataConfig(name="imagefolder", root=root, image_size=224, val_per_class=0, hflip=True,
                                  crop_scale=(0.08, 1.0)), "train", train=True)
    rates: dict[int | str, list[float]] = {0: [], workers: []}
    firsts = {}
    sides: list[int | str] = [0, workers]
    if args.ray_data:
        import ray

        ray_cpus = args.cpus or cpus
        t0 = time.perf_counter()
        # address="local": a fresh instance of our own, never another job's cluster on this machine.
        ray.init(address="local", num_cpus=ray_cpus, include_dashboard=False)
        ray_init_s = time.perf_counter() - t0
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-execution INFO lines between ours
        if __name__ != "__main__":  # imported (not run): Ray's workers cannot import this file by name
            ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        rows = ray_rows(ds, args.batch, epoch=1)
        cold, _, _ = ray_epoch_rate(ds, rows, args.batch)
        print(f"  ray.init: {ray_init_s:.1f} s; first (cold) Ray Data epoch: {cold:7.1f} images/s (not counted)")
        rates["ray_data"] = []
        sides.append("ray_data")
    try:
        for rep in range(args.reps):
            for w in (sides if rep % 2 == 0 else sides[::-1]):
                if w == "ray_data":
                    r, first, first_pos = ray_epoch_rate(ds, rows, args.batch)
                    print(f"  ray data:  {r:7.1f} images/s")
                else:
                    r, first = epoch_rate(ds, w, args.batch, cuda, epoch=1)
                    print(f"  workers={w}: {r:7.1f} images/s")
                rates[w].append(r)
                firsts[w] = first
    finally:
        if args.ray_data:
            ray.shutdown()
    same = torch.equal(firsts[0], firsts[workers])
    base, ours = statistics.median(rates[0]), statistics.median(rates[workers])
    out = {"images": len(ds), "cpus": cpus, "cuda": cuda, "batch": args.batch, "workers": workers,
           "images_per_s_workers0": base, "images_per_s_pipeline": ours, "ratio": ours / base,
           "rates": {str(k): v for k, v in rates.items()}, "same_batches": same,
           "torch": torch.__version__}
    print(f"RESULT: {ours:.1f} images/s with {workers} loader processes vs {base:.1f} with num_workers=0: "
          f"{ours / base:.2f}x ({cpus} CPUs; identical batches: {same})")
    if args.ray_data:
        rd = statistics.median(rates["ray_data"])
        rd_same = same_as_dataset(ds, rows, firsts["ray_data"], first_pos)
        same = same and rd_same
        out.update(images_per_s_ray_data=rd, ray_data_ratio_to_workers0=rd / base, ray_data_ratio_to_pipeline=rd / ours,
                   ray_data_same_samples=rd_same, ray_cpus=ray_cpus, ray_init_s=ray_init_s,
                   ray_data_cold_images_per_s=cold, ray=ray.__version__)
        print(f"RESULT: {rd:.1f} images/s with Ray Data ({ray_cpus} CPUs): {rd / base:.2f}x num_workers=0, "
              f"{rd / ours:.2f}x the {workers}-process pipeline (same samples as the Dataset: {rd_same}; "
              f"ray.init {ray_init_s:.1f} s and a cold first epoch at {cold:.1f} images/s not counted)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
