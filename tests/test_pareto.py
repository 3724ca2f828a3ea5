"""The Pareto front of a multi-objective sweep, and the spec fields that ask for one.

The front is checked against Optuna's own ``study.best_trials`` (an independent implementation)
on random point sets with ties, in 2 and 3 objectives and mixed directions."""
from __future__ import annotations

import os
import random

import optuna
import pytest
import yaml

from orchestrator import pareto
from orchestrator.spec import SpecError, spec_from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quickstart() -> dict:
    with open(os.path.join(ROOT, "sweeps", "quickstart.yaml")) as f:
        return yaml.safe_load(f)


def _optuna_front(values, modes) -> list[tuple[float, ...]]:
    """The oracle: Optuna's own non-dominated set of a study holding ``values``."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize" if m == "max" else "minimize" for m in modes])
    dist = {"i": optuna.distributions.IntDistribution(0, max(len(values), 1))}
    for i, v in enumerate(values):
        study.add_trial(optuna.trial.create_trial(params={"i": i}, distributions=dist, values=list(v)))
    return sorted(tuple(t.values) for t in study.best_trials)


@pytest.mark.parametrize("modes", [("max", "max"), ("max", "min"), ("min", "max", "max")])
@pytest.mark.parametrize("seed", range(8))
def test_front_equals_optunas_best_trials(modes, seed):
    rng = random.Random(seed)
    # coarse values: many ties and exact duplicates (both copies of a front point stay on it)
    values = [tuple(rng.randint(0, 6) / 6 for _ in modes) for _ in range(rng.randint(1, 40))]
    got = sorted(values[i] for i in pareto.front(values, modes))
    assert got == _optuna_front(values, modes)


def test_front_can_fail():
    """The check above can fail: a wrong direction gives another front."""
    values = [(0.9, 0.1), (0.5, 0.5), (0.1, 0.9), (0.4, 0.4)]
    assert sorted(values[i] for i in pareto.front(values, ("max", "max"))) == [(0.1, 0.9), (0.5, 0.5), (0.9, 0.1)]
    assert sorted(values[i] for i in pareto.front(values, ("min", "min"))) == [(0.1, 0.9), (0.4, 0.4), (0.9, 0.1)]


def test_objectives_spec_sets_the_primary_metric():
    d = _quickstart()
    d["search"].update(objectives=[{"metric": "val_acc", "mode": "max"}, {"metric": "val_exp_sim", "mode": "max"}])
    spec = spec_from_dict(d)
    assert spec.search.metric == "val_acc" and spec.search.mode == "max"
    assert [o.metric for o in spec.search.objectives] == ["val_acc", "val_exp_sim"]


@pytest.mark.parametrize("objectives,extra,field,words", [
    ([{"metric": "val_acc"}], {}, "search.objectives", "at least 2"),
    ([{"metric": "val_acc"}, {"metric": "val_acc"}], {}, "search.objectives", "each metric once"),
    ([{"metric": "val_acc"}, {"metric": "val_exp_simm"}], {}, "search.objectives[1].metric", "not reported"),
    ([{"metric": "val_acc"}, {"metric": "test_exp_sim"}], {}, "search.objectives[1].metric", "end only"),
    ([{"metric": "val_acc"}, {"metric": "val_exp_sim", "mode": "up"}], {}, "search.objectives[1].mode", "not one of"),
    ([{"metric": "val_acc"}, {"metric": "val_exp_sim"}], {"scheduler": "asha"}, "search.scheduler", "asha"),
    ([{"metric": "val_acc"}, {"metric": "val_exp_sim"}], {"metric": "val_exp_sim"}, "search.metric", "first"),
])
def test_bad_objectives_name_the_field(objectives, extra, field, words):
    d = _quickstart()
    d["search"].update(objectives=objectives, **extra)
    with pytest.raises(SpecError) as e:
        spec_from_dict(d)
    msg = str(e.value)
    assert field in msg and words in msg and "\n" not in msg, msg


def test_multi_objective_searcher_tells_optuna_every_objective():
    """Through Tune's OptunaSearch as the sweep builds it: the study has two directions and each
    trial both values; NSGA-II is Optuna's own."""
    from orchestrator.sweep import build_searcher

    d = _quickstart()
    d["search"].update(objectives=[{"metric": "val_acc", "mode": "max"}, {"metric": "val_exp_sim", "mode": "min"}],
                       scheduler="none", sampler="nsga2")
    spec = spec_from_dict(d)
    s = build_searcher(spec)
    assert isinstance(s._ot_study.sampler, optuna.samplers.NSGAIISampler)
    for i, v in enumerate([(0.5, 0.2), (0.7, 0.4), (0.6, 0.1)]):
        s.suggest(f"t{i}")
        s.on_trial_complete(f"t{i}", {"val_acc": v[0], "val_exp_sim": v[1]})
    study = s._ot_study
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    assert [tuple(t.values) for t in study.trials] == [(0.5, 0.2), (0.7, 0.4), (0.6, 0.1)]
    assert sorted(tuple(t.values) for t in study.best_trials) == [(0.6, 0.1), (0.7, 0.4)]
