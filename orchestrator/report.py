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


class UnequalComparison(ValueError):
    """The KD and e²KD runs a report would put side by side differ in more than λ."""


# Params that identify a run rather than its recipe.
_NOT_SETTING = {"loss.lam"}
_ROLE_ORDER = ("baseline", "matched", "tuned")


def _setting(run) -> dict[str, str]:
    return {k: v for k, v in run.data.params.items() if k not in _NOT_SETTING}


def _differences(a, b) -> list[str]:
    sa, sb = _setting(a), _setting(b)
    return [f"{k} {_short(sa.get(k))} vs {_short(sb.get(k))}" for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]


def _short(v: Any, n: int = 40) -> str:
    v = "-" if v is None else str(v)
    return v if len(v) <= n else v[: n - 1] + "…"


def _role(run) -> str:
    return run.data.tags.get(tracking.TAG_KD_ROLE, "baseline")


def summarise(parent, children, allow_unequal: bool = False) -> dict[str, Any]:
    """Pick what the report compares: the best e²KD run that ran every epoch, and the KD run of the
    same setting (student, τ, optimiser, epochs — every param but λ). Raises
    :class:`UnequalComparison` when there is none, unless ``allow_unequal``. With ``kd_arm: tuned``
    also the best KD run of the KD arm's equal budget."""
    metric = parent.data.tags.get("e2kd.metric", "val_agreement")
    mode = parent.data.tags.get("e2kd.mode", "max")
    pick = max if mode == "max" else min
    done = [r for r in children if metric in r.data.metrics and r.info.status == "FINISHED"]
    stopped = [r for r in done if r.data.tags.get(tracking.TAG_STOPPED_EARLY)]
    full = [r for r in done if r not in stopped]
    e2 = [r for r in full if r.data.tags.get("method") == "e2kd"]
    kd_all = [r for r in done if r.data.tags.get("method") == "kd"]
    kd = [r for r in full if r.data.tags.get("method") == "kd"]
    best = pick(e2, key=lambda r: r.data.metrics[metric]) if e2 else None
    kd_ref, unequal = None, None
    if best is not None and kd_all:
        same = sorted((r for r in kd if not _differences(r, best)),
                      key=lambda r: _ROLE_ORDER.index(_role(r)) if _role(r) in _ROLE_ORDER else 9)
        if same:
            kd_ref = same[0]
        else:
            kd_ref = sorted(kd_all, key=lambda r: (r in stopped, _role(r) != "baseline"))[0]
            diffs = _differences(kd_ref, best)
            if kd_ref in stopped:
                diffs.insert(0, f"the KD run was stopped early ({kd_ref.data.tags[tracking.TAG_STOPPED_EARLY]})")
            unequal = "; ".join(diffs)
            if not allow_unequal:
                raise UnequalComparison(
                    f"report: the best e²KD run and the KD run differ beyond λ ({_short(unequal, 300)}): refusing an "
                    "unequal comparison; `e2kd sweep SPEC --resume` adds the KD run of the best e²KD setting, "
                    "--allow-unequal shows it anyway")
    elif kd_all:
        kd_ref = sorted(kd_all, key=lambda r: (r in stopped, _role(r) != "baseline"))[0]
    arm = parent.data.tags.get("e2kd.kd_arm") == "tuned"
    kd_budget = [r for r in kd_all if _role(r) in ("baseline", "tuned")]
    best_kd = None
    if arm:
        cands = [r for r in kd_budget if r not in stopped]
        best_kd = pick(cands, key=lambda r: r.data.metrics[metric]) if cands else None
    return {"metric": metric, "mode": mode, "kd": kd_ref, "best": best, "runs": done, "stopped": stopped,
            "failed": [r for r in children if r.info.status == "FAILED"], "unequal": unequal,
            "n_e2kd": sum(r.data.tags.get("method") == "e2kd" for r in done), "n_kd": len(kd_budget),
            "kd_arm": arm, "best_kd": best_kd}


def table(summary: dict[str, Any]) -> str:
    kd, best, best_kd = summary["kd"], summary["best"], summary["best_kd"]
    runs = [r for r in (kd, best, best_kd) if r is not None]
    keys = sorted({k for r in runs for k in r.data.metrics if k.split("_", 1)[-1] in SHOW or k.endswith(SHOW)
                   if not k.startswith("train_")})
    lines = [f"Sweep result ({len(summary['runs'])} finished trials, {len(summary['failed'])} failed, "
             f"{len(summary['stopped'])} stopped early by the scheduler; selected by {summary['metric']} "
             f"({summary['mode']}) among the runs that trained every epoch)"]
    role = _role(kd) if kd is not None else None
    if summary["kd_arm"]:
        lines.append(f"tuning budgets: e²KD {summary['n_e2kd']} trials, KD {summary['n_kd']} trials (search.kd_arm: "
                     "tuned: KD searched the same space without λ with the e²KD budget, or each of its settings once "
                     "where it has fewer); 'KD same setting' is the KD run of the best e²KD's student/τ/optimiser")
    elif kd is not None:
        lines.append(f"tuning budgets: e²KD best of {summary['n_e2kd']} trials vs KD at the same student/τ/optimiser/"
                     f"epochs ({role} run), not tuned — unequal budgets; search.kd_arm: tuned gives KD the same")
    if summary["unequal"]:
        lines.append(f"WARNING (--allow-unequal): the KD run differs beyond λ: {summary['unequal']}")
    lines.append("")
    cols = [("KD same setting", kd), ("best e²KD", best)] + ([("best KD", best_kd)] if summary["kd_arm"] else [])
    head = f"{'metric':<28}" + "".join(f"{c:>17}" for c, _ in cols) + f"{'Δ e²KD−KD':>12}" + \
        (f"{'Δ best−best':>13}" if summary["kd_arm"] else "")
    lines += [head, "-" * len(head)]
    val = lambda r, k: r.data.metrics.get(k, math.nan) if r is not None else math.nan  # noqa: E731
    for k in keys:
        row = f"{k:<28}" + "".join(f"{val(r, k):>17.4f}" for _, r in cols) + f"{val(best, k) - val(kd, k):>+12.4f}"
        if summary["kd_arm"]:
            row += f"{val(best, k) - val(best_kd, k):>+13.4f}"
        lines.append(row)
    show = ("loss.lam", "loss.temperature", "student", "optim.lr", "optim.name", "epochs")
    named = [(label, r) for label, r in (("best e²KD trial", best), ("KD run (same setting)", kd),
                                         ("best KD trial", best_kd)) if r is not None]
    lines += [""] if named else []
    for label, r in named:
        p = r.data.params
        lines.append(f"{label}: " + ", ".join(f"{k}={p[k]}" for k in sorted(p) if k in show))
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
            log_axis_ticks(ax, [x for x, _ in pts])
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


