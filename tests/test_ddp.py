"""The full e²KD loss under DistributedDataParallel (2 gloo processes) gives the same student
gradients as one process on the concatenated batch: the explanation's graph is built inside DDP's
forward (``model(x, with_features=True)``) and DDP's all-reduce fires once, on the real backward."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from trainables.explainers import bcos_encode, explain
from trainables.losses import E2KDLoss, LossConfig
from trainables.models import build_model

WORLD = 2
BATCH = 4  # per rank
# name -> (student arch, teacher arch, explainer, input size)
VARIANTS = {
    "gradcam_analytic": ("small_cnn", "small_cnn", "gradcam", 32),
    "gradcam_autograd": ("small_cnn", "small_cnn", "gradcam_autograd", 32),  # double backward
    "gradcam_general": ("mobilenet_v3_small", "small_cnn", "gradcam", 96),  # autograd route, MLP head
    "bcos": ("small_bcos_cnn", "small_bcos_cnn", "bcos_weight", 32),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _calibrated(arch: str, seed: int, size: int) -> torch.nn.Module:
    """Random-init float64 model with BN statistics set from one random batch, so that its logits
    and maps are not degenerate (default running stats make deep random nets output ~0)."""
    torch.manual_seed(seed)
    model = build_model(arch, 10).double()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        xc = torch.rand(8, 3, size, size, dtype=torch.float64)
        model.train()(bcos_encode(xc) if model.is_bcos else xc)
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def _make_case(variant: str):
    """Student state, batch, teacher logits/maps for the concatenated batch (built once, in the parent)."""
    s_arch, t_arch, method, size = VARIANTS[variant]
    student = _calibrated(s_arch, 0, size)
    teacher = _calibrated(t_arch, 1, size)
    x = torch.rand(WORLD * BATCH, 3, size, size, dtype=torch.float64)
    if student.is_bcos:
        x = bcos_encode(x)
    te = explain(teacher, x, method="bcos_weight" if teacher.is_bcos else "gradcam", create_graph=False)
    return {"arch": s_arch, "method": method, "state": student.state_dict(), "x": x,
            "t_logits": te.logits, "t_maps": te.maps}


def _student(case) -> torch.nn.Module:
    m = build_model(case["arch"], 10).double()
    m.load_state_dict(case["state"])
    return m.eval()  # eval-mode BN: identical normalisation on a shard and on the whole batch


def _loss(case, model, lo: int, hi: int) -> dict[str, torch.Tensor]:
    cfg = LossConfig(temperature=2.0, lam=5.0, explainer=case["method"])
    return E2KDLoss(cfg)(model, case["x"][lo:hi], case["t_logits"][lo:hi], case["t_maps"][lo:hi])


def _worker(rank: int, port: int, case_path: str, out_path: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        cases = torch.load(case_path, weights_only=False)
        grads = {}
        for variant, case in cases.items():
            student = _student(case)
            ddp = DDP(student)
            out = _loss(case, ddp, rank * BATCH, (rank + 1) * BATCH)
            out["loss"].backward()
            grads[variant] = {n: p.grad.clone() for n, p in student.named_parameters()}
        if rank == 0:
            torch.save(grads, out_path)
    finally:
        dist.destroy_process_group()


def test_ddp_e2kd_gradients_equal_single_process(tmp_path):
    cases = {v: _make_case(v) for v in VARIANTS}
    case_path, out_path = str(tmp_path / "cases.pt"), str(tmp_path / "grads.pt")
    torch.save(cases, case_path)
    mp.spawn(_worker, args=(_free_port(), case_path, out_path), nprocs=WORLD, join=True)
    ddp_grads = torch.load(out_path, weights_only=False)

    torch.set_num_threads(1)
    for variant, case in cases.items():
        student = _student(case)
        out = _loss(case, student, 0, WORLD * BATCH)
        assert out["exp"].item() > 1e-3, f"{variant}: explanation term vanished"
        out["loss"].backward()
        got = ddp_grads[variant]
        for n, p in student.named_parameters():
            ref = p.grad
            assert ref is not None, f"{variant}/{n}: no single-process gradient"
            diff = (got[n] - ref).abs().max().item()
            assert diff <= 1e-5 * max(1.0, ref.abs().max().item()), f"{variant}/{n}: DDP differs by {diff:.2e}"
        # the comparison is not vacuous: the explanation term moved the gradients
        plain = _student(case)
        kd_only = E2KDLoss(LossConfig(temperature=2.0, lam=0.0, explainer=case["method"]))
        kd_only(plain, case["x"], case["t_logits"], None)["loss"].backward()
        moved = max((dict(plain.named_parameters())[n].grad - got[n]).abs().max().item()
                    for n, _ in student.named_parameters() if got[n] is not None)
        assert moved > 1e-6, f"{variant}: gradients equal to plain KD's"


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
