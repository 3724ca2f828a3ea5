"""Sweep wall time with and without the early-stopping scheduler (ASHA), and the best metric each finds.

Runs the same spec twice through the product's own sweep path (:func:`orchestrator.sweep.run_sweep`:
Optuna TPE, same seed, KD baseline first, Ray Train trials, MLflow parent + children) on one local
Ray instance — once with ``search.scheduler=asha`` (the spec's rungs) and once with
``search.scheduler=none`` (every trial runs all epochs) — into a throw-away storage folder and
SQLite store. Printed: wall time of each sweep and their ratio, epochs trained, trials stopped
early, the best ``search.metric`` at each trial's last epoch (what the sweep hands the user), and
when that best value was first reached.

Caveat, stated in the output: with a sequential searcher, ASHA changes what TPE sees (stopped
trials report fewer epochs), so after the first few trials the two sweeps may propose different
configurations; the comparison is of the two sweeps as a user runs them, not of identical trials.

    python bench/asha.py --set search.grace_period=4   # quickstart, ASHA from epoch 4 (~20 min on 2 CPUs)
    python bench/asha.py --set search.num_trials=4 --set epochs=8   # a smaller check
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def one_sweep(spec_path: str, overrides: list[str], scheduler: str, tmp: str) -> dict:
    from orchestrator.spec import load_spec
    from orchestrator.sweep import run_sweep

    name = f"asha-bench-{scheduler}"
    spec = load_spec(spec_path, overrides + [f"name={name}", f"search.scheduler={scheduler}",
                                             f"storage={os.path.join(tmp, 'runs')}",
                                             f"mlflow.tracking_uri=sqlite:///{os.path.join(tmp, 'mlflow.db')}"])
    s = spec.search
    t0 = time.time()
    grid = run_sweep(spec, log=lambda msg: print(msg, flush=True))
    wall = time.time() - t0
    best, best_t, epochs, stopped = None, None, 0, 0
    better = (lambda a, b: a > b) if s.mode == "max" else (lambda a, b: a < b)
    for r in grid:
        df = r.metrics_dataframe
        if df is None or s.metric not in df:
            continue
        epochs += len(df)
        stopped += int(df["epoch"].iloc[-1] < spec.train.epochs)
        last = float(df[s.metric].iloc[-1])
        # when this trial's final report reached the driver, relative to the sweep's start
        t_last = float(df["timestamp"].iloc[-1]) - t0
        if best is None or better(last, best) or (last == best and t_last < best_t):
            best, best_t = last, t_last
    return {"scheduler": scheduler, "wall_s": wall, "trials": len(grid), "epochs": epochs, "stopped": stopped,
            "best": best, "best_reached_s": best_t, "metric": s.metric, "max_epochs": spec.train.epochs}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spec", nargs="?", default=os.path.join(ROOT, "sweeps", "quickstart.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="spec override (both sweeps)")
    args = p.parse_args()
    os.chdir(ROOT)  # the spec's relative paths (teacher) resolve against the repository
    import ray

    from orchestrator.cli import ensure_teacher
    from orchestrator.spec import load_spec
    from orchestrator.sweep import init_ray

    spec = load_spec(args.spec, args.set)
    ensure_teacher(spec)
    load0 = os.getloadavg()
    out = []
    with tempfile.TemporaryDirectory(prefix="e2kd-asha-bench-") as tmp:
        init_ray(None, spec.resources.num_cpus)
        try:
            for sched in ("asha", "none"):
                print(f"[asha] sweep with scheduler={sched} ...", flush=True)
                out.append(one_sweep(args.spec, args.set, sched, tmp))
        finally:
            ray.shutdown()
    load1 = os.getloadavg()
    a, n = out
    print(f"\n{os.path.relpath(args.spec, ROOT)} {' '.join(args.set)}: {a['trials']} trials × up to "
          f"{a['max_epochs']} epochs, {spec.resources.workers_per_trial} workers each; {os.cpu_count()} CPUs, "
          f"load average {load0[0]:.1f} -> {load1[0]:.1f}")
    print(f"| scheduler | sweep wall time | epochs trained | trials stopped early | best {a['metric']} (last epoch) "
          f"| best first reached at |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in out:
        print(f"| {r['scheduler']} | {r['wall_s']:.0f} s | {r['epochs']} | {r['stopped']}/{r['trials']} | "
              f"{r['best']:.4f} | {r['best_reached_s']:.0f} s |")
    print(f"\n**ASHA / no scheduler: wall time {a['wall_s'] / n['wall_s']:.2f}, epochs {a['epochs'] / n['epochs']:.2f}; "
          f"best metric {a['best']:.4f} vs {n['best']:.4f} (Δ {a['best'] - n['best']:+.4f})**")
    print("(TPE is sequential: stopped trials report fewer epochs, so later proposals may differ between the sweeps.)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