def log_axis_ticks(ax, values: list[float]) -> None:
    """A log x axis labelled at a few plain values (1, 2, 5 × 10^k inside the data's range, or
    only the powers of ten when those are many): matplotlib's own labels on a range under a decade
    put its minor-tick labels (2×10⁰, 3×10⁰, …) on top of one another."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    lo, hi = min(values), max(values)
    ax.set_xscale("log")
    ax.set_xlim(lo / 1.6, hi * 1.6)
    k0, k1 = math.floor(math.log10(lo / 1.6)), math.ceil(math.log10(hi * 1.6))
    ticks = [m * 10.0 ** k for k in range(k0, k1 + 1) for m in (1, 2, 5) if lo / 1.6 <= m * 10.0 ** k <= hi * 1.6]
    if len(ticks) > 7:
        ticks = [t for t in ticks if math.log10(t).is_integer()]
    if len(ticks) < 2:
        ticks = sorted({lo, hi})
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


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


def print_report(experiment: str, tracking_uri: str, sweep: str | None = None, out_dir: str | None = None,
                 allow_unequal: bool = False) -> str:
    uri = tracking.resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    parent, children = load_sweep(client, experiment, sweep)
    summary = summarise(parent, children, allow_unequal)
    text = table(summary)
    print(text)
    out = out_dir or os.path.join("reports", parent.data.tags.get(tracking.TAG_SWEEP, parent.info.run_id))
    for path in plots(summary, out):
        client.log_artifact(parent.info.run_id, path, artifact_path="report")
        print(f"[e2kd] plot: {path}")
    from orchestrator import pareto

    front_text, _, _ = pareto.section(client, parent, children, out)  # "" unless search.objectives
    if front_text:
        print(front_text)
        text += "\n" + front_text
    report_path = os.path.join(out, "report.txt")
    with open(report_path, "w") as f:
        f.write(text + "\n")
    client.log_artifact(parent.info.run_id, report_path, artifact_path="report")
    from orchestrator.registry import link_line

    print(link_line(uri, parent.info.experiment_id))
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
        for lam in lams:
            if lam != 0:
                head += [f"Δ λ={lam:g} − KD (paired)", "seeds Δ>0", "p (paired t)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        row = [k] + [_fmt([m.get(k, math.nan) for m in groups[lam].values()]) for lam in lams]
        if base is not None:
            for lam in lams:
                if lam == 0:
                    continue
                common = sorted(set(base) & set(groups[lam]))
                d = [groups[lam][s].get(k, math.nan) - base[s].get(k, math.nan) for s in common]
                d = [x for x in d if x == x]
                row += [_fmt(d), f"{sum(x > 0 for x in d)}/{len(d)}", _p_paired(d)]
        lines.append("| " + " | ".join(row) + " |")
    seeds = sorted({s for g in groups.values() for s in g})
    if base is not None:  # the per-seed differences behind each mean ± std and p-value
        for lam in lams:
            if lam == 0:
                continue
            common = sorted(set(base) & set(groups[lam]))
            lines += ["", f"per-seed Δ λ={lam:g} − KD (points)", "",
                      "| metric | " + " | ".join(f"seed {s}" for s in common) + " |", "|---" * (len(common) + 1) + "|"]
            for k in keys:
                lines.append(f"| {k} | " + " | ".join(
                    f"{100 * (groups[lam][s].get(k, math.nan) - base[s].get(k, math.nan)):+.1f}" for s in common) + " |")
    data_seeds = sorted({int(r.data.params["data.seed"]) for r in children
                         if r.info.status == "FINISHED" and "data.seed" in r.data.params})
    lines.append(f"\nseeds: {seeds}" + (f"; data subsets (data.seed): {data_seeds}" if data_seeds else "")
                 + f"; {sum(len(g) for g in groups.values())} finished runs; Δ: e²KD − KD on the same seed; "
                 "p: two-sided paired t-test over seeds")
    return "\n".join(lines)


def _p_paired(d: list[float]) -> str:
    """Two-sided paired t-test of the per-seed differences against 0 (scipy's, on the differences)."""
    from scipy import stats

    if len(d) < 2:
        return "–"
    if max(d) == min(d):  # no spread: the t statistic is undefined
        return "–"
    return f"{stats.ttest_1samp(d, 0.0).pvalue:.2g}"


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
