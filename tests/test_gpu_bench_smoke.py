"""bench/gpu.py works before a GPU is lent: its CPU smoke path (correctness part) passes, and
without CUDA the default invocation says so and exits 0."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu.py")


def _run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


def test_cpu_smoke_correctness(tmp_path):
    # Small enough for a shared 2-core machine (one thread: oversubscribed OpenMP threads stall
    # each other there); still every variant, the float64 yardstick and the bf16 comparison.
    out = tmp_path / "gpu.json"
    r = _run("--device", "cpu", "--size", "64", "--check-batch", "2", "--num-classes", "10", "--threads", "1",
             "--json", str(out))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "RESULT: PASS" in r.stdout
    assert "DDP sanity: skipped" in r.stdout and "timing: skipped on the CPU" in r.stdout
    rep = json.loads(out.read_text())
    names = {"kd", "e2kd_analytic", "e2kd_autograd", "bcos_kd", "bcos_e2kd"}
    assert set(rep["correctness"]) == names
    assert all(c["ok"] for c in rep["checks"]) and len(rep["checks"]) >= 20
    for name in ("e2kd_analytic", "e2kd_autograd", "bcos_e2kd"):
        assert rep["correctness"][name]["cpu_fp32"]["exp"] > 0  # the explanation term is live
        assert rep["correctness"][name]["explanation_grad_share"] > 0.1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_no_cuda_nothing_to_do():
    r = _run(timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "no CUDA device: nothing to do" in r.stdout


@pytest.mark.slow
def test_cpu_smoke_ddp_and_timing_paths(tmp_path):
    """The DDP (gloo stand-in for NCCL) and timing code paths, tiny."""
    out = tmp_path / "gpu.json"
    r = _run("--device", "cpu", "--size", "64", "--check-batch", "2", "--num-classes", "10", "--threads", "1",
             "--ddp-cpu", "--time", "--batch", "2", "--steps", "1", "--warmup", "0", "--json", str(out), timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rep = json.loads(out.read_text())
    assert rep["ddp"]["rel_err_vs_single"] < 1e-9 and rep["ddp"]["ranks_equal"] == 0.0
    rows = {row["variant"]: row for row in rep["timing"][0]["rows"]}
    assert set(rows) == {"kd", "e2kd_analytic", "e2kd_autograd", "bcos_kd", "bcos_e2kd"}
    assert rows["kd"]["ratio_to_kd"] == 1.0 and all(row["steps_per_s"] > 0 for row in rows.values())
