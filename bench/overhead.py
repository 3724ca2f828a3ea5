"""Orchestration overhead: one Ray Train worker vs the same loop in a bare PyTorch process.

Both run :func:`trainables.train_loop.fit` on the same ``TrainConfig`` (sweeps/quickstart.yaml with
fewer epochs), one torch thread (and OMP_NUM_THREADS) each:

- bare: ``fit(cfg, Hooks(report=record))`` in this process — the default ``Hooks()`` (CPU, no
  DDP, no Ray) except a ``report`` that records the metrics and the wall time of each report;
- Ray: ``TorchTrainer(train_loop_per_worker, ScalingConfig(num_workers=1))`` on a local Ray
  instance, storage in a temp dir. ``ray.train.report`` is wrapped in the worker only to stamp
  each report's wall time into its metrics; a Ray Train ``UserCallback`` records when the
  controller sees each report (what MLflow logging and Tune see).

Printed:
- per-epoch ``train_time_s`` (the loop's own timer around the training batches), median over
  epochs 2..N, Ray / bare: the cost Ray adds *inside* an epoch;
- epoch period (time between consecutive reports: train + eval + PNG + checkpoint + report),
  median over epochs 2..N, Ray / bare: adds checkpoint persistence to Ray's storage;
- the training process's CPU time (``time.process_time()``, all its threads, Ray's included) per
  epoch period, Ray / bare: less dependent on the load of a shared machine than wall times
  (note that Ray starts its workers at nice 15, this process runs at the shell's nice);
- start-up = (wall time from ``fit()`` / ``trainer.fit()`` to the first report) − one epoch
  period, for both; Ray's start-up minus bare's is what a trial pays for the Train controller,
  the worker actor, the torch process group and loader preparation. ``ray.init`` is reported
  separately (a sweep pays it once, not per trial).

The bare run is done before and after the Ray run and their epochs pooled, to bracket drift in
the load of a shared machine.

    python bench/overhead.py                 # 6 epochs, E2KD_TORCH_THREADS=1
    python bench/overhead.py --epochs 8 --json out.json

``--sweep`` times a whole sweep instead (default: the quickstart, README command 1 without the
teacher, which is trained first if missing): ``e2kd sweep`` as a subprocess in a scratch
directory (its own MLflow store and Ray Tune storage), its wall time, the per-trial breakdown the
sweep logs to its MLflow parent run (``overhead.md``: start-up, train, evaluation, checkpoint,
explanation grid, report, other), the orchestration efficiency Σ train_time_s / wall time of the
command, and the best trial's metrics. ``--set k=v`` passes overrides (e.g. the v0.1 cadence:
``--set explain_every=1 --set checkpoint_every=1 --set eval.test_every=1``).

    python bench/overhead.py --sweep --json sweep.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ray.train  # noqa: E402


class ReportTimes(ray.train.UserCallback):
    """Runs in the Train controller: appends (wall time, metrics) of each report to a file."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"t": time.time(), "metrics": metrics[0]}) + "\n")


def timed_train_loop(config: dict) -> None:
    """``train_loop_per_worker`` with ``ray.train.report`` stamping the worker's wall time."""
    import ray.train as rt

    from trainables.train_loop import train_loop_per_worker

    report = rt.report

    def stamped(metrics, checkpoint=None, **kw):
        stamp = {"bench_report_t": time.time(), "bench_report_cpu": time.process_time()}
        return report({**metrics, **stamp}, checkpoint=checkpoint, **kw)

    rt.report = stamped
    try:
        train_loop_per_worker(config)
    finally:
        rt.report = report


def summarize(t_call: float, reports: list[tuple[float, dict]]) -> dict:
    times = [t for t, _ in reports]
    periods = [b - a for a, b in zip(times, times[1:])]
    cpu = [m["bench_report_cpu"] for _, m in reports]
    cpu_periods = [b - a for a, b in zip(cpu, cpu[1:])]
    epoch_period = statistics.median(periods)
    train_times = [m["train_time_s"] for _, m in reports]
    first = times[0] - t_call
    return {"epochs": len(reports), "train_time_s": train_times,
            "train_time_median_s": statistics.median(train_times[1:]), "report_periods_s": periods,
            "cpu_periods_s": cpu_periods, "cpu_period_median_s": statistics.median(cpu_periods),
            "epoch_period_median_s": epoch_period, "first_report_s": first, "startup_s": first - epoch_period}


def run_bare(cfg) -> dict:
    from trainables.train_loop import Hooks, fit

    reports: list[tuple[float, dict]] = []
    t_call = time.time()
    def report(metrics: dict, ckpt_dir) -> None:
        reports.append((time.time(), {**metrics, "bench_report_cpu": time.process_time()}))

    fit(cfg, Hooks(report=report, log=lambda s: None))
    return summarize(t_call, reports)


