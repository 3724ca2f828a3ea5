"""End to end on a real local Ray instance: a 2-trial sweep with 2 Ray Train workers per trial.

Checks what a user relies on: one MLflow parent, exactly one child run per trial with per-epoch
metrics and the explanation PNG, the KD baseline first, Optuna's study holding the reported
metric, and a resume that reruns nothing.
"""
from __future__ import annotations

import glob
import json
import os

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_spec(tmp_path, teacher_dir, **extra) -> dict:
    with open(os.path.join(ROOT, "sweeps", "quickstart.yaml")) as f:
        d = yaml.safe_load(f)
    d.update(name="t-sweep", storage=str(tmp_path / "runs"), epochs=2, batch_size=20)
    d["data"].update(shots=3)
    d["teacher"].update(path=teacher_dir)
    d["search"].update(num_trials=2, scheduler="none", n_startup_trials=1,
                       space={"loss.lam": {"type": "loguniform", "low": 0.5, "high": 5.0}})
    d["resources"].update(workers_per_trial=2, num_cpus=3)
    d["mlflow"] = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "t-exp"}
    d.update(extra)
    return d


@pytest.fixture()
def local_ray():
    import ray

    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "240")
    ray.init(address="local", num_cpus=3, dashboard_host="127.0.0.1", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_two_trial_sweep_mlflow_optuna_resume(tmp_path, teacher_dir, local_ray):
    from mlflow import MlflowClient

    from orchestrator.spec import spec_from_dict
    from orchestrator.sweep import experiment_path, run_sweep

    spec = spec_from_dict(tiny_spec(tmp_path, teacher_dir))
    grid = run_sweep(spec, log=lambda s: None)
    assert len(grid) == 2 and not grid.errors
    metric = spec.search.metric
    reported = {r.metrics["trial_id"]: r.metrics[metric] for r in grid}
    lams = sorted(r.config["loss.lam"] for r in grid)
    assert lams[0] == 0.0 and lams[1] > 0  # KD baseline + one e²KD trial

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("t-exp")
    parents = client.search_runs([exp.experiment_id], "tags.`e2kd.role` = 'parent'")
    assert len(parents) == 1
    parent = parents[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2
    assert {c.data.tags["e2kd.trial_id"] for c in children} == set(reported)
    assert {c.data.tags["method"] for c in children} == {"kd", "e2kd"}
    for c in children:
        history = client.get_metric_history(c.info.run_id, metric)
        assert [m.step for m in history] == [1, 2]  # one point per epoch
        assert history[-1].value == pytest.approx(reported[c.data.tags["e2kd.trial_id"]])
        assert c.data.params["loss.lam"] in ("0.0", str(lams[1]))
        arts = [a.path for a in client.list_artifacts(c.info.run_id)]
        assert "explanations.png" in arts, arts
        assert "student" in arts, arts  # the final student (orchestrator.registry.log_student)
        assert c.info.status == "FINISHED"
    # Where the time went: the parent's breakdown adds up the children's per-epoch records.
    train = sum(m.value for c in children for m in client.get_metric_history(c.info.run_id, "train_time_s"))
    assert parent.data.metrics["sweep_train_s"] == pytest.approx(train, rel=1e-6)
    assert 0 < parent.data.metrics["orchestration_efficiency"] < 1
    assert "overhead.md" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    spec_art = [a.path for a in client.list_artifacts(parent.info.run_id, "spec")]
    assert spec_art == [] or spec_art[0].endswith(".yaml")

    # Optuna got exactly the values the trials reported (the searcher state Tune saved).
    import pickle

    state_files = glob.glob(os.path.join(experiment_path(spec, spec.storage), "searcher-state-*.pkl"))
    assert state_files
    with open(state_files[0], "rb") as f:
        searcher_state = pickle.load(f)
    study = searcher_state["_ot_study"]
    assert sorted(t.value for t in study.trials) == sorted(reported.values())
    assert sum(bool(t.user_attrs.get("kd_baseline")) for t in study.trials) == 1

    # Resume: nothing is rerun, no MLflow run is added.
    results_before = {p: os.path.getsize(p) for p in glob.glob(str(tmp_path / "runs" / "**" / "result.json"), recursive=True)}
    grid2 = run_sweep(spec, resume=True, log=lambda s: None)
    assert len(grid2) == 2
    results_after = {p: os.path.getsize(p) for p in glob.glob(str(tmp_path / "runs" / "**" / "result.json"), recursive=True)}
    assert results_after == results_before
    assert len(client.search_runs([exp.experiment_id], "tags.`e2kd.role` = 'parent'")) == 1
    assert len(client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")) == 2

    # Starting the same sweep again without --resume is refused instead of mixing two sweeps.
    with pytest.raises(RuntimeError, match="--resume"):
        run_sweep(spec, log=lambda s: None)
    json.dumps(reported)
