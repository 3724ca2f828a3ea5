"""Everything to check and time on a lent GPU, in one run (one H200 for ~6 minutes).

The one command for the GPU machine (results in $OUT/gpu.json, section in bench/README.md there):

    python bench/gpu.py --json $OUT/gpu.json --readme bench/README.md

Only $OUT comes back from that machine: write the same README section here from the JSON with

    python bench/gpu.py --from-json gpu.json --readme bench/README.md

Parts, in order of value; each prints a one-line estimate first, and a part that would end after
``--budget-s`` (default 450 s) is skipped with a message. Each part catches its own exceptions, and
the JSON (and README section) is rewritten after every part, so a run killed from outside keeps
what it measured.

1. Correctness, on the same batch and the same weights (random init, BN statistics calibrated on
   the batch pool, eval-mode BN; the images on which the teacher's top-1 is most decisive):
   - CPU float32 (contiguous) vs the device in float32 with channels_last (TF32 off): the loss, and
     every student gradient measured against a CPU float64 pass, for kd, e2kd_analytic (GradCAM,
     analytic CAM), e2kd_autograd (GradCAM through autograd, student double backward), bcos_kd and
     bcos_e2kd (B-cos W(x), double backward); the explanation term's share of the gradient must
     dwarf the device's error (so the comparison is not vacuous);
   - analytic vs autograd GradCAM: the same loss and gradients (they are the same function);
   - bf16 autocast (``trainables.train_loop.autocast_context``, what ``fit`` uses on CUDA) vs float32
     on the device: the loss is close, gradients finite (their cosine to fp32 is printed only).
   The step is the training loop's own: ``teacher_targets`` (live teacher) -> ``E2KDLoss`` ->
   backward, with channels_last models and inputs as ``fit`` makes them on CUDA.
2. DDP sanity (>= 2 GPUs, else skipped with a message): 2 NCCL processes, the e²KD-GradCAM loss on
   half a batch each; in float64 the all-reduced gradients equal one process's on the whole batch;
   then one bf16-autocast channels_last step through DDP (finite).
3. Timing on one device (``bench/step.py``'s variants, step function and interleaved medians):
   steps/s and images/s of kd, e2kd_analytic, e2kd_autograd, bcos_kd, bcos_e2kd at 224 px, batch
   64, ResNet-34 -> ResNet-18 and B-cos ResNet-34 -> B-cos ResNet-18, with bf16 autocast +
   channels_last (the training default on CUDA) and in float32 (TF32 as PyTorch defaults); e²KD/KD
   images/s ratios (goal: >= 0.95) and our KD images/s over torchdistill's ~540 img/s per GPU for KD
   ResNet-34 -> ResNet-18 on ImageNet (an anchor from a different GPU and a full training pipeline,
   not a like-for-like comparison).
4. Peak GPU memory per variant and config: each variant alone (its teacher, student, optimizer
   state, two steps), ``max_memory_allocated`` after ``reset_peak_memory_stats``, in GiB.
5. Data-parallel throughput on all GPUs: N = ``torch.cuda.device_count()`` NCCL processes, each a
   full per-GPU batch through a DDP-wrapped student, the same step as part 3, kd and e2kd_analytic
   in bf16 + channels_last; images/s in total and per GPU, scaling efficiency against part 3's
   1-GPU number. With one GPU: "all GPUs = 1", part 3's number only.
6. Loader throughput: ``bench/loader.py --images 4000 --json ...`` as a time-boxed subprocess (if
   the script exists); its JSON goes into the results as is.

    python bench/gpu.py                              # GPU machine: all of the above
    python bench/gpu.py --device cpu --size 64       # CPU smoke test of part 1 (no GPU needed)
    python bench/gpu.py --device cpu --size 64 --check-batch 2 --num-classes 10 --threads 1 \
        --ddp-cpu --time --batch 2 --steps 1 --warmup 0   # every code path on the CPU (gloo DDP)

Without a CUDA device (and without ``--device cpu``) it prints "no CUDA device: nothing to do" and
exits 0. Exit status 1 when a correctness check fails (the other parts still run and are printed).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import torch
from torch import Tensor, nn

from trainables.config import TeacherConfig, TrainConfig
from trainables.explainers import bcos_encode
from trainables.losses import E2KDLoss, LossConfig
from trainables.train_loop import autocast_context, teacher_targets

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_step_bench():
    """bench/step.py (variants, step functions, timing loop), imported by path."""
    spec = importlib.util.spec_from_file_location("e2kd_bench_step", os.path.join(HERE, "step.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


step_bench = _load_step_bench()
VARIANTS = list(step_bench.ALL)  # kd, e2kd_analytic, e2kd_autograd, bcos_kd, bcos_e2kd


# ------------------------------------ helpers -----------------------------------------------


@contextlib.contextmanager
def no_tf32():
    """Full float32 on CUDA for the CPU comparison (TF32 convolutions/matmuls differ by ~1e-3)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@torch.no_grad()
