"""Time one full e²KD training step per variant, on the same batch, interleaved round-robin.

A step is what the trainer does with a live teacher: teacher logits (KD) or logits + maps (e²KD,
no graph), student forward, loss, backward, optimizer step (AdamW + grad-norm clip 1.0 for
standard students, Adam for B-cos, as in the paper).

Variants:
  kd             ResNet-34 -> ResNet-18, λ = 0
  e2kd_analytic  same, GradCAM through the analytic CAM (no double backward)
  e2kd_autograd  same, GradCAM through autograd (teacher: backward; student: double backward,
                 the reference code's way; explainer ``gradcam_autograd``)
  bcos_kd        B-cos ResNet-34 -> B-cos ResNet-18, λ = 0 (student in explanation mode)
  bcos_e2kd      same, B-cos W(x) (teacher: input gradient; student: double backward)

    python bench/step.py --device cpu --size 112 --batch 16 --steps 15
    python bench/step.py --device cuda --amp bf16 --channels-last

Medians over ``--steps`` repetitions (after ``--warmup`` untimed ones); ratios are to ``kd``
(standard) and to ``bcos_kd`` (B-cos). Wall time and process CPU time are both reported: on a
shared CPU machine use ``--threads 1`` and read the CPU-time ratio (other jobs preempting this one
inflate wall time but not CPU time); on GPU read wall time.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trainables.explainers import bcos_encode, explain
from trainables.losses import E2KDLoss, LossConfig
from trainables.models import build_model


@dataclass
class Variant:
    name: str
    family: str  # "standard" | "bcos"
    cfg: LossConfig
    teacher_method: str | None  # None: logits only (KD)
    student: nn.Module
    teacher: nn.Module
    opt: torch.optim.Optimizer
    clip: bool


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_variants(args, device: torch.device, names: list[str]) -> list[Variant]:
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    models: dict[str, nn.Module] = {}

    def get(arch: str, train: bool) -> nn.Module:
        if arch not in models:
            m = build_model(arch, args.num_classes).to(device, memory_format=memory_format)
            models[arch] = m
        m = models[arch]
        if train:  # every variant trains its own copy of the student (own optimizer state)
            m = copy.deepcopy(m).train()
        else:
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
        return m

    out = []
    for name in names:
        bcos = name.startswith("bcos")
        t_arch, s_arch = ("bcos_resnet34", "bcos_resnet18") if bcos else ("resnet34", "resnet18")
        lam = 0.0 if name.endswith("kd") and "e2kd" not in name else 1.0
        explainer = {"e2kd_analytic": "gradcam", "e2kd_autograd": "gradcam_autograd"}.get(name, "bcos_weight" if bcos else "gradcam")
        cfg = LossConfig(temperature=1.0, lam=lam, explainer=explainer)
        student = get(s_arch, train=True)
        teacher = get(t_arch, train=False)
        if bcos:
            opt = torch.optim.Adam(student.parameters(), lr=1e-3)
        else:
            opt = torch.optim.AdamW(student.parameters(), lr=0.01, weight_decay=1e-4)
        out.append(Variant(name, "bcos" if bcos else "standard", cfg, explainer if lam > 0 else None,
                           student, teacher, opt, clip=not bcos))
    return out


def make_step(v: Variant, x: Tensor, amp: torch.dtype | None, device: torch.device) -> Callable[[int], float]:
    loss_fn = E2KDLoss(v.cfg)
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else contextlib.nullcontext

    def step(i: int) -> float:
        with autocast():
            if v.teacher_method is None:
                with torch.no_grad():
                    t_logits, t_maps = v.teacher(x), None
            else:
                te = explain(v.teacher, x, method=v.teacher_method, create_graph=False)
                t_logits, t_maps = te.logits, te.maps
            out = loss_fn(v.student, x, t_logits, t_maps, step=i)
        v.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        if v.clip:
            torch.nn.utils.clip_grad_norm_(v.student.parameters(), 1.0)
        v.opt.step()
        return float(out["loss"].detach())

    return step


def run(args) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    if amp is torch.float16:
        sys.exit("fp16 needs a GradScaler; use --amp bf16")
    variants = build_variants(args, device, args.variants)
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(args.batch, 3, args.size, args.size, generator=g)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    batches = {"standard": ((rgb - 0.45) / 0.225).to(device, memory_format=memory_format),
               "bcos": bcos_encode(rgb).to(device, memory_format=memory_format)}
    steps = {v.name: make_step(v, batches[v.family], amp, device) for v in variants}

    for i in range(args.warmup):
        for v in variants:
            steps[v.name](i)
    _sync(device)
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    cpu_times: dict[str, list[float]] = {v.name: [] for v in variants}
    for i in range(args.steps):
        order = variants if i % 2 == 0 else variants[::-1]  # alternate direction: no fixed neighbour
        for v in order:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            steps[v.name](args.warmup + i)
            _sync(device)
            times[v.name].append(time.perf_counter() - t0)
            cpu_times[v.name].append(time.process_time() - c0)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        for name in args.profile:
            with profile(activities=acts) as prof:
                for i in range(3):
                    steps[name](10_000 + i)
                _sync(device)
            sort = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(f"\n=== profile: {name} (3 steps) ===")
            print(prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows))

    med = {k: statistics.median(t) for k, t in times.items()}
    q = {k: statistics.quantiles(t, n=4, method="inclusive") if len(t) >= 2 else [t[0]] * 3 for k, t in times.items()}
    cpu = {k: statistics.median(t) for k, t in cpu_times.items()}
    base = {"standard": "kd", "bcos": "bcos_kd"}
    rows = []
    for v in variants:
        b = base[v.family]
        rows.append({"variant": v.name, "median_ms": 1e3 * med[v.name], "q1_ms": 1e3 * q[v.name][0],
                     "q3_ms": 1e3 * q[v.name][2],
                     "ratio": med[v.name] / med[b] if b in med else None, "vs": b,
                     # process CPU time: robust to other jobs preempting this one on a shared CPU box
                     # (meaningful with --threads 1; on GPU it measures the host side only)
                     "cpu_median_ms": 1e3 * cpu[v.name], "cpu_ratio": cpu[v.name] / cpu[b] if b in cpu else None})
    return {"device": str(device), "device_name": _device_name(device), "size": args.size, "batch": args.batch,
            "steps": args.steps, "warmup": args.warmup, "amp": args.amp, "channels_last": args.channels_last,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()


def print_table(res: dict) -> None:
    print(f"device={res['device']} ({res['device_name']}) size={res['size']} batch={res['batch']} "
          f"steps={res['steps']} warmup={res['warmup']} amp={res['amp']} channels_last={res['channels_last']} "
          f"threads={res['threads']} torch={res['torch']}")
    print(f"{'variant':<15} {'wall ms':>9} {'q1 ms':>9} {'q3 ms':>9} {'ratio':>7} {'cpu ms':>9} {'cpu ratio':>9}  vs")
    for r in res["rows"]:
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "-"
        cratio = f"{r['cpu_ratio']:.3f}" if r["cpu_ratio"] is not None else "-"
        print(f"{r['variant']:<15} {r['median_ms']:>9.1f} {r['q1_ms']:>9.1f} {r['q3_ms']:>9.1f} {ratio:>7} "
              f"{r['cpu_median_ms']:>9.1f} {cratio:>9}  {r['vs']}")


ALL = ["kd", "e2kd_analytic", "e2kd_autograd", "bcos_kd", "bcos_e2kd"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=None, help="input resolution (default 224 on GPU, 112 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 64 on GPU, 16 on CPU)")
    p.add_argument("--steps", type=int, default=10, help="timed repetitions per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--variants", nargs="+", default=ALL, choices=ALL)
    p.add_argument("--profile", nargs="*", default=[], choices=ALL, help="also profile these variants")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.size = args.size or (224 if gpu else 112)
    args.batch = args.batch or (64 if gpu else 16)
    for need, base in (("e2kd_analytic", "kd"), ("e2kd_autograd", "kd"), ("bcos_e2kd", "bcos_kd")):
        if need in args.variants and base not in args.variants:
            args.variants.insert(0, base)  # ratios need their baseline
    res = run(args)
    print_table(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
