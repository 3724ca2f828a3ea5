"""The distillation loop that runs on every Ray Train worker (and, unchanged, in a bare process).

``train_loop_per_worker`` is the Ray Train V2 entry point; it only adapts Ray's context to
:func:`fit`, which holds the loop. ``fit`` takes a :class:`Hooks` object (prepare model / loader,
report, latest checkpoint) so the same code runs under Ray Train, in tests and in the
orchestration-overhead benchmark without Ray.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

_IMPORT_START = time.time()  # start-up breakdown: what importing the training code costs a fresh worker

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.checkpoint import load_checkpoint, save_checkpoint
from trainables.config import TrainConfig
from trainables.data import build_dataset, dataset_info
from trainables.data.base import family
from trainables.data.loader import default_workers, eval_loader, train_loader
from trainables.explainers import explain
from trainables.losses import E2KDLoss
from trainables.metrics import MetricSet
from trainables.models import build_model, unwrap
from trainables.teacher import load_teacher


class NonFiniteLossError(RuntimeError):
    """Raised when the loss becomes NaN/Inf: the trial fails with this reason instead of reporting
    NaN metrics that a searcher would rank."""


@dataclass
class Hooks:
    """What the environment provides to :func:`fit`. Defaults: one local process, no reporting."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    prepare_model: Callable[[nn.Module], nn.Module] = lambda m: m
    cpus: float = 1.0  # CPUs this worker holds (sizes the loader: LoaderConfig.workers)
    # time.time() when the trial asked for its workers (the driver's trainer.fit()): start-up is
    # measured from there. None: from the call to fit().
    submitted_at: float | None = None
    # Epochs that must end with a checkpoint whatever the cadence: where the scheduler may stop the
    # trial (ASHA's rungs), so the logged student is the one its last metrics describe.
    checkpoint_at: frozenset[int] = frozenset()
    # report(metrics, checkpoint_dir or None); every rank calls it (Ray requires all ranks to report).
    report: Callable[[dict, str | None], None] = lambda metrics, ckpt_dir: None
    latest_checkpoint: Callable[[], "contextlib.AbstractContextManager[str | None]"] = (
        lambda: contextlib.nullcontext(None))
    log: Callable[[str], None] = print


# ------------------------------------ building blocks ---------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def build_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int):
    """Linear warm-up for ``warmup_epochs``, then cosine decay to 0, stepped every iteration."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = cfg.optim.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.optim.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def adaptive_clip_(parameters, clip: float, eps: float = 1e-3) -> None:
    """Adaptive gradient clipping (Brock et al. 2021), unit-wise: g <- g * min(1, clip·max(‖w‖, eps)/‖g‖).
    The B-cos recipe uses it instead of a global norm clip."""
    for p in parameters:
        if p.grad is None:
            continue
        dims = tuple(range(1, p.dim())) if p.dim() > 1 else None
        w_norm = p.detach().norm(dim=dims, keepdim=True) if dims else p.detach().norm()
        g_norm = p.grad.norm(dim=dims, keepdim=True) if dims else p.grad.norm()
        max_norm = clip * w_norm.clamp_min(eps)
        p.grad.mul_(torch.where(g_norm > max_norm, max_norm / g_norm.clamp_min(1e-6), torch.ones_like(g_norm)))


def autocast_context(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on CUDA when ``precision`` is bf16; full precision otherwise (fp32, or CPU)."""
    use = device.type == "cuda" and cfg.precision == "bf16"
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use else contextlib.nullcontext()


def teacher_targets(teacher: nn.Module, x: Tensor, explainer: str, need_maps: bool) -> tuple[Tensor, Tensor | None]:
    """Live teacher: logits, and maps only when this step uses them. The teacher is frozen and
    explained with create_graph=False, so it builds no graph it does not need (none for the
    analytic CAM; only what its input gradient needs for B-cos)."""
    if need_maps:
        e = explain(teacher, x, None, explainer, create_graph=False)
        return e.logits.detach(), e.maps.detach()
    with torch.no_grad():
        return teacher(x), None


def _to(batch: dict, device: torch.device, channels_last: bool) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, Tensor):
            v = v.to(device, non_blocking=True)
            if k == "image" and channels_last and v.dim() == 4:
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


# ------------------------------------ evaluation --------------------------------------------