def calibrate_bn(model: nn.Module, x: Tensor) -> None:
    """Set BN running statistics from one batch (cumulative average), then eval: default running
    stats make a deep random net's logits ~0 and its maps degenerate."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()(x)
    for bn in bns:
        bn.momentum = 0.1
    model.eval()


@torch.no_grad()
def decisive(teacher: nn.Module, pool: Tensor, k: int) -> Tensor:
    """The k images of ``pool`` with the largest top-1 - top-2 margin of the teacher's logits.

    Random-init 1000-class nets are near ties; bf16 rounding then flips the teacher's top-1 on some
    images, so the explained class (and its map) changes and the comparison says nothing about
    bf16 arithmetic. On decisive images both precisions explain the same class."""
    top2 = teacher(pool).float().topk(2, dim=1).values
    return pool[(top2[:, 0] - top2[:, 1]).argsort(descending=True)[:k].sort().values]


def train_config(variant: str) -> TrainConfig:
    """The TrainConfig a trial of this variant would have (precision bf16, channels_last)."""
    bcos = variant.startswith("bcos")
    explainer = {"e2kd_autograd": "gradcam_autograd"}.get(variant, "bcos_weight" if bcos else "gradcam")
    lam = 0.0 if variant in ("kd", "bcos_kd") else 1.0
    return TrainConfig(student="bcos_resnet18" if bcos else "resnet18",
                       teacher=TeacherConfig(arch="bcos_resnet34" if bcos else "resnet34"),
                       loss=LossConfig(temperature=1.0, lam=lam, explainer=explainer), precision="bf16",
                       channels_last=True)


def loss_and_grads(student: nn.Module, teacher: nn.Module, cfg: TrainConfig, x: Tensor,
                   amp_ctx=contextlib.nullcontext) -> tuple[dict[str, float], list[Tensor]]:
    """One training-loop step up to backward (no optimizer step): live teacher targets, E2KDLoss."""
    loss_fn = E2KDLoss(cfg.loss)
    student.zero_grad(set_to_none=True)
    with amp_ctx():
        t_logits, t_maps = teacher_targets(teacher, x, cfg.loss.explainer, loss_fn.explains_at(0))
        out = loss_fn(student, x, t_logits, t_maps, None, 0)
    out["loss"].backward()
    grads = [p.grad.detach().float().cpu().clone() if p.grad is not None else torch.zeros(p.shape)
             for p in student.parameters()]
    student.zero_grad(set_to_none=True)
    return {k: float(out[k].detach().float()) for k in ("loss", "kd", "exp")}, grads


def rel_err(a: list[Tensor], b: list[Tensor]) -> float:
    """||a - b|| / ||b|| over all gradients together."""
    num = sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(a, b))
    den = sum(float(y.double().pow(2).sum()) for y in b)
    return (num / max(den, 1e-300)) ** 0.5


def cosine(a: list[Tensor], b: list[Tensor]) -> float:
    dot = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))
    na = sum(float(x.double().pow(2).sum()) for x in a) ** 0.5
    nb = sum(float(y.double().pow(2).sum()) for y in b) ** 0.5
    return dot / max(na * nb, 1e-300)


def finite(grads: list[Tensor]) -> bool:
    return all(bool(torch.isfinite(g).all()) for g in grads)


def _bench_args(args, device: str, amp: str, channels_last: bool, batch: int, size: int, *, steps: int | None = None,
                warmup: int | None = None, variants: list[str] | None = None) -> argparse.Namespace:
    """bench/step.py's arguments for one run of its variants."""
    return argparse.Namespace(device=device, threads=args.threads, amp=amp, channels_last=channels_last,
                              variants=list(variants or VARIANTS), size=size, batch=batch,
                              steps=args.steps if steps is None else steps,
                              warmup=args.warmup if warmup is None else warmup,
                              num_classes=args.num_classes, profile=[], profile_rows=25)


class Checks:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.rows.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)

    @property
    def ok(self) -> bool:
        return all(r["ok"] for r in self.rows)


# ------------------------------------ 1. correctness ----------------------------------------


def correctness(args, device: torch.device, checks: Checks) -> dict:
    """CPU fp32 vs device fp32 + channels_last (both measured against CPU float64), analytic vs
    autograd CAM, bf16 autocast vs fp32 on the device."""
    print(f"\n== 1. correctness: CPU float32 vs {device} float32 channels_last, then bf16 autocast "
          f"(batch {args.check_batch}, {args.size} px, {args.num_classes} classes) ==", flush=True)
    cpu = torch.device("cpu")
    # Same weights everywhere: bench/step.py builds every variant on the CPU (seeded), the device
    # copies are deep copies of those.
    variants = step_bench.build_variants(_bench_args(args, "cpu", "none", False, args.check_batch, args.size), cpu,
                                         list(VARIANTS))
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(4 * args.check_batch, 3, args.size, args.size, generator=g)
    pools = {"standard": (rgb - 0.45) / 0.225, "bcos": bcos_encode(rgb)}
    batches: dict[str, Tensor] = {}
    for v in variants:
        # BN statistics from the pool: teachers (shared by a family's variants) and students run in
        # eval mode here. Train-mode BN on a few images is ill-conditioned (its backward cancels),
        # which alone made fp32 gradients differ by ~1e-2 between memory formats on the CPU.
        if v.family not in batches:
            calibrate_bn(v.teacher, pools[v.family])
            v.teacher.requires_grad_(False)
            batches[v.family] = decisive(v.teacher, pools[v.family], args.check_batch)
        calibrate_bn(v.student, pools[v.family])

    is_cuda = device.type == "cuda"
    if is_cuda:
        bf16_ctx = lambda cfg: (lambda: autocast_context(cfg, device))  # noqa: E731  what fit() uses
    else:
        # autocast_context is full precision off CUDA by design; exercise the same bf16 comparison
        # on the CPU with torch's CPU autocast so the smoke test covers the code path.
        with autocast_context(train_config("kd"), device) as c:
            checks.add("autocast_context on CPU is a no-op", c is None, "full precision off CUDA, as fit() expects")
        bf16_ctx = lambda cfg: (lambda: torch.autocast("cpu", dtype=torch.bfloat16))  # noqa: E731

    results: dict[str, dict] = {}
    grads64: dict[str, list[Tensor]] = {}
    for v in variants:
        cfg = train_config(v.name)
        assert cfg.loss.explainer == v.cfg.explainer and cfg.loss.lam == v.cfg.lam, (v.name, cfg.loss, v.cfg)
        x = batches[v.family]
        t0 = time.perf_counter()
        # float64 CPU pass: the yardstick. A deep random net amplifies rounding in its backward, so
        # how far fp32 gradients may be from exact depends on the configuration; the device must be
        # about as close to float64 as the CPU's own fp32 is (and within --grad-rtol anyway).
        r64, g64 = loss_and_grads(copy.deepcopy(v.student).double(), copy.deepcopy(v.teacher).double(), cfg,
                                  x.double())
        ref, g_ref = loss_and_grads(v.student, v.teacher, cfg, x)
        s_dev = copy.deepcopy(v.student).to(device, memory_format=torch.channels_last)
        t_dev = copy.deepcopy(v.teacher).to(device, memory_format=torch.channels_last)
        x_dev = x.to(device).contiguous(memory_format=torch.channels_last)
        with no_tf32():
            dev, g_dev = loss_and_grads(s_dev, t_dev, cfg, x_dev)
        low, g_low = loss_and_grads(s_dev, t_dev, cfg, x_dev, bf16_ctx(cfg))
        dt = time.perf_counter() - t0
        grads64[v.name] = g64
        e_cpu, e_dev = rel_err(g_ref, g64), rel_err(g_dev, g64)
        r = {"cpu_fp64": r64, "cpu_fp32": ref, "dev_fp32": dev, "dev_bf16": low, "grad_err_cpu_fp32_vs_fp64": e_cpu,
             "grad_err_dev_fp32_vs_fp64": e_dev, "grad_err_dev_vs_cpu_fp32": rel_err(g_dev, g_ref),
             "grad_cos_bf16_vs_fp32": cosine(g_low, g_dev), "seconds": dt}
        results[v.name] = r
        loss_err = abs(dev["loss"] - ref["loss"]) / max(1e-6, abs(ref["loss"]))
        checks.add(f"{v.name}: {device} fp32 loss == CPU", loss_err <= args.loss_rtol,
                   f"loss {ref['loss']:.6g} vs {dev['loss']:.6g} (rel {loss_err:.1e}; kd {ref['kd']:.4g}, "
                   f"exp {ref['exp']:.4g})")
        tol = max(args.grad_rtol, args.grad_factor * e_cpu)
        checks.add(f"{v.name}: {device} fp32 grads == CPU", e_dev <= tol,
                   f"relative L2 error to float64: {device} {e_dev:.1e}, CPU fp32 {e_cpu:.1e} (tol {tol:.1e}); "
                   f"{device} vs CPU fp32 {r['grad_err_dev_vs_cpu_fp32']:.1e}")
        low_err = abs(low["loss"] - dev["loss"]) / max(1e-6, abs(dev["loss"]))
        low_ok = abs(low["loss"] - dev["loss"]) <= args.bf16_rtol * abs(dev["loss"]) + args.bf16_atol
        checks.add(f"{v.name}: bf16 autocast loss ~ fp32", low_ok and finite(g_low),
                   f"loss {low['loss']:.6g} vs {dev['loss']:.6g} (rel {low_err:.1e}; tol {args.bf16_rtol:g} rel + "
                   f"{args.bf16_atol:g}); "
                   f"grads finite={finite(g_low)}, cosine to fp32 {r['grad_cos_bf16_vs_fp32']:.3f} (not checked)")
        if cfg.loss.lam > 0:
            checks.add(f"{v.name}: explanation term is live", ref["exp"] > 1e-4, f"exp = {ref['exp']:.4g}")
        else:
            checks.add(f"{v.name}: no explanation term", ref["exp"] == 0.0, f"exp = {ref['exp']:.4g}")

    # Not vacuous: the explanation term moves the gradient far more than the device's error.
    for name, base in (("e2kd_analytic", "kd"), ("e2kd_autograd", "kd"), ("bcos_e2kd", "bcos_kd")):
        share = rel_err(grads64[base], grads64[name])  # same initial student, same batch
        e_dev = results[name]["grad_err_dev_fp32_vs_fp64"]
        results[name]["explanation_grad_share"] = share
        checks.add(f"{name}: explanation term >> {device} error", e_dev <= 0.1 * share,
                   f"|g_e2kd - g_kd| / |g_e2kd| = {share:.2e} vs {device} error {e_dev:.1e}")

    # The analytic CAM is GradCAM for a GAP+linear head: same loss, same gradients as autograd's.
    a, b = results["e2kd_analytic"]["cpu_fp64"], results["e2kd_autograd"]["cpu_fp64"]
    err = rel_err(grads64["e2kd_analytic"], grads64["e2kd_autograd"])
    tol = max(1e-4, args.grad_factor * results["e2kd_analytic"]["grad_err_cpu_fp32_vs_fp64"])
    checks.add("GradCAM analytic == autograd (CPU float64)",
               abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(b["loss"])) and err <= tol,
               f"loss {a['loss']:.7g} vs {b['loss']:.7g}, grads relative L2 error {err:.1e} (tol {tol:.1e})")
    return results


