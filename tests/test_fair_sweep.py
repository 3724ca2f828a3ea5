"""The fair comparison on a real local Ray instance: a sweep with ASHA and ``search.kd_arm: tuned``.

What a user reads in the report must hold in MLflow: the KD baseline ran every epoch although ASHA
stopped other trials; the KD arm got the e²KD search's budget; the KD run the report puts next to
the best e²KD trial shares its student, τ and epochs (a matched KD run is added when no KD trial
had that setting); a resume adds no run.
"""
from __future__ import annotations

import os

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 4


def fair_spec(tmp_path, teacher_dir) -> dict:
    with open(os.path.join(ROOT, "sweeps", "quickstart.yaml")) as f:
        d = yaml.safe_load(f)
    d.update(name="t-fair", storage=str(tmp_path / "runs"), epochs=EPOCHS, batch_size=10, explain_every=EPOCHS)
    d["data"].update(shots=2)
    d["eval"] = {"val_every": 1}
    d["teacher"].update(path=teacher_dir)
    # λ and the learning rate from ranges: 1 baseline + 3 e²KD trials; the KD arm 2 more KD trials
    # (over the learning rate); no KD trial can share the best e²KD trial's learning rate, so the
    # matched KD run is always added.
    d["search"].update(num_trials=4, scheduler="asha", grace_period=1, reduction_factor=2, n_startup_trials=5,
                       kd_arm="tuned", seed=3,
                       space={"loss.lam": {"type": "loguniform", "low": 0.5, "high": 5.0},
                              "optim.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}})
    d["resources"].update(workers_per_trial=1, cpus_per_worker=0.75, num_cpus=3, max_concurrent_trials=3)
    d["mlflow"] = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "t-fair"}
    return d


def test_fair_sweep_kd_arm_asha_and_matched_kd(tmp_path, teacher_dir):
    import ray
    from mlflow import MlflowClient

    from orchestrator import report, tracking
    from orchestrator.spec import spec_from_dict
    from orchestrator.sweep import run_sweep

    spec = spec_from_dict(fair_spec(tmp_path, teacher_dir))
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "240")
    ray.init(address="local", num_cpus=3, dashboard_host="127.0.0.1", log_to_driver=False)
    try:
        run_sweep(spec, log=lambda s: None)
        client = MlflowClient(spec.mlflow.tracking_uri)
        exp = client.get_experiment_by_name("t-fair")
        parent, children = report.load_sweep(client, "t-fair", "t-fair")
        run_ids = sorted(r.info.run_id for r in children)
        # Each search phase is its own Optuna study in the storage beside mlflow.db (the matched KD
        # run is a fixed run, not a search): the e²KD search's 4 trials, the KD arm's 2.
        import optuna

        ourl = f"sqlite:///{tmp_path}/optuna.db"
        assert sorted(optuna.get_all_study_names(ourl)) == ["t-fair", "t-fair.kd-arm"]
        assert [len(optuna.load_study(study_name=n, storage=ourl).trials) for n in ("t-fair", "t-fair.kd-arm")] == [4, 2]
        run_sweep(spec, resume=True, log=lambda s: None)  # every phase restored: nothing added
        _, again = report.load_sweep(client, "t-fair", "t-fair")
        assert sorted(r.info.run_id for r in again) == run_ids
    finally:
        ray.shutdown()

    def epochs_run(r) -> int:
        return int(max(m.step for m in client.get_metric_history(r.info.run_id, "val_agreement")))

    kd = [r for r in children if r.data.tags["method"] == "kd"]
    e2 = [r for r in children if r.data.tags["method"] == "e2kd"]
    roles = sorted(r.data.tags[tracking.TAG_KD_ROLE] for r in kd)
    # Equal budgets: 3 e²KD trials; the baseline + 2 tuned KD trials; + the matched KD run.
    assert len(e2) == 3 and roles == ["baseline", "matched", "tuned", "tuned"], roles
    baseline = next(r for r in kd if r.data.tags[tracking.TAG_KD_ROLE] == "baseline")
    assert epochs_run(baseline) == EPOCHS and tracking.TAG_STOPPED_EARLY not in baseline.data.tags
    # Every stopped run says so, and only those.
    for r in children:
        stopped = r.data.tags.get(tracking.TAG_STOPPED_EARLY)
        assert (stopped is not None) == (epochs_run(r) < EPOCHS), (r.data.tags, epochs_run(r))
        if stopped:
            assert stopped == f"epoch {epochs_run(r)} of {EPOCHS}"

    summary = report.summarise(parent, children)  # raises if the comparison were unequal
    best, ref = summary["best"], summary["kd"]
    for k in ("student", "loss.temperature", "epochs", "optim.name", "optim.lr", "batch_size"):
        assert best.data.params[k] == ref.data.params[k], k
    assert epochs_run(best) == epochs_run(ref) == EPOCHS
    assert ref.data.tags[tracking.TAG_KD_ROLE] == "matched"
    assert summary["kd_arm"] and summary["best_kd"] is not None
    text = report.table(summary)
    assert "tuning budgets: e²KD 3 trials, KD 3 trials" in text
    assert parent.data.tags["e2kd.kd_arm"] == "tuned"
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert exp is not None
