"""`e2kd compare` tables and `e2kd report --trend` against numbers computed here with numpy, on an
MLflow store filled through the same tracking functions the sweeps use (no Ray, no training)."""
from __future__ import annotations

import os

import numpy as np
import pytest
from mlflow import MlflowClient

from orchestrator import cli, report, tracking

# {sweep: (shots, {seed: (kd test_acc, e2kd test_acc)})}; seed 2 of "s30" has no e²KD run (failed).
SWEEPS = {
    "s10": (10, {0: (0.90, 0.93), 1: (0.85, 0.92), 2: (0.88, 0.87)}),
    "s3": (3, {0: (0.50, 0.62), 1: (0.55, 0.60), 2: (0.40, 0.58)}),
    "s30": (30, {0: (0.97, 0.976), 1: (0.96, 0.958), 2: (0.95, None)}),
}


@pytest.fixture()
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = tracking.ensure_experiment(client, "exp", str(tmp_path / "art"))
    for sweep, (shots, seeds) in SWEEPS.items():
        parent = tracking.create_parent(client, exp, sweep, "", {"data.shots": shots})
        for seed, accs in seeds.items():
            for lam, acc in zip((0.0, 1.0), accs):
                run = tracking.get_or_create_child(uri, exp, parent, sweep, f"{sweep}-{seed}-{lam}",
                                                   params={"loss.lam": lam, "seed": seed, "data.shots": shots},
                                                   tags={"method": "kd" if lam == 0 else "e2kd"})
                if acc is None:
                    client.set_terminated(run, "FAILED")
                    continue
                client.log_metric(run, "test_acc", acc)
                client.set_terminated(run, "FINISHED")
    return uri


def _ms(xs) -> str:
    xs = 100 * np.asarray(xs)
    return f"{xs.mean():.1f} ± {xs.std(ddof=1):.1f}"


def test_compare_table_is_mean_std_and_paired_difference(store):
    _, children = report.load_sweep(MlflowClient(store), "exp", "s3")
    text = report.compare_table(children)
    kd, e2 = zip(*SWEEPS["s3"][1].values())
    row = next(line for line in text.splitlines() if line.startswith("| test_acc"))
    from scipy import stats

    d = np.subtract(e2, kd)
    p = stats.ttest_rel(e2, kd).pvalue  # the paired test, from its own scipy entry point
    assert row == f"| test_acc | {_ms(kd)} | {_ms(e2)} | {_ms(d)} | {int((d > 0).sum())}/3 | {p:.2g} |"
    assert "6 finished runs" in text and "p: two-sided paired t-test" in text
    per_seed = [line for line in text.splitlines() if line.startswith("| test_acc")][1]
    assert per_seed == "| test_acc | " + " | ".join(f"{100 * x:+.1f}" for x in d) + " |"


def test_trend_sorts_numerically_pairs_seeds_and_plots(store, tmp_path, capsys):
    out = tmp_path / "trend"
    assert cli.main(["report", "exp", "--trend", "s10", "s30", "s3", "--by", "data.shots", "--metrics", "test_acc",
                     "--tracking-uri", store, "--out", str(out)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "test_acc" in line]
    assert [r.split(" | ")[0] for r in rows] == ["| 3", "| 10", "| 30"]  # numeric order, not "10" < "3"
    # 30 shots: seed 2's e²KD run failed, so its KD run is left out of the paired comparison too
    kd, e2 = [0.97, 0.96], [0.976, 0.958]
    assert rows[2].split(" | ")[2:6] == [_ms(kd), f"{_ms(e2)} (λ=1)", _ms(np.subtract(e2, kd)), "2"]
    png = out / "gain_vs_data.shots.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10_000
    assert (out / "trend.md").read_text().strip().splitlines()[2] == rows[0]


def test_trend_refuses_sweeps_it_cannot_compare(store, tmp_path, capsys):
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("exp").experiment_id
    parent = tracking.create_parent(client, exp, "mixed", "", {})
    for i, (lam, shots) in enumerate([(0.0, 3), (1.0, 10)]):
        run = tracking.get_or_create_child(store, exp, parent, "mixed", f"m{i}", params={"loss.lam": lam, "seed": 0,
                                           "data.shots": shots}, tags={})
        client.set_terminated(run, "FINISHED")
    assert cli.main(["report", "exp", "--trend", "s3", "mixed", "--tracking-uri", store, "--out", str(tmp_path)]) == 2
    assert "sweep 'mixed': runs must share one value of 'data.shots', found ['10', '3']" in capsys.readouterr().err
    assert cli.main(["report", "exp", "--trend", "s3", "--by", "student", "--tracking-uri", store]) == 2
    assert "runs must share one value of 'student'" in capsys.readouterr().err
    assert cli.main(["report", "exp", "--trend", "nope", "--tracking-uri", store]) == 2
    assert "no sweep 'nope' in experiment 'exp'" in capsys.readouterr().err