class EvalSet:
    """One evaluation split on this worker. The frozen teacher's outputs on it never change: the
    first pass keeps them on the host — logits in float32, maps at the explainer's native
    resolution (GradCAM 7x7, not 224x224) as float16 of map / max|map| — and later passes only
    explain the student. Where they would exceed ``budget_bytes`` (input-sized B-cos maps of a large
    split) nothing is kept and the teacher runs at every pass, so memory never grows with the
    split beyond what is stored."""

    def __init__(self, loader, budget_bytes: float):
        self.loader, self.budget = loader, budget_bytes
        self.stored: list[tuple[Tensor, Tensor, Tensor, Tensor]] | None = None
        self.stores = True  # decided on the first batch of the first pass

    def stored_bytes(self) -> int:
        return sum(t.nbytes for row in self.stored or () for t in row)

    def batches(self, teacher: nn.Module, cfg: TrainConfig, device: torch.device, channels_last: bool):
        """(batch on the device, teacher logits, teacher maps at native resolution, explained class)."""
        if self.stored is not None:
            for batch, (logits, q, scale, target) in zip(self.loader, self.stored):
                maps = q.to(device, non_blocking=True).float() * scale.to(device).view(-1, *[1] * (q.dim() - 1))
                yield _to(batch, device, channels_last), logits.to(device), maps, target.to(device)
            return
        keep: list | None = [] if self.stores else None
        for batch in self.loader:
            b = _to(batch, device, channels_last)
            with autocast_context(cfg, device):
                t = explain(teacher, b["image"], None, cfg.loss.explainer, create_graph=False, resize=False)
            logits, maps = t.logits.float(), t.maps.float()
            if keep is not None and not keep:
                per_sample = (logits[0].numel() * 4 + maps[0].numel() * 2 + 4 + 8)
                self.stores = per_sample * len(self.loader.sampler) <= self.budget
                keep = [] if self.stores else None
            if keep is not None:
                scale = maps.flatten(1).abs().amax(dim=1)
                safe = torch.where(scale > 0, scale, torch.ones_like(scale)).view(-1, *[1] * (maps.dim() - 1))
                keep.append((logits.cpu(), (maps / safe).half().cpu(), scale.cpu(), t.target.cpu()))
            yield b, logits, maps, t.target
        if keep is not None:
            self.stored = keep


def evaluate(student: nn.Module, teacher: nn.Module, es: EvalSet, cfg: TrainConfig, device: torch.device,
             channels_last: bool) -> dict[str, float]:
    """Every metric the split supports, summed locally then all-reduced once across workers.

    The student runs unwrapped: workers hold shards of different lengths, and a DDP forward
    (buffer broadcast) on one worker's extra batch would wait forever for the others."""
    info = dataset_info(cfg.data)
    ms = MetricSet.build(exp_sim=True, num_groups=info.num_groups if info.has_groups else 0,
                         multilabel_classes=info.num_classes if info.multilabel else 0, localisation=info.has_boxes)
    student = unwrap(student).eval()
    for b, t_logits, t_maps, t_target in es.batches(teacher, cfg, device, channels_last):
        with autocast_context(cfg, device):
            s = explain(student, b["image"], t_target, cfg.loss.explainer, create_graph=False)
        contrib, masks = (localisation_inputs(student, b, cfg) if info.has_boxes else (None, None))
        ms.update(logits=s.logits.float(), labels=b["label"], teacher_logits=t_logits,
                  maps=s.maps.float(), teacher_maps=t_maps, groups=b.get("group"),
                  contrib_maps=contrib, box_masks=masks)
    ms.all_reduce()
    return ms.compute()


def due(split: str, epoch: int, cfg: TrainConfig, select: str) -> bool:
    """Is ``split`` evaluated after ``epoch``? Always at the last epoch; the split trials are
    selected on every ``eval.val_every`` epochs, the others every ``eval.test_every`` (0: only at
    the end)."""
    every = cfg.eval.val_every if split == select else cfg.eval.test_every
    return epoch == cfg.epochs or (every > 0 and epoch % every == 0)


def sync_batchnorm(model: nn.Module, cfg: TrainConfig, world_size: int, device: torch.device,
                   log: Callable[[str], None]) -> nn.Module:
    """SyncBatchNorm when one student's batch is split over several workers (``cfg.sync_bn``).

    Only PyTorch's own BatchNorm layers are converted: B-cos models use an uncentred BatchNorm
    subclass whose maths SyncBatchNorm would replace."""
    if cfg.sync_bn is False or world_size == 1:
        return model
    plain = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    custom = sorted({type(m).__name__ for _, m in norms if type(m) not in plain})
    why = ("PyTorch's SyncBatchNorm runs on GPUs only" if device.type != "cuda" else
           f"{', '.join(custom)} cannot be synchronised" if custom else None)
    if why:
        if cfg.sync_bn is True:
            raise ValueError(f"sync_bn: true, but {why}; set sync_bn: auto or false, or one worker per trial")
        if norms:
            log(f"[e2kd] BatchNorm statistics stay per worker ({cfg.batch_size // world_size} of {cfg.batch_size} "
                f"images): {why}")
        return model
    for name, m in norms:
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], nn.SyncBatchNorm.convert_sync_batchnorm(m))
    return model