def run_ray(cfg, tmp: str) -> dict:
    from ray.train.torch import TorchTrainer

    seen = os.path.join(tmp, "controller-reports.jsonl")
    trainer = TorchTrainer(
        timed_train_loop, train_loop_config={"cfg": cfg},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="overhead", storage_path=os.path.join(tmp, "storage"),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                                       callbacks=[ReportTimes(seen)]))
    t_call = time.time()
    trainer.fit()
    t_done = time.time()
    with open(seen) as f:
        rows = [json.loads(line) for line in f]
    worker = summarize(t_call, [(r["metrics"]["bench_report_t"], r["metrics"]) for r in rows])
    controller = summarize(t_call, [(r["t"], r["metrics"]) for r in rows])
    worker["controller_first_report_s"] = controller["first_report_s"]
    worker["controller_lag_median_s"] = statistics.median(r["t"] - r["metrics"]["bench_report_t"] for r in rows)
    worker["fit_total_s"] = t_done - t_call
    return worker


def run_sweep_command(spec_path: str, sets: list[str]) -> dict:
    """``e2kd sweep`` end to end in a scratch directory; what its MLflow parent run recorded."""
    import subprocess

    from mlflow import MlflowClient

    from orchestrator.cli import ensure_teacher
    from orchestrator.spec import load_spec

    os.chdir(ROOT)
    spec = load_spec(spec_path, sets)
    ensure_teacher(spec)  # not part of the timing: README command 1 trains it once per machine
    with tempfile.TemporaryDirectory(prefix="e2kd-sweep-bench-") as tmp:
        name = f"{spec.name}-bench-{int(time.time())}"
        uri = f"sqlite:///{tmp}/mlflow.db"
        cmd = [os.path.join(os.path.dirname(sys.executable), "e2kd"), "sweep", os.path.abspath(spec_path),
               "--set", f"teacher.path={spec.train.teacher.path}", "--set", f"name={name}",
               "--set", f"storage={tmp}/runs", "--tracking-uri", uri, *[a for kv in sets for a in ("--set", kv)]]
        print(f"[overhead] {' '.join(cmd[1:])}", flush=True)
        load0, t0 = os.getloadavg(), time.time()
        done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        wall = time.time() - t0
        if done.returncode:
            print(done.stdout[-3000:], done.stderr[-3000:])
            raise SystemExit(f"e2kd sweep failed ({done.returncode})")
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(spec.mlflow.experiment)
        parent = client.search_runs([exp.experiment_id], "tags.`e2kd.role` = 'parent'")[0]
        children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        table = open(client.download_artifacts(parent.info.run_id, "overhead.md", tmp)).read()
        metric, sign = spec.search.metric, (1 if spec.search.mode == "max" else -1)
        best = max(children, key=lambda c: sign * c.data.metrics.get(metric, float("-inf") * sign))
        train = parent.data.metrics["sweep_train_s"]
        return {"command": cmd[1:], "wall_s": wall, "loadavg_before": load0, "loadavg_after": os.getloadavg(),
                "sweep_wall_s": parent.data.metrics["sweep_wall_s"], "sweep_train_s": train,
                "efficiency_command": train / wall, "efficiency_tune": parent.data.metrics["orchestration_efficiency"],
                "trials": len(children), "overhead_md": table,
                "best": {"lam": best.data.params.get("loss.lam"), **{k: v for k, v in best.data.metrics.items()
                                                                       if k.startswith(("val_", "test_"))}}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default=os.path.join(ROOT, "sweeps", "quickstart.yaml"))
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--threads", type=int, default=1, help="torch threads in both processes (E2KD_TORCH_THREADS)")
    p.add_argument("--json", help="write all measurements here")
    p.add_argument("--sweep", action="store_true", help="time a whole `e2kd sweep` of --spec instead")
    p.add_argument("--set", action="append", default=[], metavar="K=V", help="--sweep: spec overrides")
    args = p.parse_args()
    if args.sweep:
        out = run_sweep_command(args.spec, args.set)
        print(out["overhead_md"])
        print(f"\n`e2kd sweep` wall {out['wall_s']:.1f} s (load {out['loadavg_before'][0]:.1f} -> "
              f"{out['loadavg_after'][0]:.1f}); Σ train_time_s {out['sweep_train_s']:.1f} s; orchestration "
              f"efficiency {out['efficiency_command']:.2f} (of the command), {out['efficiency_tune']:.2f} (of Tune's fit)")
        print("best trial: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in sorted(out["best"].items()) if not k.endswith("_epoch")))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return 0

    os.chdir(ROOT)  # the spec's relative paths (teacher) resolve against the repository
    os.environ["E2KD_TORCH_THREADS"] = str(args.threads)  # inherited by the Ray worker
    # Same OpenMP pool size in both processes (Ray would give its 1-CPU worker OMP_NUM_THREADS=1);
    # set before torch is first imported.
    assert "torch" not in sys.modules
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    import torch

    from orchestrator.cli import ensure_teacher
    from orchestrator.spec import load_spec
    from trainables.config import with_overrides

    torch.set_num_threads(args.threads)
    spec = load_spec(args.spec)
    ensure_teacher(spec)  # trains artifacts/teachers/digits-small_cnn (~2 min) when missing
    cfg = with_overrides(spec.train, {"epochs": args.epochs})
    load0 = os.getloadavg()

    print(f"[overhead] bare process, {args.epochs} epochs ...", flush=True)
    bare1 = run_bare(cfg)
    with tempfile.TemporaryDirectory(prefix="e2kd-overhead-") as tmp:
        t0 = time.time()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray_init_s = time.time() - t0
        try:
            print(f"[overhead] Ray Train, 1 worker, {args.epochs} epochs (ray.init {ray_init_s:.1f} s) ...", flush=True)
            rayr = run_ray(cfg, tmp)
        finally:
            ray.shutdown()
    print("[overhead] bare process again ...", flush=True)
    bare2 = run_bare(cfg)
    load1 = os.getloadavg()

    pooled_train = statistics.median(bare1["train_time_s"][1:] + bare2["train_time_s"][1:])
    pooled_period = statistics.median(bare1["report_periods_s"] + bare2["report_periods_s"])
    pooled_cpu = statistics.median(bare1["cpu_periods_s"] + bare2["cpu_periods_s"])
    bare_startup = statistics.median([bare1["startup_s"], bare2["startup_s"]])
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": f"{platform.node()} {os.cpu_count()} CPUs",
        "torch": torch.__version__, "ray_version": ray.__version__, "spec": os.path.relpath(args.spec, ROOT),
        "epochs": args.epochs, "threads": args.threads, "loadavg_before": load0, "loadavg_after": load1,
        "bare": [bare1, bare2], "ray": rayr, "ray_init_s": ray_init_s,
        "ratio_train_time": rayr["train_time_median_s"] / pooled_train,
        "ratio_epoch_period": rayr["epoch_period_median_s"] / pooled_period,
        "ratio_epoch_cpu": rayr["cpu_period_median_s"] / pooled_cpu,
        "bare_startup_s": bare_startup, "ray_startup_s": rayr["startup_s"],
        "ray_extra_startup_s": rayr["startup_s"] - bare_startup,
    }
    f3 = lambda xs: " ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    print(f"\nload average {load0[0]:.1f} -> {load1[0]:.1f} on {os.cpu_count()} CPUs; {args.threads} torch thread(s)")
    print(f"train_time_s per epoch  bare#1: {f3(bare1['train_time_s'])}")
    print(f"                        Ray:    {f3(rayr['train_time_s'])}")
    print(f"                        bare#2: {f3(bare2['train_time_s'])}")
    print(f"report periods          bare#1: {f3(bare1['report_periods_s'])}")
    print(f"                        Ray:    {f3(rayr['report_periods_s'])}")
    print(f"                        bare#2: {f3(bare2['report_periods_s'])}")
    print(f"CPU s per epoch period  bare#1: {f3(bare1['cpu_periods_s'])}")
    print(f"                        Ray:    {f3(rayr['cpu_periods_s'])}")
    print(f"                        bare#2: {f3(bare2['cpu_periods_s'])}")
    print()
    print("| quantity | bare | Ray Train (1 worker) | Ray / bare |")
    print("|---|---:|---:|---:|")
    print(f"| epoch `train_time_s`, median of epochs 2..N | {pooled_train:.3f} s | {rayr['train_time_median_s']:.3f} s "
          f"| **{out['ratio_train_time']:.2f}** |")
    print(f"| epoch period (report to report), median | {pooled_period:.3f} s | {rayr['epoch_period_median_s']:.3f} s "
          f"| **{out['ratio_epoch_period']:.2f}** |")
    print(f"| epoch period CPU time of the training process, median | {pooled_cpu:.3f} s "
          f"| {rayr['cpu_period_median_s']:.3f} s | **{out['ratio_epoch_cpu']:.2f}** |")
    bare_first = statistics.median([bare1["first_report_s"], bare2["first_report_s"]])
    print(f"| wall time to first report | {bare_first:.1f} s "
          f"| {rayr['first_report_s']:.1f} s (controller sees it at {rayr['controller_first_report_s']:.1f} s) | |")
    print(f"| start-up = first report − one epoch period | {bare_startup:.1f} s | {rayr['startup_s']:.1f} s "
          f"| **+{out['ray_extra_startup_s']:.1f} s** |")
    print(f"| `ray.init` (once per sweep, not per trial) | | {ray_init_s:.1f} s | |")
    print(f"| worker report → controller callback, median lag | | {rayr['controller_lag_median_s']:.2f} s | |")
    print(f"| `trainer.fit()` total | | {rayr['fit_total_s']:.1f} s | |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
