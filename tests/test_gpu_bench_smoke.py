"""bench/gpu.py works before a GPU is lent: its CPU smoke paths (correctness; with --time/--ddp-cpu
also timing with images/s, peak memory, gloo data-parallel throughput, the loader subprocess and
the README section) pass, and without CUDA the default invocation says so and exits 0."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu.py")
NAMES = {"kd", "e2kd_analytic", "e2kd_autograd", "bcos_kd", "bcos_e2kd"}


def _run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def gpu_bench():
    """bench/gpu.py imported by path, for its pieces that need no measurement."""
    spec = importlib.util.spec_from_file_location("e2kd_bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _script(path, body: str) -> str:
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_cpu_smoke_correctness(tmp_path):
    # Small enough for a shared 2-core machine (one thread: oversubscribed OpenMP threads stall
    # each other there); still every variant, the float64 yardstick and the bf16 comparison.
    out = tmp_path / "gpu.json"
    r = _run("--device", "cpu", "--size", "64", "--check-batch", "2", "--num-classes", "10", "--threads", "1",
             "--json", str(out))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "RESULT: PASS" in r.stdout
    assert "DDP sanity: skipped" in r.stdout and "timing: skipped on the CPU" in r.stdout
    assert "data parallel: skipped" in r.stdout and "loader: skipped" in r.stdout
    assert "-- 1. correctness: estimate" in r.stdout  # each part announces its estimate
    rep = json.loads(out.read_text())
    assert set(rep["correctness"]) == NAMES
    assert all(c["ok"] for c in rep["checks"]) and len(rep["checks"]) >= 20
    for name in ("e2kd_analytic", "e2kd_autograd", "bcos_e2kd"):
        assert rep["correctness"][name]["cpu_fp32"]["exp"] > 0  # the explanation term is live
        assert rep["correctness"][name]["explanation_grad_share"] > 0.1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_no_cuda_nothing_to_do():
    r = _run(timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "no CUDA device: nothing to do" in r.stdout


FAKE_LOADER = """
    import argparse, json
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int); p.add_argument("--json"); p.add_argument("--workers", type=int)
    a = p.parse_args()
    res = {"images": a.images, "runs": [{"name": "workers0", "images_per_s": 100.0},
                                        {"name": "pipeline", "images_per_s": 400.0}]}
    json.dump(res, open(a.json, "w"))
