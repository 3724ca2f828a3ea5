"""Everything to check and time on a lent GPU, in one run (an H100 for a few minutes).

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
3. Timing (``bench/step.py``'s variants, step function and interleaved medians): steps/s of kd,
   e2kd_analytic, e2kd_autograd, bcos_kd, bcos_e2kd at 224 px, batch 64, ResNet-34 -> ResNet-18 and
   B-cos ResNet-34 -> B-cos ResNet-18, with bf16 autocast + channels_last (the training default on
   CUDA) and in float32 (TF32 as PyTorch defaults); ratios to kd (and to bcos_kd for B-cos rows).

    python bench/gpu.py                              # GPU machine: all of the above
    python bench/gpu.py --json $OUT/gpu.json         # also write the results
    python bench/gpu.py --device cpu --size 64       # CPU smoke test of part 1 (no GPU needed)
    python bench/gpu.py --device cpu --size 64 --check-batch 2 --num-classes 10 --threads 1 \
        --ddp-cpu --time --batch 2 --steps 1 --warmup 0   # every code path on the CPU (gloo DDP)

Without a CUDA device (and without ``--device cpu``) it prints "no CUDA device: nothing to do" and
exits 0. Exit status 1 when a correctness check fails (the timing still runs and is printed).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import socket
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
    """The TrainConfig a trial of this variant would have (amp bf16, channels_last)."""
    bcos = variant.startswith("bcos")
    explainer = {"e2kd_autograd": "gradcam_autograd"}.get(variant, "bcos_weight" if bcos else "gradcam")
    lam = 0.0 if variant in ("kd", "bcos_kd") else 1.0
    return TrainConfig(student="bcos_resnet18" if bcos else "resnet18",
                       teacher=TeacherConfig(arch="bcos_resnet34" if bcos else "resnet34"),
                       loss=LossConfig(temperature=1.0, lam=lam, explainer=explainer), amp="bf16", channels_last=True)


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


def _bench_args(args, device: str, amp: str, channels_last: bool, batch: int, size: int) -> argparse.Namespace:
    return argparse.Namespace(device=device, threads=args.threads, amp=amp, channels_last=channels_last,
                              variants=list(VARIANTS), size=size, batch=batch, steps=args.steps, warmup=args.warmup,
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


def _ddp_worker(rank: int, world: int, port: int, backend: str, size: int, batch: int, num_classes: int,
                out_path: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from trainables.models import build_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world)
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


def ddp_check(args, backend: str, checks: Checks) -> dict | None:
    import torch.multiprocessing as mp

    print(f"\n== 2. DDP sanity: 2 {backend} processes vs one process on the whole batch ==", flush=True)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "ddp.json")
        t0 = time.perf_counter()
        mp.spawn(_ddp_worker, args=(2, _free_port(), backend, args.size, args.check_batch // 2 or 1, args.num_classes,
                                    out), nprocs=2, join=True)
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


# ------------------------------------ 3. timing ---------------------------------------------


def timing(args, device: torch.device) -> list[dict]:
    out = []
    for conf in args.timing_configs:
        amp, cl = {"bf16+cl": ("bf16", True), "bf16": ("bf16", False), "fp32+cl": ("none", True),
                   "fp32": ("none", False)}[conf]
        print(f"\n== 3. timing [{conf}]: {args.size} px, batch {args.batch}, {args.steps} timed steps after "
              f"{args.warmup} warm-up, medians ==", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        res = step_bench.run(_bench_args(args, str(device), amp, cl, args.batch, args.size))
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        kd = next(r["median_ms"] for r in res["rows"] if r["variant"] == "kd")
        print(f"{'variant':<15} {'ms/step':>9} {'steps/s':>9} {'img/s':>9} {'vs kd':>7} {'vs family':>10}")
        for r in res["rows"]:
            r["steps_per_s"] = 1e3 / r["median_ms"]
            r["ratio_to_kd"] = r["median_ms"] / kd
            fam = f"{r['ratio']:.3f} ({r['vs']})" if r["ratio"] is not None else "-"
            print(f"{r['variant']:<15} {r['median_ms']:>9.1f} {r['steps_per_s']:>9.2f} "
                  f"{r['steps_per_s'] * args.batch:>9.0f} {r['ratio_to_kd']:>7.3f} {fam:>10}")
        if peak is not None:
            print(f"peak GPU memory (all five variants' models resident): {peak:.1f} GiB")
        res.update(config=conf, peak_gib=peak)
        out.append(res)
    return out


# ------------------------------------ main --------------------------------------------------


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
           "device_name": step_bench._device_name(device), "cudnn": torch.backends.cudnn.version()}
    if device.type == "cuda":
        env.update(gpus=torch.cuda.device_count(), bf16=torch.cuda.is_bf16_supported(),
                   capability=".".join(map(str, torch.cuda.get_device_capability(device))))
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu (smoke test)")
    p.add_argument("--size", type=int, default=None, help="input resolution (default 224 on CUDA, 64 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="timing batch (default 64 on CUDA, 2 on CPU)")
    p.add_argument("--check-batch", type=int, default=None, help="correctness/DDP batch (default 8 CUDA, 4 CPU)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 20 CUDA, 1 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5 CUDA, 0 CPU)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--timing-configs", nargs="+", default=None, choices=["bf16+cl", "bf16", "fp32+cl", "fp32"],
                   help="default on CUDA: bf16+cl fp32 (bf16+cl is what training uses)")
    p.add_argument("--time", action="store_true", help="also run the timing on the CPU (off by default there)")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--skip-ddp", action="store_true")
    p.add_argument("--ddp-cpu", action="store_true", help="on the CPU: run the DDP check with 2 gloo processes")
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
    p.add_argument("--json", default=None, help="write all results here too")
    args = p.parse_args(argv)

    want = args.device or ("cuda" if torch.cuda.is_available() else None)
    if want is None or (want.startswith("cuda") and not torch.cuda.is_available()):
        print("no CUDA device: nothing to do (run with --device cpu --size 64 for the CPU smoke test)")
        return 0
    device = torch.device(want)
    gpu = device.type == "cuda"
    if gpu and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    args.size = args.size or (224 if gpu else 64)
    args.batch = args.batch or (64 if gpu else 2)
    args.check_batch = args.check_batch or (8 if gpu else 4)
    args.steps = args.steps if args.steps is not None else (20 if gpu else 1)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 0)
    args.timing_configs = args.timing_configs or (["bf16+cl", "fp32"] if gpu else ["fp32"])

    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)
    print("e2kd GPU check: " + ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    checks = Checks()
    report: dict = {"env": env, "args": {k: v for k, v in vars(args).items()}}
    t0 = time.perf_counter()
    try:
        report["correctness"] = correctness(args, device, checks)
    except Exception:
        traceback.print_exc()
        checks.add("correctness ran", False, "exception (traceback above)")

    if args.skip_ddp:
        print("\n== 2. DDP sanity: skipped (--skip-ddp) ==")
    elif gpu and torch.cuda.device_count() >= 2:
        try:
            report["ddp"] = ddp_check(args, "nccl", checks)
        except Exception:
            traceback.print_exc()
            checks.add("DDP (nccl) ran", False, "exception (traceback above)")
    elif not gpu and args.ddp_cpu:
        try:
            report["ddp"] = ddp_check(args, "gloo", checks)
        except Exception:
            traceback.print_exc()
            checks.add("DDP (gloo) ran", False, "exception (traceback above)")
    else:
        n = torch.cuda.device_count() if gpu else 0
        print(f"\n== 2. DDP sanity: skipped ({n} GPU{'s' if n != 1 else ''}; the NCCL check needs >= 2) ==")

    if args.skip_timing or (not gpu and not args.time):
        print("\n== 3. timing: skipped" + (" (--skip-timing)" if args.skip_timing else " on the CPU (pass --time)")
              + " ==")
    else:
        try:
            report["timing"] = timing(args, device)
        except Exception:
            traceback.print_exc()
            checks.add("timing ran", False, "exception (traceback above)")

    report["checks"] = checks.rows
    report["seconds"] = time.perf_counter() - t0
    failed = [r["check"] for r in checks.rows if not r["ok"]]
    print(f"\nRESULT: {'PASS' if not failed else 'FAIL'} ({len(checks.rows) - len(failed)}/{len(checks.rows)} checks "
          f"passed{'; failed: ' + ', '.join(failed) if failed else ''}) in {report['seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