def localisation_inputs(student: nn.Module, b: dict, cfg: TrainConfig) -> tuple[Tensor, Tensor]:
    """EPG/IoU inputs: for every (image, present class) pair, the student's contribution map for
    that class (B-cos: sum_ch W(x)*x; standard CNNs: GradCAM) and the union mask of its boxes."""
    from trainables.data import box_mask

    labels = b["label"]
    img_idx, cls = (labels > 0).nonzero(as_tuple=True) if labels.dim() == 2 else (
        torch.arange(len(labels), device=labels.device), labels)
    method = "bcos_contrib" if cfg.encoding == "bcos6" else "gradcam"
    x = b["image"][img_idx]
    contrib = explain(student, x, cls, method, create_graph=False).maps.float()
    size = tuple(x.shape[-2:])
    boxes = b["boxes"].cpu()
    masks = torch.stack([box_mask(boxes[i], int(c), size) for i, c in zip(img_idx.tolist(), cls.tolist())])
    return contrib, masks.to(contrib.device)


def explanation_grid(student: nn.Module, teacher: nn.Module, images: Tensor, cfg: TrainConfig, path: str) -> None:
    """PNG: rows of (image, teacher map, student map) for fixed validation samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    student.eval()
    t = explain(teacher, images, None, cfg.loss.explainer, create_graph=False)
    s = explain(student, images, t.target, cfg.loss.explainer, create_graph=False)

    def show_map(m: Tensor, x: Tensor) -> np.ndarray:
        # B-cos W(x) has 6 channels: show the contribution map sum_ch W(x)*x, as the B-cos papers do.
        return ((m * x).sum(0) if m.dim() == 3 else m).float().cpu().numpy()

    def show_img(x: Tensor) -> np.ndarray:
        x = x.float().cpu()
        x = x[:3] if x.shape[0] == 6 else x  # B-cos encoding: first 3 channels are the image
        x = (x - x.min()) / (x.max() - x.min() + 1e-8)
        return x.permute(1, 2, 0).numpy()

    n = images.shape[0]
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
    for i in range(n):
        cos = F.cosine_similarity(t.maps[i].flatten().float(), s.maps[i].flatten().float(), dim=0).item()
        for ax, im, title in ((axes[i, 0], show_img(images[i]), f"class {int(t.target[i])}"),
                              (axes[i, 1], show_map(t.maps[i], images[i]), "teacher"),
                              (axes[i, 2], show_map(s.maps[i], images[i]), f"student cos={cos:.2f}")):
            ax.imshow(im, cmap=None if im.ndim == 3 else "inferno")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ------------------------------------ where the time goes ----------------------------------


class Stopwatch:
    """Wall-clock phases of a trial, reported as metrics (``startup_*_s`` once, ``*_time_s`` per
    epoch) so that MLflow and the sweep's summary show where a trial's time goes."""

    def __init__(self, origin: float):
        self.origin, self.mark, self.startup = origin, time.time(), {}

    def lap(self, name: str) -> None:
        now = time.time()
        self.startup[f"startup_{name}_s"] = now - self.mark
        self.mark = now

    def startup_metrics(self) -> dict[str, float]:
        """Phases so far, and ``startup_s``: from the request for workers to the first batch."""
        return {**self.startup, "startup_s": time.time() - self.origin}


class Cadence:
    """Which epochs write a checkpoint and the explanation grid (``checkpoint_every``,
    ``explain_every``); both always at the last epoch.

    ``checkpoint_every: auto`` writes one whenever the last one cost at most 5 % of the training
    time since it, so on real epochs (minutes) every epoch is checkpointed and on toy epochs the
    checkpoint does not dominate them. A failure loses at most the epochs since the last
    checkpoint: one epoch, or ~20x a checkpoint's cost of training."""

    SHARE = 0.05

    def __init__(self, cfg: TrainConfig, always: frozenset[int] = frozenset()):
        self.cfg, self.always, self.cost, self.since = cfg, always, 0.0, 0.0

    def grid(self, epoch: int) -> bool:
        every = self.cfg.explain_every
        return epoch == self.cfg.epochs or (every > 0 and epoch % every == 0)

    def checkpoint(self, epoch: int, epoch_time: float) -> bool:
        self.since += epoch_time
        every = self.cfg.checkpoint_every
        if epoch == self.cfg.epochs or epoch in self.always or self.grid(epoch):  # the grid travels in one
            return True
        if every == "auto":
            return self.cost <= self.SHARE * self.since
        return epoch % every == 0

    def wrote(self, cost: float) -> None:
        self.cost, self.since = cost, 0.0


