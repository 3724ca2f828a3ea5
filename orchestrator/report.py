"""``e2kd report``: the KD baseline vs the best e²KD trial of a sweep, from MLflow, plus plots.

Plots (PNG, saved and logged to the sweep's parent run): the search metric against λ and τ
(KD baseline drawn as a line), and Optuna's parameter importance computed on a study rebuilt from
the child runs.
"""
from __future__ import annotations

import math
import os
from typing import Any

from mlflow import MlflowClient

from orchestrator import tracking

SHOW = ("acc", "agreement", "exp_sim", "worst_group_acc", "epg", "iou", "f1")


def _is_num(s: str) -> bool:
    try:
        float(s)
        return True
    except (TypeError, ValueError):
        return False


def load_sweep(client: MlflowClient, experiment: str, sweep: str | None):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"MLflow experiment {tracking.short(repr(experiment), 100)} not found in "
                         f"{tracking.mask_uri(client.tracking_uri)}")
    flt = tracking.tag_equals(tracking.TAG_ROLE, "parent") + (
        f" and {tracking.tag_equals(tracking.TAG_SWEEP, sweep)}" if sweep else "")
    parents = client.search_runs([exp.experiment_id], flt, order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise ValueError(f"no sweep{' ' + tracking.short(repr(sweep), 100) if sweep else ''} in experiment "
                         f"{tracking.short(repr(experiment), 100)}")
    parent = parents[0]
    children = client.search_runs([exp.experiment_id], tracking.tag_equals(tracking.TAG_PARENT, parent.info.run_id),
                                  max_results=10000)
    return parent, children


def summarise(parent, children) -> dict[str, Any]:
    metric = parent.data.tags.get("e2kd.metric", "val_agreement")
    mode = parent.data.tags.get("e2kd.mode", "max")
    done = [r for r in children if metric in r.data.metrics]
    kd = [r for r in done if r.data.tags.get("method") == "kd"]
    e2 = [r for r in done if r.data.tags.get("method") == "e2kd"]
    pick = max if mode == "max" else min
    best = pick(e2, key=lambda r: r.data.metrics[metric]) if e2 else None
    return {"metric": metric, "mode": mode, "kd": kd[0] if kd else None, "best": best, "runs": done,
            "failed": [r for r in children if r.info.status == "FAILED"]}


def table(summary: dict[str, Any]) -> str:
    kd, best = summary["kd"], summary["best"]
    runs = [r for r in (kd, best) if r is not None]
    keys = sorted({k for r in runs for k in r.data.metrics if k.split("_", 1)[-1] in SHOW or k.endswith(SHOW)
                   if not k.startswith("train_")})
    lines = [f"Sweep result ({len(summary['runs'])} finished trials, {len(summary['failed'])} failed; "
             f"selected by {summary['metric']} ({summary['mode']}))", ""]
    head = f"{'metric':<28}{'KD (λ=0)':>12}{'best e²KD':>12}{'Δ':>10}"
    lines += [head, "-" * len(head)]
    for k in keys:
        a = kd.data.metrics.get(k, math.nan) if kd else math.nan
        b = best.data.metrics.get(k, math.nan) if best else math.nan
        lines.append(f"{k:<28}{a:>12.4f}{b:>12.4f}{b - a:>+10.4f}")
    if best is not None:
        p = best.data.params
        lines += ["", "best e²KD trial: " + ", ".join(f"{k}={p[k]}" for k in sorted(p)
                                                      if k in ("loss.lam", "loss.temperature", "student", "optim.lr", "optim.name"))]
    return "\n".join(lines)


def plots(summary: dict[str, Any], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    metric, runs, kd = summary["metric"], summary["runs"], summary["kd"]
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in ((axes[0], "loss.lam", "λ (explanation weight)"), (axes[1], "loss.temperature", "τ")):
        pts = [(float(r.data.params[key]), r.data.metrics[metric]) for r in runs
               if _is_num(r.data.params.get(key, "")) and r.data.tags.get("method") == "e2kd"]
        if pts:
            ax.scatter(*zip(*pts), label="e²KD trials")
        if kd is not None:
            ax.axhline(kd.data.metrics[metric], color="k", ls="--", label="KD baseline (λ=0)")
        if key == "loss.lam" and pts:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "metric_vs_lambda_tau.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    imp = importance(summary)
    if imp:
        fig, ax = plt.subplots(figsize=(5, 0.5 + 0.4 * len(imp)))
        names = list(imp)[::-1]
        ax.barh(names, [imp[n] for n in names])
        ax.set_xlabel(f"importance for {metric} (fANOVA)")
        fig.tight_layout()
        path = os.path.join(out_dir, "param_importance.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def importance(summary: dict[str, Any]) -> dict[str, float]:
    """Optuna parameter importance on a study rebuilt from the searched params of the e²KD runs."""
    import optuna

    runs = [r for r in summary["runs"] if r.data.tags.get("method") == "e2kd"]
    searched = [k for k in ("loss.lam", "loss.temperature", "optim.lr", "optim.weight_decay", "student", "optim.name")
                if len({r.data.params.get(k) for r in runs}) > 1]
    if len(runs) < 3 or not searched:
        return {}
    dists: dict[str, Any] = {}
    for k in searched:
        vals = [r.data.params[k] for r in runs]
        if all(_is_num(v) for v in vals):
            lo, hi = min(map(float, vals)), max(map(float, vals))
            dists[k] = optuna.distributions.FloatDistribution(lo, hi, log=lo > 0 and hi / lo > 20)
        else:
            dists[k] = optuna.distributions.CategoricalDistribution(sorted(set(vals)))
    study = optuna.create_study(direction="maximize" if summary["mode"] == "max" else "minimize")
    for r in runs:
        params = {k: (float(r.data.params[k]) if isinstance(d, optuna.distributions.FloatDistribution) else r.data.params[k])
                  for k, d in dists.items()}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=r.data.metrics[summary["metric"]]))
    try:
        return optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):
        return {}