"""


@pytest.mark.slow
def test_cpu_smoke_all_parts_and_readme(tmp_path):
    """Every part on the CPU, tiny: DDP sanity and data-parallel throughput over 2 gloo processes,
    timing with images/s, peak memory (None off CUDA), the loader subprocess (a stand-in script:
    bench/loader.py's layout is its own), and the README section written, then replaced."""
    out, md = tmp_path / "gpu.json", tmp_path / "README.md"
    md.write_text("# Benchmarks\n\nintro\n\n## Other section\n\nkept\n")
    loader = _script(tmp_path / "loader.py", FAKE_LOADER)
    r = _run("--device", "cpu", "--size", "64", "--check-batch", "2", "--num-classes", "10", "--threads", "1",
             "--ddp-cpu", "--time", "--batch", "2", "--steps", "1", "--warmup", "0", "--loader-script", loader,
             "--json", str(out), "--readme", str(md), timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for part in ("1. correctness", "2. DDP sanity", "3. timing", "4. peak memory", "5. data parallel", "6. loader"):
        assert f"-- {part}" in r.stdout, part  # its one-line estimate
    rep = json.loads(out.read_text())
    assert rep["ddp"]["rel_err_vs_single"] < 1e-9 and rep["ddp"]["ranks_equal"] == 0.0

    rows = {row["variant"]: row for row in rep["timing"][0]["rows"]}
    assert set(rows) == NAMES
    assert rows["kd"]["ratio_to_kd"] == 1.0 and all(row["steps_per_s"] > 0 for row in rows.values())
    assert all(row["images_per_s"] > 0 for row in rows.values())
    assert rows["e2kd_analytic"]["img_s_ratio_to_family_kd"] > 0 and rows["bcos_e2kd"]["vs"] == "bcos_kd"
    assert rep["timing"][0]["kd_over_anchor"] > 0

    mem = rep["memory"]["fp32"]
    assert set(mem) == NAMES and all("peak_gib" in m and m["peak_gib"] is None for m in mem.values())

    dp = rep["ddp_throughput"]
    assert dp["world"] == 2 and dp["backend"] == "gloo"
    for name in ("kd", "e2kd_analytic"):
        assert dp[name]["images_per_s_total"] > 0 and dp[name]["scaling_efficiency"] > 0

    assert rep["loader"]["json"]["images"] == 64  # the CPU default, not 4000
    assert sorted(rep["loader"]["images_per_s"].values()) == [100.0, 400.0]

    first = md.read_text()
    assert first.count("## GPU results (bench/gpu.py, ") == 1
    assert first.startswith("# Benchmarks\n\nintro\n\n## Other section\n\nkept\n")
    for cell in ("| kd | fp32 |", "| e2kd_analytic | fp32 |", "DDP kd, 2 processes", "loader: runs[pipeline]",
                 "| correctness"):
        assert cell in first, cell

    # Back on this machine: the same section from the JSON replaces the one there, never a second.
    r2 = _run("--from-json", str(out), "--readme", str(md), timeout=60)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert md.read_text() == first


def test_readme_section_replaced_in_place(gpu_bench, tmp_path):
    md = tmp_path / "R.md"
    md.write_text("# B\n\n## GPU results (bench/gpu.py, 2000-01-01, old)\n\nold table\n\n## After\n\nkept\n")
    report = {"env": {"device_name": "NVIDIA H200", "torch": "x", "cuda": "y", "gpus": 1}, "date": "2030-01-02",
              "args": {"size": 224, "batch": 64, "steps": 30, "warmup": 5},
              "checks": [{"check": "a", "ok": True, "detail": ""}], "loader": {"skipped": "bench/loader.py not found"},
              "ddp_throughput": {"world": 1, "config": "bf16+cl", "one_device_img_s": {"kd": 2000.0}}}
    gpu_bench.write_readme(str(md), report)
    text = md.read_text()
    assert "old table" not in text and text.count("## GPU results") == 1
    assert "## GPU results (bench/gpu.py, 2030-01-02, NVIDIA H200)" in text
    assert text.startswith("# B\n\n## GPU results") and text.endswith("\n\n## After\n\nkept\n")
    assert "DDP kd, all GPUs = 1" in text and "bench/loader.py not found" in text and "PASS (1/1 checks)" in text
    gpu_bench.write_readme(str(md), report)
    assert md.read_text() == text
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]  # atomic write left nothing


def test_loader_missing_failing_or_slow_is_recorded(gpu_bench, tmp_path):
    def args(script):
        return argparse.Namespace(loader_script=str(script), loader_images=4)

    assert "not found" in gpu_bench.loader(args(tmp_path / "nope.py"), 10)["skipped"]
    bad = _script(tmp_path / "bad.py", "import sys; print('boom'); sys.exit(3)\n")
    res = gpu_bench.loader(args(bad), 30)
    assert res["error"] == "exit status 3" and "boom" in res["log_tail"]
    slow = _script(tmp_path / "slow.py", "import time; time.sleep(60)\n")
    res = gpu_bench.loader(args(slow), 1)
    assert res["error"].startswith("timed out after 1 s")


def test_budget_skips_a_part_that_would_end_after_it(gpu_bench):
    args = argparse.Namespace(batch=2, size=64)
    b = gpu_bench.Budget(10.0, args, gpu=False)
    assert b.start("first", 1000.0, "guess", always=True)  # correctness always runs
    assert not b.start("later", 1000.0, "guess") and "later" in b.skipped
    assert b.start("small", 0.5, "guess")
    b.measured["fp32"] = {"kd": 100.0}
    assert b.step_ms("fp32", "kd") == (100.0, "measured")
    assert b.step_ms("fp32+cl", "kd")[1] == "scaled from measured fp32"