# ------------------------------------ the loop ----------------------------------------------


def build_train_set(cfg: TrainConfig, teacher_sha: str):
    if cfg.teacher.mode == "cached":
        from trainables.data.cache import CachedTeacherDataset, open_cache

        base = build_dataset(cfg.data, "train", encoding=cfg.encoding, train=False)
        cache = open_cache(cfg.teacher.cache_dir, expect={
            "teacher_sha256": teacher_sha, "explainer": cfg.loss.explainer,
            "fingerprint": dataset_info(cfg.data).fingerprint})
        check_map_side(cache, cfg.teacher.cache_map_side)
        return CachedTeacherDataset(base, cache, cfg.data)
    return build_dataset(cfg.data, "train", encoding=cfg.encoding, train=True)


def check_map_side(cache, side: int | None) -> None:
    """The cache holds maps at the resolution ``teacher.cache_map_side`` asks for (a 56 px cache
    under a full-resolution spec would silently train against blurred targets)."""
    from trainables.data.cache import CacheError, stored_map_shape

    man = cache.manifest
    native = man.get("native_map_shape")
    want = list(stored_map_shape(tuple(native), side)) if native else None
    if want is not None and list(man["map_shape"]) != want:
        raise CacheError(f"cache {cache.path} stores maps at {man['map_shape']} (native {native}), but "
                         f"teacher.cache_map_side={side!r} needs {want}; rebuild the cache with "
                         f"max_map_side={side!r} or set teacher.cache_map_side to match")