def print_report(experiment: str, tracking_uri: str, sweep: str | None = None, out_dir: str | None = None) -> str:
    uri = tracking.resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    parent, children = load_sweep(client, experiment, sweep)
    summary = summarise(parent, children)
    text = table(summary)
    print(text)
    out = out_dir or os.path.join("reports", parent.data.tags.get(tracking.TAG_SWEEP, parent.info.run_id))
    for path in plots(summary, out):
        client.log_artifact(parent.info.run_id, path, artifact_path="report")
        print(f"[e2kd] plot: {path}")
    report_path = os.path.join(out, "report.txt")
    with open(report_path, "w") as f:
        f.write(text + "\n")
    client.log_artifact(parent.info.run_id, report_path, artifact_path="report")
    return text


def by_lambda_and_seed(children) -> dict[float, dict[int, dict[str, float]]]:
    """{λ: {seed: final metrics}} over the finished runs of a compare sweep."""
    groups: dict[float, dict[int, dict[str, float]]] = {}
    for r in children:
        if r.info.status != "FINISHED":
            continue
        lam = float(r.data.params.get("loss.lam", "nan"))
        seed = int(r.data.params.get("seed", "0"))
        groups.setdefault(lam, {})[seed] = r.data.metrics
    return groups


def _mean_sd(vals: list[float]) -> tuple[float, float]:
    import statistics

    vals = [v for v in vals if v == v]
    if not vals:
        return math.nan, math.nan
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _fmt(vals: list[float]) -> str:
    m, sd = _mean_sd(vals)
    return "–" if m != m else f"{100 * m:.1f} ± {100 * sd:.1f}"


def compare_table(children, metrics: tuple[str, ...] | None = None) -> str:
    """Markdown table: mean ± std over seeds for each λ, and the per-seed paired difference to KD."""
    groups = by_lambda_and_seed(children)
    if not groups:
        return "(no finished runs)"
    keys = metrics or tuple(sorted({k for g in groups.values() for m in g.values() for k in m
                                    if k.startswith(("test", "val_")) and k.split("_", 1)[-1] in SHOW
                                    or k.endswith(("_acc", "_agreement", "_exp_sim"))
                                    if not k.startswith("train_") and "group_acc_" not in k}))
    lams = sorted(groups)
    base = groups.get(0.0)
    head = ["metric (%)"] + [("KD (λ=0)" if lam == 0 else f"e²KD λ={lam:g}") for lam in lams]
    if base is not None:
        head += [f"Δ λ={lam:g} − KD (paired)" for lam in lams if lam != 0]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        row = [k] + [_fmt([m.get(k, math.nan) for m in groups[lam].values()]) for lam in lams]
        if base is not None:
            for lam in lams:
                if lam == 0:
                    continue
                common = sorted(set(base) & set(groups[lam]))
                row.append(_fmt([groups[lam][s].get(k, math.nan) - base[s].get(k, math.nan) for s in common]))
        lines.append("| " + " | ".join(row) + " |")
    seeds = sorted({s for g in groups.values() for s in g})
    lines.append(f"\nseeds: {seeds}; {sum(len(g) for g in groups.values())} finished runs")
    return "\n".join(lines)


def print_compare(experiment: str, tracking_uri: str, sweep: str, out_dir: str | None = None) -> str:
    uri = tracking.resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    parent, children = load_sweep(client, experiment, sweep)
    text = compare_table(children)
    print(text)
    out = out_dir or os.path.join("reports", sweep)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "compare.md")
    with open(path, "w") as f:
        f.write(text + "\n")
    client.log_artifact(parent.info.run_id, path, artifact_path="report")
    return text


