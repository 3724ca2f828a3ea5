"""A fair KD-vs-e²KD comparison, piece by piece (no Ray cluster): the grid space never repeats a
configuration, ASHA never stops the reference KD run, the KD arm gets the e²KD search's budget, the
matched KD run is asked for exactly when no KD run shares the best e²KD setting, and the report
refuses an unequal comparison in one line. The whole path under Ray is test_fair_sweep.py."""
from __future__ import annotations

import itertools
import os
from types import SimpleNamespace

import pytest
import yaml
from mlflow import MlflowClient

from orchestrator import cli, report, tracking
from orchestrator.spec import SpecError, spec_from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spec_dict(**search) -> dict:
    with open(os.path.join(ROOT, "sweeps", "quickstart.yaml")) as f:
        d = yaml.safe_load(f)
    d["search"].update(search)
    return d


CATEGORICAL = {"loss.lam": {"type": "choice", "values": [0.2, 1.0, 5.0, 10.0]},
               "loss.temperature": {"type": "choice", "values": [1.0, 5.0]}}


# ------------------------------------ grid spaces -------------------------------------------


def test_all_categorical_space_runs_every_configuration_once_through_optunasearch():
    """Through Tune's own OptunaSearch (the searcher the sweep builds), 1 baseline + 8 trials on a
    4×2 space: the 8 e²KD configurations are exactly the product, none twice."""
    from orchestrator.sweep import build_searcher

    spec = spec_from_dict(spec_dict(num_trials=9, space=CATEGORICAL, scheduler="none"))
    assert spec.search.grid  # sampler: auto
    searcher = build_searcher(spec)
    searcher.set_search_properties(spec.search.metric, spec.search.mode, {})
    seen = []
    for i in range(9):
        cfg = searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", {spec.search.metric: 0.5 + 0.01 * i})
        seen.append((cfg["loss.lam"], cfg["loss.temperature"]))
    assert seen[0] == (0.0, 1.0)  # the KD baseline at the spec's τ
    e2 = seen[1:]
    assert sorted(e2) == sorted(itertools.product([0.2, 1.0, 5.0, 10.0], [1.0, 5.0]))


def test_grid_respects_conditions_and_refuses_more_trials_than_configurations():
    space = {"optim.name": {"type": "choice", "values": ["adamw", "sgd"]},
             "optim.momentum": {"type": "choice", "values": [0.8, 0.9], "when": {"optim.name": "sgd"}},
             "loss.lam": {"type": "choice", "values": [1.0, 5.0]}}
    spec = spec_from_dict(spec_dict(num_trials=7, space=space))
    confs = spec.search.configurations()
    # adamw × 2 λ + sgd × 2 momenta × 2 λ; momentum only where sgd
    assert len(confs) == 6 and all(("optim.momentum" in c) == (c["optim.name"] == "sgd") for c in confs)
    with pytest.raises(SpecError, match=r"search.num_trials: 8 trials .* 6 configurations.*num_trials <= 7"):
        spec_from_dict(spec_dict(num_trials=8, space=space))
    with pytest.raises(SpecError, match="search.sampler: grid enumerates `choice` entries only; loss.lam"):
        spec_from_dict(spec_dict(sampler="grid", space={"loss.lam": {"type": "loguniform", "low": 0.1, "high": 1}}))


def test_shipped_categorical_specs_fit_their_grid():
    from orchestrator.spec import load_spec

    for name in os.listdir(os.path.join(ROOT, "sweeps")):
        spec = load_spec(os.path.join(ROOT, "sweeps", name))
        if spec.search.grid:
            assert spec.search.num_trials - spec.search.baseline <= len(spec.search.configurations()), name


# ------------------------------------ ASHA and the KD baseline ------------------------------


def _asha():
    from orchestrator.sweep import ReferenceKDASHA

    return ReferenceKDASHA(time_attr="epoch", metric="val_agreement", mode="max", max_t=9, grace_period=1,
                           reduction_factor=3)


