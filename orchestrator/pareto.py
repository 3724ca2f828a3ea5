"""Accuracy vs explanation fidelity: the Pareto front of a multi-objective sweep.

A sweep with ``search.objectives`` tags its MLflow parent run with them
(:data:`orchestrator.optuna_store.TAG_OBJECTIVES`). The front is computed here from the child
runs' final metrics (what MLflow holds, so a report needs neither Ray nor the Optuna storage), shown
as a table and a scatter plot with the KD baseline marked, and logged to the parent run.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from orchestrator import tracking
from orchestrator.optuna_store import TAG_OBJECTIVES

MODES = {"max": 1.0, "min": -1.0}  # objective mode -> sign that makes "larger is better"


@dataclass(frozen=True)
class Point:
    """One finished trial in objective space."""

    run_id: str
    trial_id: str
    label: str  # "KD baseline", "KD (matched)", "e²KD λ=…"
    values: tuple[float, ...]


def objectives_of(parent) -> list[tuple[str, str]]:
    """The (metric, mode) pairs a sweep optimised, from its parent run ([] for a single objective)."""
    text = parent.data.tags.get(TAG_OBJECTIVES, "")
    out = []
    for part in filter(None, text.split(",")):
        metric, _, mode = part.rpartition(":")
        if metric and mode in MODES:
            out.append((metric, mode))
    return out if len(out) >= 2 else []


def dominates(a: tuple[float, ...], b: tuple[float, ...], modes: tuple[str, ...]) -> bool:
    """``a`` is at least as good as ``b`` in every objective and better in one."""
    better = False
    for x, y, m in zip(a, b, modes):
        x, y = MODES[m] * x, MODES[m] * y
        if x < y:
            return False
        better |= x > y
    return better


def front(values: list[tuple[float, ...]], modes: tuple[str, ...]) -> list[int]:
    """Indices of the non-dominated points (equal points are all kept: neither dominates)."""
    return [i for i, v in enumerate(values) if not any(dominates(w, v, modes) for j, w in enumerate(values) if j != i)]


def _label(run) -> str:
    if float(run.data.params.get("loss.lam", "nan")) == 0:
        role = run.data.tags.get(tracking.TAG_KD_ROLE, "baseline")
        return "KD baseline" if role == "baseline" else f"KD ({role})"
    return f"e²KD λ={float(run.data.params['loss.lam']):.3g}"


def points(children, metrics: list[str]) -> list[Point]:
    """Finished child runs with a finite final value of every objective."""
    out = []
    for r in children:
        vals = tuple(r.data.metrics.get(m, math.nan) for m in metrics)
        if r.info.status == "FINISHED" and all(math.isfinite(v) for v in vals):
            out.append(Point(r.info.run_id, r.data.tags.get(tracking.TAG_TRIAL, "?"), _label(r), vals))
    return out


def table(pts: list[Point], on_front: set[int], objectives: list[tuple[str, str]]) -> str:
    """Markdown: the front first (best primary objective first), then the dominated trials."""
    head = "| trial | run | " + " | ".join(f"{m} ({mode})" for m, mode in objectives) + " | Pareto |"
    lines = [head, "|---" * (len(objectives) + 3) + "|"]
    sign = MODES[objectives[0][1]]
    order = sorted(range(len(pts)), key=lambda i: (i not in on_front, -sign * pts[i].values[0]))
    for i in order:
        p = pts[i]
        lines.append(f"| {p.label} | {p.trial_id} | " + " | ".join(f"{v:.4f}" for v in p.values)
                     + f" | {'★' if i in on_front else ''} |")
    return "\n".join(lines)


def plot(pts: list[Point], on_front: set[int], objectives: list[tuple[str, str]], path: str) -> str:
    """Scatter of the first two objectives: every trial, the front joined, the KD baseline marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (mx, _), (my, _) = objectives[0], objectives[1]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    rest = [p for i, p in enumerate(pts) if i not in on_front and not p.label.startswith("KD")]
    ax.scatter([p.values[0] for p in rest], [p.values[1] for p in rest], c="0.6", label="dominated e²KD trial")
    fr = sorted((pts[i] for i in on_front), key=lambda p: p.values[0])
    ax.plot([p.values[0] for p in fr], [p.values[1] for p in fr], "o-", c="tab:blue", label="Pareto front")
    for p in pts:
        if p.label.startswith("KD"):
            ax.scatter([p.values[0]], [p.values[1]], marker="*", s=220, c="tab:red", zorder=5, label=p.label)
    ax.set_xlabel(mx)
    ax.set_ylabel(my)
    ax.set_title("accuracy vs explanation fidelity" if "acc" in mx else f"{mx} vs {my}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def section(client, parent, children, out_dir: str) -> tuple[str, list[Point], set[int]]:
    """The report's Pareto section ("" for a single-objective sweep); the table and the plot are
    logged to the parent run under ``report/``."""
    objectives = objectives_of(parent)
    if not objectives:
        return "", [], set()
    metrics = [m for m, _ in objectives]
    pts = points(children, metrics)
    on_front = set(front([p.values for p in pts], tuple(mode for _, mode in objectives)))
    text = (f"\nPareto front over {', '.join(f'{m} ({mode})' for m, mode in objectives)}: {len(on_front)} of "
            f"{len(pts)} finished trials (★)\n\n" + (table(pts, on_front, objectives) if pts else "(no finished trials)"))
    if pts:
        md = os.path.join(out_dir, "pareto.md")
        os.makedirs(out_dir, exist_ok=True)
        with open(md, "w") as f:
            f.write(text.strip() + "\n")
        png = plot(pts, on_front, objectives, os.path.join(out_dir, "pareto.png"))
        for path in (md, png):
            client.log_artifact(parent.info.run_id, path, artifact_path="report")
        ids = ",".join(sorted(pts[i].run_id for i in on_front))
        if len(ids) <= 5000:  # MLflow's tag-value limit; the table artifact holds the front anyway
            client.set_tag(parent.info.run_id, "e2kd.pareto_runs", ids)
    return text, pts, on_front


def front_run_ids(parent) -> set[str]:
    """The run ids the last report put on the front (the parent's tag)."""
    return set(filter(None, parent.data.tags.get("e2kd.pareto_runs", "").split(",")))


def as_dict(pts: list[Point], on_front: set[int]) -> list[dict[str, Any]]:
    return [{"run_id": p.run_id, "label": p.label, "values": p.values, "pareto": i in on_front}
            for i, p in enumerate(pts)]