def fit(cfg: TrainConfig, hooks: Hooks | None = None) -> dict[str, float]:
    """Train one student by (e²)KD; returns the last epoch's metrics."""
    h = hooks or Hooks()
    clock = Stopwatch(h.submitted_at or time.time())
    if h.submitted_at:
        # Importing the training code (when this process had not yet), and everything else between
        # the request and here: Ray placing and starting the worker group, the torch process group.
        imports = max(0.0, _IMPORTED - max(_IMPORT_START, h.submitted_at))
        clock.startup.update(startup_import_s=imports, startup_workers_s=clock.mark - h.submitted_at - imports)
    device = h.device
    channels_last = cfg.channels_last and device.type == "cuda"
    seed_everything(cfg.seed)
    info = dataset_info(cfg.data)

    # The teacher is frozen: eval mode, no parameter gradients, never wrapped in DDP.
    teacher, card = load_teacher(cfg.teacher.path)
    if card.arch != cfg.teacher.arch:
        raise ValueError(f"teacher.arch is {cfg.teacher.arch!r} but {cfg.teacher.path} holds a {card.arch!r} teacher")
    if card.num_classes != info.num_classes:
        raise ValueError(f"the teacher in {cfg.teacher.path} has {card.num_classes} classes, data "
                         f"{cfg.data.name!r} has {info.num_classes}")
    teacher = teacher.to(device).eval().requires_grad_(False)
    clock.lap("teacher")
    student = build_model(cfg.student, info.num_classes, cfg.student_weights)
    student = sync_batchnorm(student, cfg, h.world_size, device, h.log).to(device)
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)
    student = h.prepare_model(student)  # DDP + device placement under Ray Train
    clock.lap("model")

    if cfg.batch_size % h.world_size:
        raise ValueError(f"batch_size={cfg.batch_size} does not split evenly over {h.world_size} workers")
    per_worker_batch = cfg.batch_size // h.world_size
    cuda = device.type == "cuda"
    workers = default_workers(cfg.loader, h.cpus, family(cfg.data).in_memory, cuda)
    loader = train_loader(build_train_set(cfg, card.sha256), per_worker_batch, seed=cfg.seed, rank=h.rank,
                          world=h.world_size, cfg=cfg.loader, workers=workers, cuda=cuda)
    eval_splits = cfg.eval_splits or info.eval_splits
    # The split the search ranks trials on: validation, or the only split there is.
    select = info.val_split if info.val_split in eval_splits else eval_splits[0]
    eval_sets = {s: EvalSet(eval_loader(build_dataset(cfg.data, s, encoding=cfg.encoding, train=False),
                                        max(per_worker_batch, 64), rank=h.rank, world=h.world_size, cfg=cfg.loader,
                                        workers=workers, cuda=cuda), cfg.eval.teacher_targets_gib * 2**30)
                 for s in eval_splits}
    h.log(f"[e2kd] {h.world_size} worker(s) x batch {per_worker_batch}, {workers} loader process(es) per worker, "
          f"{torch.get_num_threads()} torch thread(s)")

    opt = build_optimizer(cfg, student)
    sched = build_scheduler(cfg, opt, len(loader))
    loss_fn = E2KDLoss(cfg.loss)
    start_epoch, step = 1, 0
    with h.latest_checkpoint() as ckpt_dir:
        if ckpt_dir:
            state = load_checkpoint(ckpt_dir)
            unwrap(student).load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start_epoch, step = state["epoch"] + 1, state["step"]
            h.log(f"[e2kd] resumed from checkpoint at epoch {state['epoch']} (step {step})")

    # Fixed validation images for the explanation PNG (same ones every epoch and every trial).
    grid_split = "val" if "val" in info.splits else eval_splits[0]
    grid_set = build_dataset(cfg.data, grid_split, encoding=cfg.encoding, train=False)
    grid_images = torch.stack([grid_set[i]["image"] for i in range(min(cfg.explain_samples, len(grid_set)))]).to(device)

    clock.lap("data")
    startup = clock.startup_metrics()
    cadence = Cadence(cfg, h.checkpoint_at)
    report_time = 0.0
    metrics: dict[str, float] = {}
    last_eval: dict[str, dict[str, float]] = {}  # per split: its latest metrics, with the epoch they are from
    for epoch in range(start_epoch, cfg.epochs + 1):
        # Reseed per (epoch, rank): a resumed run draws the same augmentations as an uninterrupted one.
        seed_everything(cfg.seed * 100003 + epoch * 101 + h.rank)
        loader.sampler.set_epoch(epoch)
        student.train()
        t0, c0 = time.perf_counter(), time.process_time()
        sums = {"loss": 0.0, "kd": 0.0, "exp": 0.0, "ce": 0.0}
        n_batches = 0
        for batch in loader:
            b = _to(batch, device, channels_last)
            x = b["image"]
            need_maps = loss_fn.explains_at(step)
            with autocast_context(cfg, device):
                if cfg.teacher.mode == "cached":
                    t_logits, t_maps = b["teacher_logits"], (b["teacher_map"] if need_maps else None)
                else:
                    t_logits, t_maps = teacher_targets(teacher, x, cfg.loss.explainer, need_maps)
                out = loss_fn(student, x, t_logits, t_maps, b.get("label"), step)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"non-finite loss {loss.item()} at epoch {epoch}, step {step} "
                    f"(kd={out['kd'].item()}, exp={out['exp'].item()}); lower optim.lr or loss.lam")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.adaptive_clip:
                adaptive_clip_(student.parameters(), cfg.optim.adaptive_clip)
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip)
            opt.step()
            sched.step()
            step += 1
            n_batches += 1
            for k in sums:
                sums[k] += float(out[k].detach())
        train_time, train_cpu = time.perf_counter() - t0, time.process_time() - c0

        metrics = {"epoch": epoch, "step": step, "lr": sched.get_last_lr()[0], "train_time_s": train_time,
                   # CPU seconds of this process (all its threads): robust to other load on a shared machine
                   "train_cpu_s": train_cpu,
                   # the previous epoch's ray.train.report: persisting its checkpoint to the run's storage
                   "report_time_s": report_time}
        if epoch == start_epoch and start_epoch == 1:
            metrics.update(startup)
        metrics.update({f"train_{k}": v / max(1, n_batches) for k, v in sums.items()})
        t1 = time.perf_counter()
        for split, es in eval_sets.items():
            # The validation split is reported every epoch (Tune's searcher and scheduler need its
            # metric each time): between passes it repeats the last one, and val_epoch says when
            # that was. A resumed run evaluates at once.
            if due(split, epoch, cfg, select) or (split == select and split not in last_eval):
                last_eval[split] = {f"{split}_{k}": v for k, v in
                                    evaluate(student, teacher, es, cfg, device, channels_last).items()}
                last_eval[split][f"{split}_epoch"] = epoch
                metrics.update(last_eval[split])
            elif split == select:
                metrics.update(last_eval[split])
        metrics["eval_time_s"] = time.perf_counter() - t1

        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            metrics.update(checkpoint_time_s=0.0, grid_time_s=0.0)
            if h.rank == 0 and cadence.checkpoint(epoch, train_time + metrics["eval_time_s"]):
                t2 = time.perf_counter()
                save_checkpoint(tmp, {"model": unwrap(student).state_dict(), "optimizer": opt.state_dict(),
                                      "scheduler": sched.state_dict(), "epoch": epoch, "step": step},
                                meta={"epoch": epoch, "metrics": metrics, "student": cfg.student,
                                      "num_classes": info.num_classes})
                metrics["checkpoint_time_s"] = time.perf_counter() - t2
                if cadence.grid(epoch):
                    explanation_grid(unwrap(student), teacher, grid_images, cfg, os.path.join(tmp, "explanations.png"))
                    metrics["grid_time_s"] = time.perf_counter() - t2 - metrics["checkpoint_time_s"]
                ckpt = tmp
            t3 = time.perf_counter()
            h.report(metrics, ckpt)
            report_time = time.perf_counter() - t3
            if ckpt:
                cadence.wrote(metrics["checkpoint_time_s"] + report_time)
        h.log("[e2kd] epoch {epoch}/{epochs} " .format(epoch=epoch, epochs=cfg.epochs) + json.dumps(
            {k: round(v, 4) for k, v in metrics.items() if k.endswith(("_acc", "_agreement", "train_loss"))}))
    return metrics