@pytest.mark.parametrize("role,stopped", [("baseline", False), ("matched", False), ("tuned", True), (None, True)])
def test_asha_never_stops_the_reference_kd_run(role, stopped):
    """Three strong e²KD trials fill rung 1; a weak fourth trial is stopped there unless it is the
    reference KD run (the KD arm's tuned trials are stopped like any other)."""
    sched = _asha()
    strong = [SimpleNamespace(trial_id=f"s{i}", config={"loss.lam": 1.0}) for i in range(3)]
    weak = SimpleNamespace(trial_id="w", config={"loss.lam": 0.0 if role else 1.0, **({"_role": role} if role else {})})
    for t in [*strong, weak]:
        sched.on_trial_add(None, t)
    for t in strong:
        assert sched.on_trial_result(None, t, {"epoch": 1, "val_agreement": 0.9}) == sched.CONTINUE
    action = sched.on_trial_result(None, weak, {"epoch": 1, "val_agreement": 0.1})
    assert action == (sched.STOP if stopped else sched.CONTINUE)
    if not stopped:  # and at the next rung too
        assert sched.on_trial_result(None, weak, {"epoch": 3, "val_agreement": 0.1}) == sched.CONTINUE


# ------------------------------------ the KD arm and the matched KD run ---------------------


def test_kd_arm_gets_the_e2kd_budget_over_the_space_without_lambda():
    from orchestrator.sweep import kd_arm_spec

    space = {"loss.lam": {"type": "loguniform", "low": 0.1, "high": 10.0},
             "optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}
    spec = spec_from_dict(spec_dict(num_trials=8, kd_arm="tuned", space=space))
    arm = kd_arm_spec(spec)
    assert set(arm.search.space) == {"optim.lr"} and arm.train.loss.lam == 0 and not arm.search.grid
    # e²KD: num_trials - 1 = 7; KD: the baseline + 6 = 7
    assert arm.search.num_trials + 1 == spec.search.num_trials - 1 and not arm.search.baseline
    # A categorical KD space is enumerated without the baseline's own setting, so its budget is
    # capped by the space: with τ ∈ {1, 5} (the quickstart's) and with the paper's 4×2 grid, τ=5 only.
    for space in (None, CATEGORICAL):
        s = spec_from_dict(spec_dict(num_trials=9, kd_arm="tuned", **({"space": space} if space else {})))
        assert kd_arm_spec(s).search.num_trials == 1 and kd_arm_spec(s).search.grid
    with pytest.raises(SpecError, match="kd_arm: tuned needs a searched field besides loss.lam"):
        spec_from_dict(spec_dict(kd_arm="tuned", space={"loss.lam": {"type": "loguniform", "low": 0.1, "high": 1}}))


def _result(lam, tau, val, epoch=20, role=None):
    return SimpleNamespace(metrics={"epoch": epoch, "val_agreement": val},
                           config={"loss.lam": lam, "loss.temperature": tau, **({"_role": role} if role else {})})


def test_matched_kd_setting_is_asked_for_only_when_no_full_kd_run_shares_it():
    from orchestrator.sweep import matched_kd_setting

    spec = spec_from_dict(spec_dict())  # epochs 20, λ + τ searched, mode max
    base = _result(0.0, 1.0, 0.90, role="baseline")
    best5 = _result(2.0, 5.0, 0.95)
    assert matched_kd_setting(spec, [base, best5, _result(1.0, 1.0, 0.93)]) == {"loss.temperature": 5.0}
    assert matched_kd_setting(spec, [base, _result(2.0, 1.0, 0.95)]) is None  # same τ as the baseline
    # a KD run at τ=5 that was stopped early does not count; one that ran every epoch does
    assert matched_kd_setting(spec, [base, best5, _result(0.0, 5.0, 0.5, epoch=6)]) == {"loss.temperature": 5.0}
    assert matched_kd_setting(spec, [base, best5, _result(0.0, 5.0, 0.5, role="tuned")]) is None
    # a better e²KD run stopped early is not "the best e²KD"
    assert matched_kd_setting(spec, [base, _result(2.0, 5.0, 0.99, epoch=2), _result(1.0, 1.0, 0.93)]) is None


def test_compare_grid_varies_the_data_subset_with_the_seed():
    from orchestrator.sweep import trial_config

    spec = spec_from_dict(spec_dict())
    cfg = trial_config(spec.train, {"loss.lam": 0.0, "_seeds": {"seed": 3, "data.seed": 3}})
    assert (cfg.seed, cfg.data.seed, cfg.loss.lam) == (3, 3, 0.0)


# ------------------------------------ the report --------------------------------------------


@pytest.fixture()
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = tracking.ensure_experiment(client, "exp", str(tmp_path / "art"))

    def sweep(name, runs, kd_arm="baseline"):
        parent = tracking.create_parent(client, exp, name, "", {}, tags={"e2kd.metric": "val_agreement",
                                                                          "e2kd.mode": "max", "e2kd.kd_arm": kd_arm})
        for i, (lam, tau, val, tags) in enumerate(runs):
            run = tracking.get_or_create_child(uri, exp, parent, name, f"{name}-{i}",
                                               params={"loss.lam": lam, "loss.temperature": tau, "student": "tiny_cnn",
                                                       "epochs": 20},
                                               tags={"method": "kd" if lam == 0 else "e2kd", **tags})
            client.log_metric(run, "val_agreement", val)
            client.log_metric(run, "test_acc", val - 0.05)
            client.set_terminated(run, "FINISHED")

    kd = {tracking.TAG_KD_ROLE: "baseline"}
    sweep("unequal", [(0.0, 1.0, 0.90, kd), (2.0, 5.0, 0.95, {}), (1.0, 1.0, 0.93, {})])
    sweep("matched", [(0.0, 1.0, 0.90, kd), (2.0, 5.0, 0.95, {}), (1.0, 1.0, 0.93, {}),
                      (0.0, 5.0, 0.91, {tracking.TAG_KD_ROLE: "matched"})])
    sweep("stopped", [(0.0, 1.0, 0.50, {**kd, tracking.TAG_STOPPED_EARLY: "epoch 2 of 20"}),
                      (2.0, 1.0, 0.95, {})])
    sweep("tuned", [(0.0, 1.0, 0.90, kd), (2.0, 5.0, 0.95, {}), (1.0, 1.0, 0.93, {}),
                    (0.0, 5.0, 0.92, {tracking.TAG_KD_ROLE: "tuned"}), (0.0, 1.0, 0.89, {tracking.TAG_KD_ROLE: "tuned"})],
          kd_arm="tuned")
    return uri


@pytest.mark.parametrize("sweep,why", [("unequal", "loss.temperature 1.0 vs 5.0"),
                                       ("stopped", "the KD run was stopped early (epoch 2 of 20)")])
def test_report_refuses_an_unequal_comparison_in_one_line(store, tmp_path, capsys, sweep, why):
    out = tmp_path / "r"
    assert cli.main(["report", "exp", "--sweep", sweep, "--tracking-uri", store, "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and why in err and "--allow-unequal" in err, err
    assert not out.exists()  # nothing written
    assert cli.main(["report", "exp", "--sweep", sweep, "--tracking-uri", store, "--out", str(out),
                     "--allow-unequal"]) == 0
    assert f"WARNING (--allow-unequal): the KD run differs beyond λ: {why}" in capsys.readouterr().out


def test_report_compares_the_best_e2kd_with_the_kd_run_of_its_setting(store, tmp_path, capsys):
    assert cli.main(["report", "exp", "--sweep", "matched", "--tracking-uri", store, "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("val_agreement"))
    assert row.split()[1:] == ["0.9100", "0.9500", "+0.0400"]  # the matched KD run (τ=5), not the baseline (τ=1)
    assert "KD run (same setting): epochs=20, loss.lam=0.0, loss.temperature=5.0" in text
    assert "unequal budgets" in text


def test_report_with_a_tuned_kd_arm_shows_best_vs_best_at_equal_budgets(store, tmp_path, capsys):
    assert cli.main(["report", "exp", "--sweep", "tuned", "--tracking-uri", store, "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "tuning budgets: e²KD 2 trials, KD 3 trials" in text
    row = next(line for line in text.splitlines() if line.startswith("val_agreement"))
    # KD same setting (τ=5, the tuned arm's run) | best e²KD | best KD (0.92) | Δ | Δ best−best
    assert row.split()[1:] == ["0.9200", "0.9500", "0.9200", "+0.0300", "+0.0300"]


def test_a_spec_without_crop_scale_gets_its_datasets_preset():
    """The paper code's RandomResizedCrop scales, not DataConfig's digits default."""
    def scale(name: str) -> tuple[float, float]:
        d = spec_dict()
        d["data"] = {"name": name, "root": "/nonexistent", "image_size": 224}
        if name == "voc":  # multi-label: no agreement metric
            d["search"]["metric"] = "val_f1"
        return spec_from_dict(d).train.data.crop_scale

    assert scale("imagefolder") == (0.08, 1.0) and scale("voc") == (0.08, 1.0) and scale("waterbirds") == (0.7, 1.0)
    assert scale("digits") == (0.6, 1.0)