def trend(client: MlflowClient, experiment: str, sweeps: list[str], by: str, metrics: tuple[str, ...]) -> list[dict]:
    """KD vs e²KD across compare sweeps that differ in one setting ``by`` (a run param, e.g.
    ``data.shots`` or ``student``): one row per sweep and metric, sorted by that setting."""
    rows = []
    for sweep in sweeps:
        _, children = load_sweep(client, experiment, sweep)
        values = {r.data.params.get(by) for r in children if r.info.status == "FINISHED"}
        if len(values) != 1 or None in values:
            raise ValueError(f"sweep {sweep!r}: runs must share one value of {by!r}, found {sorted(map(str, values))}")
        groups = by_lambda_and_seed(children)
        lams = [lam for lam in groups if lam != 0]
        if 0.0 not in groups or len(lams) != 1:
            raise ValueError(f"sweep {sweep!r}: needs KD (λ=0) runs and runs at one e²KD λ, found λ={sorted(groups)} "
                             "(make it with `e2kd compare`)")
        x = values.pop()
        kd, e2 = groups[0.0], groups[lams[0]]
        seeds = sorted(set(kd) & set(e2))
        for m in metrics:
            rows.append({"sweep": sweep, "x": x, "metric": m,
                         "lam": lams[0], "seeds": seeds,
                         "kd": [kd[s].get(m, math.nan) for s in seeds], "e2kd": [e2[s].get(m, math.nan) for s in seeds],
                         "delta": [e2[s].get(m, math.nan) - kd[s].get(m, math.nan) for s in seeds]})
    key = (lambda r: (float(r["x"]), r["metric"])) if all(_is_num(r["x"]) for r in rows) else None
    return sorted(rows, key=key) if key else rows


def trend_table(rows: list[dict], by: str) -> str:
    lines = [f"| {by} | metric (%) | KD (λ=0) | e²KD | Δ e²KD − KD (paired) | seeds | sweep |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['x']} | {r['metric']} | {_fmt(r['kd'])} | {_fmt(r['e2kd'])} (λ={r['lam']:g}) | "
                     f"{_fmt(r['delta'])} | {len(r['seeds'])} | {r['sweep']} |")
    return "\n".join(lines)


def trend_plot(rows: list[dict], by: str, path: str) -> str:
    """Per metric: KD and e²KD (mean ± std over seeds) against ``by``, and the paired gain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    numeric = all(_is_num(r["x"]) for r in rows)
    fig, axes = plt.subplots(2, len(metrics), figsize=(4.2 * len(metrics), 6), squeeze=False, sharex=True)
    for j, m in enumerate(metrics):
        rs = [r for r in rows if r["metric"] == m]
        xs = [float(r["x"]) for r in rs] if numeric else list(range(len(rs)))
        for key, label, fmt in (("kd", "KD", "o--"), ("e2kd", "e²KD", "s-")):
            ms = [_mean_sd(r[key]) for r in rs]
            axes[0][j].errorbar(xs, [100 * a for a, _ in ms], [100 * b for _, b in ms], fmt=fmt, capsize=3, label=label)
        ds = [_mean_sd(r["delta"]) for r in rs]
        axes[1][j].errorbar(xs, [100 * a for a, _ in ds], [100 * b for _, b in ds], fmt="s-", color="C2", capsize=3)
        axes[1][j].axhline(0, color="k", lw=0.8)
        axes[0][j].set_title(m)
        axes[0][j].set_ylabel(f"{m} (%)")
        axes[1][j].set_ylabel("Δ e²KD − KD (points, paired)")
        axes[1][j].set_xlabel(by)
        axes[0][j].legend(fontsize=8)
        if numeric and max(xs) >= 5 * min(xs) > 0:
            axes[1][j].set_xscale("log")
        axes[1][j].set_xticks(xs, [str(r["x"]) for r in rs])
        axes[1][j].minorticks_off()
    fig.suptitle("mean ± std over seeds")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def print_trend(experiment: str, tracking_uri: str, sweeps: list[str], by: str,
                metrics: tuple[str, ...] = ("test_acc", "test_agreement"), out_dir: str | None = None) -> str:
    """``e2kd report EXPERIMENT --trend SWEEP ... --by KEY``: table + plot of the gain against KEY."""
    client = MlflowClient(tracking.resolve_tracking_uri(tracking_uri))
    rows = trend(client, experiment, sweeps, by, metrics)
    text = trend_table(rows, by)
    print(text)
    out = out_dir or os.path.join("reports", f"trend-{by}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "trend.md"), "w") as f:
        f.write(text + "\n")
    print(f"[e2kd] plot: {trend_plot(rows, by, os.path.join(out, f'gain_vs_{by}.png'))}")
    return text