@contextlib.contextmanager
def _newest_valid_checkpoint(ck):
    """The latest registered checkpoint, or — when it is truncated or corrupt (checksum mismatch) —
    the newest older sibling that verifies. Yields a local directory."""
    import pyarrow.fs as pafs
    import ray.train

    from trainables.checkpoint import CorruptCheckpointError

    parent = os.path.dirname(ck.path.rstrip("/"))
    infos = ck.filesystem.get_file_info(pafs.FileSelector(parent))
    siblings = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                       and os.path.basename(i.path).startswith("checkpoint_") and i.path != ck.path), reverse=True)
    for candidate in [ck.path] + siblings:
        with ray.train.Checkpoint(candidate, ck.filesystem).as_directory() as d:
            try:
                load_checkpoint(d)
            except CorruptCheckpointError as e:
                print(f"[e2kd] skipping checkpoint {candidate}: {e}")
                continue
            yield d
            return
    raise CorruptCheckpointError(f"no readable checkpoint under {parent}")


def train_loop_per_worker(config: dict) -> None:
    """Ray Train V2 entry point. ``config["cfg"]`` is a TrainConfig."""
    import ray.train
    import ray.train.torch

    cfg: TrainConfig = config["cfg"]
    cpus = float(config.get("cpus_per_worker", 1.0))
    ctx = ray.train.get_context()
    # Intra-op threads: the CPUs this worker holds less its loader processes (E2KD_TORCH_THREADS
    # overrides). Too many threads on a shared node stall each other.
    device = ray.train.torch.get_device()
    workers = default_workers(cfg.loader, cpus, family(cfg.data).in_memory, device.type == "cuda")
    threads = os.environ.get("E2KD_TORCH_THREADS") or max(1, math.floor(cpus) - workers)
    torch.set_num_threads(int(threads))

    @contextlib.contextmanager
    def latest_checkpoint():
        ck = ray.train.get_checkpoint()
        if ck is None:
            yield None
            return
        with contextlib.ExitStack() as stack:
            yield stack.enter_context(_newest_valid_checkpoint(ck))

    def report(metrics: dict, ckpt_dir: str | None) -> None:
        ck = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        ray.train.report(metrics, checkpoint=ck)

    hooks = Hooks(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), device=device,
                  prepare_model=ray.train.torch.prepare_model,
                  cpus=cpus, submitted_at=config.get("submitted_at"),
                  checkpoint_at=frozenset(config.get("checkpoint_at", ())),
                  report=report, latest_checkpoint=latest_checkpoint,
                  # A logger, not print: Ray Train patches print() in its workers and, when stdout is
                  # wrapped, tees it to the raw stream as well, so every line reached the driver twice.
                  log=logging.getLogger("e2kd").info if ctx.get_world_rank() == 0 else (lambda s: None))
    fit(cfg, hooks)


_IMPORTED = time.time()