# ------------------------------------ 2. DDP ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_init(rank: int, world: int, port: int, backend: str) -> torch.device:
    """Join the process group; NCCL: one GPU per rank, gloo: the CPU with one thread per rank."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world)
    return device


def _spawn(fn, args: tuple, nprocs: int, timeout_s: float) -> None:
    """torch.multiprocessing.spawn with a deadline: a hung collective must not hang the whole run
    (the lent GPU call is time-limited); the ranks are killed and the part reports a TimeoutError."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):  # raises if a rank failed
        if time.monotonic() >= deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            raise TimeoutError(f"{nprocs} processes still running after {timeout_s:.0f} s: killed")


def _ddp_worker(rank: int, world: int, port: int, backend: str, size: int, batch: int, num_classes: int,
                out_path: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from trainables.models import build_model

    device = _dist_init(rank, world, port, backend)
    try:
        torch.manual_seed(0)
        teacher, student = build_model("resnet34", num_classes), build_model("resnet18", num_classes)
        g = torch.Generator().manual_seed(1)
        x = (torch.rand(batch * world, 3, size, size, generator=g) - 0.45) / 0.225
        calibrate_bn(teacher, x)
        calibrate_bn(student, x)  # eval-mode BN: a shard is normalised exactly like the whole batch
        teacher.requires_grad_(False)
        cfg = LossConfig(temperature=1.0, lam=1.0, explainer="gradcam")
        loss_fn = E2KDLoss(cfg)
        lo, hi = rank * batch, (rank + 1) * batch

        # float64: DDP's averaged gradients vs one process on the whole batch, without fp32 noise.
        t64, s64 = copy.deepcopy(teacher).double().to(device), copy.deepcopy(student).double().to(device)
        x64 = x.double().to(device)
        single = copy.deepcopy(s64)
        ddp = DDP(s64, device_ids=[rank] if device.type == "cuda" else None)
        t_logits, t_maps = teacher_targets(t64, x64[lo:hi], cfg.explainer, True)
        loss_fn(ddp, x64[lo:hi], t_logits, t_maps)["loss"].backward()
        flat = torch.cat([p.grad.flatten() for p in s64.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)

        # one bf16-autocast, channels_last step through DDP (what the trainer runs on CUDA)
        t32 = copy.deepcopy(teacher).to(device, memory_format=torch.channels_last)
        s32 = copy.deepcopy(student).float().to(device, memory_format=torch.channels_last)
        ddp32 = DDP(s32, device_ids=[rank] if device.type == "cuda" else None)
        x32 = x.to(device).contiguous(memory_format=torch.channels_last)[lo:hi]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = loss_fn(ddp32, x32, *teacher_targets(t32, x32, cfg.explainer, True))
        out["loss"].backward()
        bf16_finite = all(bool(torch.isfinite(p.grad).all()) for p in s32.parameters())
        if rank == 0:
            full = loss_fn(single, x64, *teacher_targets(t64, x64, cfg.explainer, True))
            full["loss"].backward()
            ref = torch.cat([p.grad.flatten() for p in single.parameters()])
            res = {"ranks_equal": max(float((gg - gathered[0]).abs().max()) for gg in gathered),
                   "rel_err_vs_single": float((gathered[0] - ref).norm() / ref.norm()),
                   "exp": float(full["exp"].detach()), "bf16_finite": bf16_finite, "bf16_loss": float(out["loss"].detach()),
                   "backend": backend, "world": world}
            with open(out_path, "w") as f:
                json.dump(res, f)
    finally:
        dist.destroy_process_group()


def ddp_check(args, backend: str, checks: Checks, timeout_s: float) -> dict | None:
    print(f"\n== 2. DDP sanity: 2 {backend} processes vs one process on the whole batch ==", flush=True)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "ddp.json")
        t0 = time.perf_counter()
        _spawn(_ddp_worker, (2, _free_port(), backend, args.size, args.check_batch // 2 or 1, args.num_classes, out),
               2, timeout_s)
        with open(out) as f:
            res = json.load(f)
    res["seconds"] = time.perf_counter() - t0
    checks.add(f"DDP ({backend}): ranks hold identical gradients", res["ranks_equal"] == 0.0,
               f"max |g_rank - g_0| = {res['ranks_equal']:.1e}")
    checks.add(f"DDP ({backend}): float64 gradients == single process", res["rel_err_vs_single"] <= 1e-9,
               f"relative L2 error {res['rel_err_vs_single']:.1e} (exp term {res['exp']:.3g})")
    checks.add(f"DDP ({backend}): bf16 autocast channels_last step finite", res["bf16_finite"],
               f"loss {res['bf16_loss']:.4g}")
    return res


# ------------------------------------ budget ------------------------------------------------

# Estimates before anything is measured: guessed ms per step on one H200 at 224 px, batch 64, bf16
# autocast + channels_last (B-cos: slower layers, and e²KD's double backward is ~2-3x its KD step).
# Once part 3 has measured a config, its medians replace these.
GUESS_MS = {"kd": 40.0, "e2kd_analytic": 42.0, "e2kd_autograd": 43.0, "bcos_kd": 90.0, "bcos_e2kd": 220.0}
CONFIG_FACTOR = {"bf16+cl": 1.0, "bf16": 1.3, "fp32+cl": 2.5, "fp32": 2.5}  # guessed cost vs bf16+cl
CONFIGS = {"bf16+cl": ("bf16", True), "bf16": ("bf16", False), "fp32+cl": ("none", True), "fp32": ("none", False)}
CPU_FACTOR = 350.0  # 1-thread CPU step vs the H200 guess (bench/README.md: kd 881 ms at 112 px, batch 16)
CORRECTNESS_S = 89.0  # measured: part 1 on the 2-core CPU box at 112 px, check batch 4, 2 threads
TORCHDISTILL_KD_IMG_S = 540.0  # torchdistill, KD ResNet-34 -> ResNet-18 on ImageNet, per GPU (our issue)
E2KD_GOAL = 0.95  # the goal: e²KD images/s within 5 % of our own KD


class Budget:
    """Wall clock of the whole run. Parts go in order of value; each is announced with an estimate,
    and one that would end after the budget is skipped (the first still runs: nothing to keep)."""

    def __init__(self, seconds: float, args, gpu: bool):
        self.t0, self.seconds, self.args, self.gpu = time.monotonic(), seconds, args, gpu
        self.measured: dict[str, dict[str, float]] = {}  # config -> variant -> median ms (part 3)
        self.skipped: dict[str, str] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def start(self, part: str, estimate_s: float, basis: str, always: bool = False) -> bool:
        print(f"\n-- {part}: estimate ~{estimate_s:.0f} s ({basis}); {self.elapsed():.0f} s of the "
              f"{self.seconds:.0f} s budget used", flush=True)
        if always or estimate_s <= self.left():
            return True
        self.skip(part, f"budget: ~{estimate_s:.0f} s needed, {max(0.0, self.left()):.0f} s left")
        return False

    def skip(self, part: str, why: str) -> None:
        self.skipped[part] = why
        print(f"== {part}: skipped ({why}) ==", flush=True)

    def step_ms(self, conf: str, variant: str) -> tuple[float, str]:
        """Expected ms per step: measured in this config, else scaled from a measured config, else guessed."""
        if variant in self.measured.get(conf, {}):
            return self.measured[conf][variant], "measured"
        for other, ms in self.measured.items():
            if variant in ms:
                return ms[variant] * CONFIG_FACTOR[conf] / CONFIG_FACTOR[other], f"scaled from measured {other}"
        a = self.args
        scale = a.batch / 64 * (a.size / 224) ** 2 * CONFIG_FACTOR[conf]
        if not self.gpu:
            scale *= CPU_FACTOR / max(1, torch.get_num_threads())
        return GUESS_MS[variant] * scale, "guessed"

    def steps_s(self, conf: str, variants: list[str], steps: int) -> tuple[float, str]:
        ms = [self.step_ms(conf, v) for v in variants]
        return steps * sum(m for m, _ in ms) / 1e3, ms[0][1]

    @property
    def setup_s(self) -> float:
        """Building models, cuDNN autotuning, first CUDA kernels: per config or process (a guess)."""
        return 10.0 if self.gpu else 2.0


def correctness_estimate(args, gpu: bool) -> float:
    """Part 1 is dominated by the CPU float64/float32 passes: scale the one measurement we have."""
    threads = max(1, torch.get_num_threads())
    est = CORRECTNESS_S * (args.size / 112) ** 2 * (args.check_batch / 4) * 2 / threads
    return est * (0.6 if gpu else 1.0)  # on a GPU the device passes leave the CPU


# ------------------------------------ 3. timing ---------------------------------------------


def throughput(rows: list[dict], batch: int) -> None:
    """Add steps/s, images/s and images/s ratios (to kd and to the family's KD) to step.py's rows."""
    ms = {r["variant"]: r["median_ms"] for r in rows}
    for r in rows:
        r["steps_per_s"] = 1e3 / r["median_ms"]
        r["images_per_s"] = batch * r["steps_per_s"]
        r["ratio_to_kd"] = r["median_ms"] / ms["kd"] if "kd" in ms else None  # time ratio, as before
        base = ms.get(r["vs"])
        # images/s ratio e²KD/KD: the goal is >= 0.95 (e²KD within 5 % of our own KD)
        r["img_s_ratio_to_family_kd"] = base / r["median_ms"] if base else None
        r["within_5pct_of_kd"] = (r["img_s_ratio_to_family_kd"] >= E2KD_GOAL
                                  if r["variant"] not in ("kd", "bcos_kd") and base else None)


def _fit_steps(budget: Budget, conf: str, warmup: int, steps: int) -> int:
    """Timed steps that fit in what is left of the budget (0: not even 3 fit)."""
    per_step, _ = budget.steps_s(conf, VARIANTS, 1)
    fit = int((budget.left() - budget.setup_s) / max(per_step, 1e-9)) - warmup
    return steps if fit >= steps else (fit if fit >= 3 else 0)


def print_timing(res: dict, conf: str) -> None:
    print(f"{'variant':<15} {'ms/step':>9} {'steps/s':>9} {'img/s':>9} {'time/kd':>8} {'img/s vs family KD':>19}")
    for r in res["rows"]:
        fam = r["img_s_ratio_to_family_kd"]
        goal = {True: " (goal met)", False: " (goal NOT met)", None: ""}[r["within_5pct_of_kd"]]
        fam_s = f"{fam:.3f} ({r['vs']}){goal}" if fam is not None else "-"
        print(f"{r['variant']:<15} {r['median_ms']:>9.1f} {r['steps_per_s']:>9.2f} {r['images_per_s']:>9.0f} "
              f"{r['ratio_to_kd']:>8.3f} {fam_s:>19}")
    kd = next(r["images_per_s"] for r in res["rows"] if r["variant"] == "kd")
    print(f"anchor [{conf}]: our KD {kd:.0f} img/s / torchdistill ~{TORCHDISTILL_KD_IMG_S:.0f} img/s per GPU = "
          f"{kd / TORCHDISTILL_KD_IMG_S:.2f} (anchor from a different GPU and a full ImageNet pipeline with data "
          f"loading: not like-for-like)")


def timing(args, device: torch.device, budget: Budget) -> list[dict]:
    out = []
    for conf in args.timing_configs:
        amp, cl = CONFIGS[conf]
        steps = _fit_steps(budget, conf, args.warmup, args.steps)
        if steps == 0:
            budget.skip(f"3. timing [{conf}]", f"budget: {max(0.0, budget.left()):.0f} s left")
            continue
        est, basis = budget.steps_s(conf, VARIANTS, args.warmup + steps)
        print(f"\n== 3. timing [{conf}]: {args.size} px, batch {args.batch}, {steps} timed steps after "
              f"{args.warmup} warm-up, medians; estimate ~{est + budget.setup_s:.0f} s ({basis}) ==", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        res = step_bench.run(_bench_args(args, str(device), amp, cl, args.batch, args.size, steps=steps))
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        throughput(res["rows"], args.batch)
        budget.measured[conf] = {r["variant"]: r["median_ms"] for r in res["rows"]}
        print_timing(res, conf)
        if peak is not None:
            print(f"peak GPU memory (all five variants' models resident): {peak:.1f} GiB")
        kd = next(r["images_per_s"] for r in res["rows"] if r["variant"] == "kd")
        res.update(config=conf, peak_gib=peak, torchdistill_anchor_img_s=TORCHDISTILL_KD_IMG_S,
                   kd_over_anchor=kd / TORCHDISTILL_KD_IMG_S,
                   anchor_note="torchdistill's KD ResNet-34 -> ResNet-18 on ImageNet, per GPU: a different GPU "
                               "and a full training pipeline, not like-for-like")
        out.append(res)
    return out


# ------------------------------------ 4. peak memory ----------------------------------------


def peak_memory(args, device: torch.device) -> dict[str, dict[str, dict]]:
    """Each variant alone (its models, optimizer state, one warm-up + one timed step): the memory a
    trial of it needs, which part 3's shared run cannot tell (all five variants resident there)."""
    gpu = device.type == "cuda"
    out: dict[str, dict[str, dict]] = {}
    print(f"\n== 4. peak memory per variant ({args.size} px, batch {args.batch}, each variant alone, 2 steps) ==")
    print(f"{'config':<9} {'variant':<15} {'peak GiB':>9}")
    for conf in args.timing_configs:
        amp, cl = CONFIGS[conf]
        for name in VARIANTS:
            t0 = time.perf_counter()
            if gpu:
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) / 2**30 if gpu else None
            try:
                step_bench.run(_bench_args(args, str(device), amp, cl, args.batch, args.size, steps=1, warmup=1,
                                           variants=[name]))
                # build_variants keeps its seeded master copy of the student too: + one set of weights
                peak = torch.cuda.max_memory_allocated(device) / 2**30 - base if gpu else None
                r = {"peak_gib": peak, "baseline_gib": base}
            except torch.cuda.OutOfMemoryError as e:  # a result, not a crash: say so and go on
                r = {"peak_gib": None, "baseline_gib": base, "error": f"out of memory: {e}"[:300]}
            r["seconds"] = time.perf_counter() - t0
            out.setdefault(conf, {})[name] = r
            print(f"{conf:<9} {name:<15} {_fmt(r['peak_gib'], '.2f'):>9}" + (f"  {r['error']}" if "error" in r else ""),
                  flush=True)
    return out


# ------------------------------------ 5. all-GPU DDP throughput -----------------------------

DDP_VARIANTS = ["kd", "e2kd_analytic"]


def _throughput_worker(rank: int, world: int, port: int, backend: str, bench: dict, out_path: str) -> None:
    """One rank: bench/step.py's kd and e2kd_analytic steps with the student DDP-wrapped, a full
    per-GPU batch each, interleaved like step.py; medians (max over ranks) to ``out_path``."""
    import statistics

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = _dist_init(rank, world, port, backend)
    try:
        bargs = argparse.Namespace(**{**bench, "device": str(device)})
        torch.backends.cudnn.benchmark = True  # as step.run does
        variants = step_bench.build_variants(bargs, device, DDP_VARIANTS)
        for v in variants:  # the optimizer holds the same parameters: DDP wraps the module in place
            v.student = DDP(v.student, device_ids=[device.index] if device.type == "cuda" else None)
        mf = torch.channels_last if bargs.channels_last else torch.contiguous_format
        g = torch.Generator().manual_seed(1 + rank)  # each rank its own batch, as a sharded loader gives
        rgb = torch.rand(bargs.batch, 3, bargs.size, bargs.size, generator=g)
        x = ((rgb - 0.45) / 0.225).to(device, memory_format=mf)
        amp = torch.bfloat16 if bargs.amp == "bf16" else None
        steps = {v.name: step_bench.make_step(v, x, amp, device) for v in variants}
        for i in range(bargs.warmup):
            for v in variants:
                steps[v.name](i)
        times: dict[str, list[float]] = {v.name: [] for v in variants}
        dist.barrier()
        for i in range(bargs.steps):
            for v in (variants if i % 2 == 0 else variants[::-1]):
                step_bench._sync(device)
                t0 = time.perf_counter()
                steps[v.name](bargs.warmup + i)  # returns the loss as a float: waits for the step
                step_bench._sync(device)
                times[v.name].append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        stats = torch.tensor([statistics.median(times[n]) for n in DDP_VARIANTS] + [peak], dtype=torch.float64,
                             device=device)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        if rank == 0:
            res = {n: {"median_ms": 1e3 * float(s)} for n, s in zip(DDP_VARIANTS, stats)}
            res["peak_gib_max_rank"] = float(stats[-1]) if device.type == "cuda" else None
            with open(out_path, "w") as f:
                json.dump(res, f)
    finally:
        dist.destroy_process_group()


def _one_device_img_s(report: dict, conf: str) -> dict[str, float]:
    """Part 3's images/s for the DDP variants in this config (the 1-GPU baseline), if measured."""
    for res in report.get("timing", []):
        if res.get("config") == conf:
            return {r["variant"]: r["images_per_s"] for r in res["rows"] if r["variant"] in DDP_VARIANTS}
    return {}


def ddp_throughput(args, backend: str, world: int, conf: str, one: dict[str, float], timeout_s: float) -> dict:
    amp, cl = CONFIGS[conf]
    res: dict = {"backend": backend, "world": world, "config": conf, "batch_per_process": args.batch,
                 "one_device_img_s": one}
    if world < 2:
        res["note"] = "all GPUs = 1: part 3's single-process number is the whole machine (no scaling measured)"
        print(f"\n== 5. data parallel: {res['note']} ==" + "".join(f"; {n} {v:.0f} img/s" for n, v in one.items()))
        return res
    print(f"\n== 5. data parallel [{conf}]: {world} {backend} processes, batch {args.batch} each, "
          f"{args.steps} timed steps after {args.warmup} warm-up ==", flush=True)
    bench = vars(_bench_args(args, "cpu", amp, cl, args.batch, args.size, variants=DDP_VARIANTS))
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "throughput.json")
        _spawn(_throughput_worker, (world, _free_port(), backend, bench, out), world, timeout_s)
        with open(out) as f:
            measured = json.load(f)
    res["peak_gib_max_rank"] = measured.pop("peak_gib_max_rank")
    print(f"{'variant':<15} {'ms/step':>9} {'img/s total':>12} {'per process':>12} {'1 device':>9} {'efficiency':>11}")
    for name, m in measured.items():
        m["images_per_s_total"] = world * args.batch * 1e3 / m["median_ms"]
        m["images_per_s_per_device"] = m["images_per_s_total"] / world
        # efficiency = per-device throughput with N processes / the same step alone on one device
        m["scaling_efficiency"] = m["images_per_s_per_device"] / one[name] if name in one else None
        res[name] = m
        print(f"{name:<15} {m['median_ms']:>9.1f} {m['images_per_s_total']:>12.0f} "
              f"{m['images_per_s_per_device']:>12.0f} {_fmt(one.get(name), '.0f'):>9} "
              f"{_fmt(m['scaling_efficiency'], '.3f'):>11}")
    return res


# ------------------------------------ 6. loader ---------------------------------------------


def _numbers(obj, prefix: str = "") -> list[tuple[str, float]]:
    """(dotted key, value) of every images/s-looking number in the loader's JSON (its layout is the
    loader's own; this only picks what to show in the table)."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and any(
                    t in str(k).lower() for t in ("per_s", "img_s", "images_s", "throughput")):
                found.append((key, float(v)))
            else:
                found += _numbers(v, key)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            label = next((str(v[k]) for k in ("name", "pipeline", "label", "workers", "num_workers")
                          if isinstance(v, dict) and isinstance(v.get(k), (str, int))), str(i))
            found += _numbers(v, f"{prefix}[{label}]")
    return found


def loader(args, timeout_s: float) -> dict:
    """bench/loader.py as a subprocess in its own process group (its DataLoader workers die with it)."""
    script = args.loader_script
    if not os.path.exists(script):
        return {"skipped": f"{os.path.relpath(script)} not found"}
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "loader.json")
        cmd = [sys.executable, script, "--images", str(args.loader_images), "--json", out]
        print(f"$ {' '.join(cmd)}  (timeout {timeout_s:.0f} s)", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
            return {"error": f"timed out after {timeout_s:.0f} s", "log_tail": log[-2000:], "command": cmd}
        res: dict = {"command": cmd, "returncode": proc.returncode, "seconds": time.perf_counter() - t0,
                     "log_tail": log[-2000:]}
        print(log[-3000:], end="" if log.endswith("\n") else "\n")
        if proc.returncode != 0:
            res["error"] = f"exit status {proc.returncode}"
        elif not os.path.exists(out):
            res["error"] = "no JSON written"
        else:
            with open(out) as f:
                res["json"] = json.load(f)
            res["images_per_s"] = dict(_numbers(res["json"]))
    return res


# ------------------------------------ README section ----------------------------------------

README_HEADING = "## GPU results"


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _timing_rows(report: dict) -> list[list[str]]:
    rows = []
    mem = report.get("memory") or {}
    for res in report.get("timing", []):
        conf = res["config"]
        for r in res["rows"]:
            ratio = r.get("img_s_ratio_to_family_kd")
            goal = {True: "goal ≥ 0.95 met", False: "**goal ≥ 0.95 not met**", None: ""}[r.get("within_5pct_of_kd")]
            peak = (mem.get(conf) or {}).get(r["variant"], {}).get("peak_gib")
            rows.append([r["variant"], conf, f"{r['images_per_s']:.0f}",
                         f"{ratio:.3f} (vs {r['vs']})" if ratio is not None else "-", _fmt(peak, ".2f"),
                         f"{r['median_ms']:.1f} ms/step, median of {res['steps']}" + (f"; {goal}" if goal else "")])
        rows.append(["our KD / torchdistill's KD", conf, f"{res['torchdistill_anchor_img_s']:.0f} (anchor)",
                     f"{res['kd_over_anchor']:.2f} (ours / anchor)", "", "torchdistill: KD ResNet-34 → ResNet-18 on "
                     "ImageNet per GPU; an anchor from a different GPU and a full pipeline, not like-for-like"])
    return rows


def _ddp_rows(report: dict) -> list[list[str]]:
    d = report.get("ddp_throughput")
    if not d:
        return []
    if d["world"] < 2:
        return [[f"DDP {n}, all GPUs = 1", d["config"], f"{v:.0f}", "-", "", "single process only (no scaling)"]
                for n, v in d["one_device_img_s"].items()]
    return [[f"DDP {n}, {d['world']} processes", d["config"], f"{d[n]['images_per_s_total']:.0f} total",
             _fmt(d[n]["scaling_efficiency"], ".3f") + " (efficiency)", _fmt(d.get("peak_gib_max_rank"), ".2f"),
             f"{d[n]['images_per_s_per_device']:.0f} img/s per {d['backend']} process, batch "
             f"{d['batch_per_process']} each; peak: max over ranks, both students resident"]
            for n in DDP_VARIANTS if n in d]


def _loader_rows(report: dict) -> list[list[str]]:
    ld = report.get("loader")
    if not ld:
        return []
    if "images_per_s" not in ld:
        return [["loader", "", "-", "", "", ld.get("skipped") or ld.get("error", "no result")]]
    nums = list(ld["images_per_s"].items())
    return [[f"loader: {k}", "", f"{v:.0f}", "", "", "bench/loader.py"] for k, v in nums[:8]] or [
        ["loader", "", "-", "", "", "no images/s field found in its JSON (see gpu.json)"]]


def readme_section(report: dict) -> str:
    env = report["env"]
    date = report.get("date", time.strftime("%Y-%m-%d", time.gmtime()))
    checks = report.get("checks", [])
    failed = [c["check"] for c in checks if not c["ok"]]
    verdict = ("PASS" if not failed else "FAIL") + f" ({len(checks) - len(failed)}/{len(checks)} checks)"
    if failed:
        verdict += ": failed " + ", ".join(failed)
    a = report.get("args", {})
    rows = _timing_rows(report) + _ddp_rows(report) + _loader_rows(report) + [
        ["correctness (CPU vs device, bf16 vs fp32, DDP)", "", "", "", "", verdict]]
    lines = [f"{README_HEADING} (bench/gpu.py, {date}, {env.get('device_name')})", "",
             f"`python bench/gpu.py --json $OUT/gpu.json --readme bench/README.md`: torch {env.get('torch')}, CUDA "
             f"{env.get('cuda')}, {env.get('gpus', 0)} GPU(s), {a.get('size')} px, batch {a.get('batch')}, "
             f"{a.get('steps')} timed steps after {a.get('warmup')} warm-up (medians); ResNet-34 → ResNet-18 and "
             f"B-cos ResNet-34 → B-cos ResNet-18, synthetic inputs. Ratios are images/s e²KD / KD (goal ≥ 0.95); "
             f"peak memory is each variant alone (part 4). Run time {report.get('seconds', 0):.0f} s.", ""]
    if report.get("skipped"):
        lines += ["Skipped: " + "; ".join(f"{k} ({v})" for k, v in report["skipped"].items()), ""]
    lines += ["| measurement | config | images/s | ratio | peak GiB | note |", "|---|---|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _atomic_write(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_readme(path: str, report: dict) -> None:
    """Replace the "## GPU results" section (heading to the next level-2 heading) or append one."""
    text = open(path).read() if os.path.exists(path) else ""
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.startswith(README_HEADING)), None)
    section = readme_section(report)
    if start is None:
        new = text.rstrip("\n") + ("\n\n" if text.strip() else "") + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        after = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n" + after if after else "")
    _atomic_write(path, new)


# ------------------------------------ main --------------------------------------------------


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
           "device_name": step_bench._device_name(device), "cudnn": torch.backends.cudnn.version()}
    if device.type == "cuda":
        env.update(gpus=torch.cuda.device_count(), bf16=torch.cuda.is_bf16_supported(),
                   capability=".".join(map(str, torch.cuda.get_device_capability(device))))
    return env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu (smoke test)")
    p.add_argument("--size", type=int, default=None, help="input resolution (default 224 on CUDA, 64 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="timing batch per process (default 64 on CUDA, 2 on CPU)")
    p.add_argument("--check-batch", type=int, default=None, help="correctness/DDP batch (default 8 CUDA, 4 CPU)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 30 CUDA, 1 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5 CUDA, 0 CPU)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--timing-configs", nargs="+", default=None, choices=list(CONFIGS),
                   help="default on CUDA: bf16+cl fp32 (bf16+cl is what training uses)")
    p.add_argument("--time", action="store_true",
                   help="on the CPU: also run timing, peak memory (None there) and the loader (off by default)")
    p.add_argument("--skip-timing", action="store_true", help="skip parts 3 and 4")
    p.add_argument("--skip-ddp", action="store_true", help="skip parts 2 and 5")
    p.add_argument("--skip-loader", action="store_true")
    p.add_argument("--ddp-cpu", action="store_true", help="on the CPU: parts 2 and 5 with 2 gloo processes")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="wall-clock budget; a part that would end after it is skipped (the lent GPU call is 8 min)")
    p.add_argument("--loader-script", default=os.path.join(HERE, "loader.py"))
    p.add_argument("--loader-images", type=int, default=None, help="default 4000 on CUDA, 64 on CPU")
    p.add_argument("--loader-timeout", type=float, default=120.0)
    p.add_argument("--loss-rtol", type=float, default=1e-4)
    p.add_argument("--grad-rtol", type=float, default=2e-2,
                   help="gradient error always accepted (relative L2). Kernels that break a ReLU/max-pool tie "
                        "differently route single gradient entries elsewhere (seen: 8e-3 between CPU memory "
                        "formats at batch 2); a wrong gradient is off by far more, and the explanation term's "
                        "own share of the gradient is checked to be >= 10x the error")
    p.add_argument("--grad-factor", type=float, default=10.0,
                   help="also accepted: this many times the CPU fp32 gradient's own error to float64")
    p.add_argument("--bf16-rtol", type=float, default=5e-2)
    p.add_argument("--bf16-atol", type=float, default=2e-3,
                   help="absolute slack: the KL between a random net's near-uniform outputs is tiny (B-cos: "
                        "~0.004), and bf16 logit rounding moves it by ~1e-4..1e-3")
    p.add_argument("--json", default=None, help="write all results here too (rewritten after every part)")
    p.add_argument("--readme", default=None,
                   help="markdown file whose '## GPU results' section to replace (or append), after every part")
    p.add_argument("--from-json", default=None, help="measure nothing: write --readme's section from this JSON")
    return p.parse_args(argv)


def _defaults(args, gpu: bool) -> None:
    args.size = args.size or (224 if gpu else 64)
    args.batch = args.batch or (64 if gpu else 2)
    args.check_batch = args.check_batch or (8 if gpu else 4)
    args.steps = args.steps if args.steps is not None else (30 if gpu else 1)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 0)
    args.timing_configs = args.timing_configs or (["bf16+cl", "fp32"] if gpu else ["fp32"])
    args.loader_images = args.loader_images or (4000 if gpu else 64)


class Run:
    """The report and its outputs: each part's result (or its exception) lands in the report, which
    is written out after every part."""

    def __init__(self, args, report: dict, checks: Checks):
        self.args, self.report, self.checks = args, report, checks

    def part(self, key: str, label: str, fn, *a):
        try:
            self.report[key] = fn(*a)
        except Exception as e:
            traceback.print_exc()
            self.checks.add(f"{label} ran", False, f"exception {type(e).__name__}: {e}"[:300])
        self.save()

    def save(self) -> None:
        r, a = self.report, self.args
        r["checks"] = self.checks.rows
        if a.json:
            _atomic_write(a.json, json.dumps(r, indent=2, default=str))
        if a.readme:
            try:
                write_readme(a.readme, r)
            except Exception:  # a README problem must not cost the measurements
                traceback.print_exc()


def run_parts(args, device: torch.device, run: Run, budget: Budget) -> None:
    gpu, report, checks = device.type == "cuda", run.report, run.checks
    n_gpus = torch.cuda.device_count() if gpu else 0
    # 1. correctness: always (the most valuable part, and the first)
    budget.start("1. correctness", correctness_estimate(args, gpu), "rough, scaled from a CPU measurement",
                 always=True)
    run.part("correctness", "correctness", correctness, args, device, checks)

    # 2. DDP sanity
    backend = "nccl" if gpu else "gloo"
    if args.skip_ddp:
        print("\n== 2. DDP sanity: skipped (--skip-ddp) ==")
    elif (gpu and n_gpus >= 2) or (not gpu and args.ddp_cpu):
        if budget.start("2. DDP sanity", 3 * budget.setup_s, "guess: process start-up dominates"):
            run.part("ddp", f"DDP ({backend})", ddp_check, args, backend, checks, max(60.0, budget.left()))
    else:
        print(f"\n== 2. DDP sanity: skipped ({n_gpus} GPU{'s' if n_gpus != 1 else ''}; the NCCL check needs >= 2) ==")

    # 3.-4. one device: timing, then peak memory per variant
    if args.skip_timing or (not gpu and not args.time):
        print("\n== 3. timing: skipped" + (" (--skip-timing)" if args.skip_timing else " on the CPU (pass --time)")
              + " ==")
    else:
        est = sum(budget.steps_s(c, VARIANTS, args.warmup + args.steps)[0] + budget.setup_s
                  for c in args.timing_configs)
        # never skipped whole: each config shortens its timed steps to what is left (or is skipped)
        budget.start("3. timing", est, budget.steps_s(args.timing_configs[0], VARIANTS, 1)[1], always=True)
        run.part("timing", "timing", timing, args, device, budget)
        est = sum(budget.steps_s(c, [v], 2)[0] + budget.setup_s / 5 for c in args.timing_configs for v in VARIANTS)
        if budget.start("4. peak memory", est, budget.steps_s(args.timing_configs[0], VARIANTS, 1)[1]):
            run.part("memory", "peak memory", peak_memory, args, device)

    # 5. all devices: data-parallel throughput
    if args.skip_ddp or (not gpu and not args.ddp_cpu):
        print("\n== 5. data parallel: skipped" + (" (--skip-ddp)" if args.skip_ddp else " on the CPU (pass --ddp-cpu)")
              + " ==")
    else:
        conf = "bf16+cl" if gpu else "fp32"  # the training default; CPU autocast is not what fit() runs
        world = n_gpus if gpu else 2
        per_step, basis = budget.steps_s(conf, DDP_VARIANTS, args.warmup + args.steps)
        est = 0.0 if world < 2 else 3 * budget.setup_s + 1.2 * per_step  # start-up; all-reduce ~+20 %
        if budget.start(f"5. data parallel ({world} process{'es' if world != 1 else ''})", est, basis):
            run.part("ddp_throughput", "data-parallel throughput", ddp_throughput, args, backend, world, conf,
                     _one_device_img_s(report, conf), max(60.0, budget.left()))

    # 6. loader
    if args.skip_loader or (not gpu and not args.time):
        print("\n== 6. loader: skipped" + (" (--skip-loader)" if args.skip_loader else " on the CPU (pass --time)")
              + " ==")
    else:
        timeout = min(args.loader_timeout, budget.left())
        if timeout < 10:
            budget.skip("6. loader", f"budget: {max(0.0, budget.left()):.0f} s left")
        else:
            budget.start("6. loader", timeout, "its time box", always=True)
            print(f"== 6. loader: bench/loader.py, {args.loader_images} images ==", flush=True)
            run.part("loader", "loader", loader, args, timeout)
            ld = report.get("loader", {})
            print("loader: " + (ld.get("skipped") or ld.get("error") or ", ".join(
                f"{k} {v:.0f} img/s" for k, v in ld.get("images_per_s", {}).items()) or "no images/s field"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        if not args.readme:
            sys.exit("--from-json needs --readme")
        with open(args.from_json) as f:
            write_readme(args.readme, json.load(f))
        print(f"wrote the '{README_HEADING}' section of {args.readme} from {args.from_json}")
        return 0

    want = args.device or ("cuda" if torch.cuda.is_available() else None)
    if want is None or (want.startswith("cuda") and not torch.cuda.is_available()):
        print("no CUDA device: nothing to do (run with --device cpu --size 64 for the CPU smoke test)")
        return 0
    device = torch.device(want)
    gpu = device.type == "cuda"
    if gpu and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    _defaults(args, gpu)
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = Budget(args.budget_s, args, gpu)
    env = environment(device)
    print("e2kd GPU check: " + ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    checks = Checks()
    report: dict = {"env": env, "args": dict(vars(args)), "date": time.strftime("%Y-%m-%d", time.gmtime()),
                    "skipped": budget.skipped}
    run = Run(args, report, checks)
    run_parts(args, device, run, budget)

    report["seconds"] = budget.elapsed()
    failed = [r["check"] for r in checks.rows if not r["ok"]]
    print(f"\nRESULT: {'PASS' if not failed else 'FAIL'} ({len(checks.rows) - len(failed)}/{len(checks.rows)} checks "
          f"passed{'; failed: ' + ', '.join(failed) if failed else ''}) in {report['seconds']:.0f} s"
          + (f"; skipped: {', '.join(budget.skipped)}" if budget.skipped else ""))
    run.save()
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
