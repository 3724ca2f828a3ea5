"""Where a trial's time goes: the checkpoint / explanation-grid cadence, the start-up and per-epoch
phases a trial reports, and the sweep's summary table."""
from __future__ import annotations

import dataclasses
import os
import time

import pytest

import trainables.train_loop as tl
from orchestrator.spec import SpecError, load_spec
from orchestrator.sweep import asha_rungs, overhead_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QS = os.path.join(ROOT, "sweeps", "quickstart.yaml")


def _cfg(*extra):
    return load_spec(QS, list(extra)).train


def _run(cadence: tl.Cadence, epochs: int, epoch_time: float, cost: float) -> list[int]:
    out = []
    for e in range(1, epochs + 1):
        if cadence.checkpoint(e, epoch_time):
            out.append(e)
            cadence.wrote(cost)
    return out


def test_grid_every_n_epochs_and_at_the_end():
    c = tl.Cadence(_cfg("epochs=12", "explain_every=5"))
    assert [e for e in range(1, 13) if c.grid(e)] == [5, 10, 12]
    c = tl.Cadence(_cfg("epochs=12", "explain_every=0"))
    assert [e for e in range(1, 13) if c.grid(e)] == [12]


def test_checkpoint_cadence():
    # Every 3rd epoch, plus the grid's epochs (the PNG travels in a checkpoint) and the last one.
    assert _run(tl.Cadence(_cfg("epochs=12", "explain_every=5", "checkpoint_every=3")), 12, 1.0, 0.1) == \
        [3, 5, 6, 9, 10, 12]
    # auto: a checkpoint whenever the last one cost <= 5 % of the epochs since it.
    auto = _cfg("epochs=12", "explain_every=0")
    assert _run(tl.Cadence(auto), 12, 1.0, 0.01) == list(range(1, 13))  # cheap: every epoch
    assert _run(tl.Cadence(auto), 12, 1.0, 0.1) == [1, 3, 5, 7, 9, 11, 12]  # 0.1 s <= 5 % of 2 epochs
    assert _run(tl.Cadence(auto, frozenset({4})), 12, 1.0, 0.1) == [1, 3, 4, 6, 8, 10, 12]  # an ASHA rung
    with pytest.raises(SpecError, match="checkpoint_every must be auto or an integer >= 1"):
        _cfg("checkpoint_every=0")


def test_asha_rungs_are_where_trials_may_stop():
    spec = load_spec(QS, ["search.scheduler=asha", "search.grace_period=2", "search.reduction_factor=3"])
    assert asha_rungs(spec) == (2, 6, 18)
    assert asha_rungs(load_spec(QS)) == ()  # the quickstart runs every trial to the end


def test_a_trial_reports_its_startup_once_and_its_phases_every_epoch(tmp_path, teacher_dir):
    cfg = _cfg(f"teacher.path={teacher_dir}", "data.shots=3", "batch_size=10", "explain_samples=1", "epochs=3",
               "explain_every=2")
    seen, pngs = [], []

    def report(m, ckpt):
        seen.append(dict(m))
        pngs.append(bool(ckpt) and os.path.isfile(os.path.join(ckpt, "explanations.png")))

    asked = time.time() - 5.0  # as if the worker group had taken 5 s to start
    tl.fit(cfg, tl.Hooks(report=report, log=lambda s: None, submitted_at=asked))
    first = seen[0]
    parts = [first[f"startup_{k}_s"] for k in ("workers", "import", "teacher", "model", "data")]
    assert all(p >= 0 for p in parts) and first["startup_workers_s"] + first["startup_import_s"] >= 4.9
    assert first["startup_s"] == pytest.approx(sum(parts), abs=0.5)  # the phases cover the start-up
    assert not any(k.startswith("startup") for m in seen[1:] for k in m)
    for m in seen:
        assert all(m[k] >= 0 for k in ("train_time_s", "eval_time_s", "checkpoint_time_s", "grid_time_s",
                                       "report_time_s"))
    assert pngs == [False, True, True]  # the grid at epoch 2 (explain_every) and at the end
    assert [m["grid_time_s"] > 0 for m in seen] == pngs


def test_overhead_table_adds_up():
    row = dict(trial="a", epochs=2, wall_s=10.0, startup_s=4.0, train=3.0, eval=1.0, checkpoint=0.5, grid=0.5,
               report=0.5, other=0.5, startup_workers=3.0, startup_import=0.5, startup_teacher=0.2,
               startup_model=0.1, startup_data=0.2)
    text = overhead_table([row, dict(row, trial="b", train=5.0)], wall_s=16.0)
    assert "| **Σ** | | 20.0 | 8.0 | 8.0 |" in text
    assert "orchestration efficiency (Σ train / sweep wall) 0.50" in text
    assert "workers 6.0" in text


def test_train_env_reaches_ray_train(monkeypatch):
    """Ray Train reads both from the environment of the process that calls fit() and propagates them."""
    from ray.train.v2._internal.constants import (ENV_VARS_TO_PROPAGATE, HEALTH_CHECK_INTERVAL_S_ENV_VAR,
                                                  WORKER_GROUP_START_TIMEOUT_S_ENV_VAR)

    from orchestrator.sweep import set_train_env

    for k in (HEALTH_CHECK_INTERVAL_S_ENV_VAR, WORKER_GROUP_START_TIMEOUT_S_ENV_VAR):
        monkeypatch.delenv(k, raising=False)
        assert k in ENV_VARS_TO_PROPAGATE
    set_train_env(1800.0, 0.2)
    assert os.environ[HEALTH_CHECK_INTERVAL_S_ENV_VAR] == "0.2"
    assert os.environ[WORKER_GROUP_START_TIMEOUT_S_ENV_VAR] == "1800"
    assert load_spec(QS).resources.poll_s == 0.2
    with pytest.raises(SpecError, match=r"resources.poll_s must be in \(0, 60\]"):
        load_spec(QS, ["resources.poll_s=0"])


def test_controller_callbacks_import_neither_mlflow_nor_torch():
    """Each trial's Train controller imports the callbacks' module before it starts the workers."""
    import subprocess
    import sys

    code = ("import sys; import orchestrator.tracking as t; t.MlflowEpochCallback, t.NonFiniteFailFast; "
            "print(sorted(m for m in ('mlflow', 'torch', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
