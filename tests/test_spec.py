"""Sweep specs: every shipped spec validates; bad specs fail with the file and field named,
before any Ray work; --set overrides go through the same validation; the search space and the
KD baseline behave as documented."""
from __future__ import annotations

import glob
import os

import optuna
import pytest
import yaml

from orchestrator.spec import SpecError, load_spec, parse_override, spec_from_dict
from trainables.config import flatten, with_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "sweeps", "quickstart.yaml")


def write(tmp_path, data) -> str:
    p = tmp_path / "spec.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(p)


def base() -> dict:
    with open(QUICKSTART) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "sweeps", "*.yaml"))))
def test_shipped_specs_validate(path):
    spec = load_spec(path)
    assert spec.search.space, path
    assert spec.name


def test_paper_specs_carry_the_paper_protocol():
    """fp32, the paper code's crop scales, Table 2's B-cos teacher (ResNet-34) and Table 3's
    (DenseNet-169) in their own specs, frozen maps at full resolution."""
    def spec(name):
        return load_spec(os.path.join(ROOT, "sweeps", name)).train

    paper = ["imagenet-50shot-resnet.yaml", "imagenet-50shot-bcos.yaml", "imagenet-50shot-bcos-d169.yaml",
             "waterbirds.yaml", "voc.yaml"]
    for name in paper:
        assert spec(name).precision == "fp32", name
    assert spec("waterbirds.yaml").data.crop_scale == (0.7, 1.0)
    assert spec("voc.yaml").data.crop_scale == (0.08, 1.0)
    assert spec("imagenet-50shot-resnet.yaml").data.crop_scale == (0.08, 1.0)
    t2, t3 = spec("imagenet-50shot-bcos.yaml"), spec("imagenet-50shot-bcos-d169.yaml")
    assert (t2.teacher.arch, t2.student) == ("bcos_resnet34", "bcos_resnet18")
    assert (t3.teacher.arch, t3.student) == ("bcos_densenet169", "bcos_resnet18")
    assert t2.teacher.cache_map_side is None and t3.teacher.cache_map_side is None
    with open(os.path.join(ROOT, "sweeps", "imagenet-50shot-bcos.yaml")) as f:
        head = f.read(400)
    assert "Table 2" in head and "ResNet-34" in head and "Table 3" in head  # says where D169 lives


def test_quickstart_fields_round_trip():
    spec = load_spec(QUICKSTART)
    assert spec.train.data.name == "digits"
    assert spec.train.loss.explainer == "gradcam"
    assert os.path.isabs(spec.train.teacher.path)  # workers do not share the driver's cwd
    flat = flatten(spec.train)
    assert flat["loss.lam"] == spec.train.loss.lam and flat["data.shots"] == 10


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.update(epochz=3), "epochz"),
    (lambda d: d["loss"].update(lam=float("nan")), "loss.lam"),
    (lambda d: d["loss"].update(lam=-1.0), "loss.lam"),
    (lambda d: d["loss"].update(temperature=0), "loss.temperature"),
    (lambda d: d.update(epochs="ten"), "epochs"),
    (lambda d: d.update(student="resnet19"), "student"),
    (lambda d: d["loss"].update(explainer="lime"), "loss.explainer"),
    (lambda d: d["loss"].update(explainer="bcos_weight"), "loss.explainer"),  # B-cos explainer, standard CNN
    (lambda d: d["search"].update(space={}), "search.space"),
    (lambda d: d["search"]["space"].update({"loss.lamda": {"type": "uniform", "low": 0, "high": 1}}), "search.space.loss.lamda"),
    (lambda d: d["search"]["space"].update({"loss.lam": {"type": "loguniform", "low": 0, "high": 1}}), "search.space.loss.lam"),
    (lambda d: d["search"]["space"].update({"loss.temperature": {"type": "choice", "values": [1, -5]}}), "search.space.loss.temperature"),
    (lambda d: d["search"].update(metric="val_accuracy_of_doom", mode="max") or d["search"].update(metric="bogus"), "search.metric"),
    (lambda d: d["resources"].update(workers_per_trial=0), "resources.workers_per_trial"),
    (lambda d: d["data"].update(name="mnist"), "data"),
    (lambda d: d["data"].update(shots=0), "data.shots"),
    (lambda d: d.pop("name"), "name"),
])
def test_bad_spec_names_file_and_field(tmp_path, mutate, field):
    d = base()
    mutate(d)
    path = write(tmp_path, d)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    msg = str(e.value)
    assert msg.startswith(path), msg
    assert field in msg, msg


def test_malformed_yaml(tmp_path):
    path = write(tmp_path, "name: x\nloss: {lam: [1, 2\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)


def test_yaml_is_loaded_safely(tmp_path):
    path = write(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)


def test_overrides_are_validated_like_the_file():
    spec = load_spec(QUICKSTART, ["seed=3", "loss.lam=2.5", "search.num_trials=4", "data.shots=5"])
    assert (spec.train.seed, spec.train.loss.lam, spec.search.num_trials, spec.train.data.shots) == (3, 2.5, 4, 5)
    with pytest.raises(SpecError, match="loss.lam"):
        load_spec(QUICKSTART, ["loss.lam=nan"])
    with pytest.raises(SpecError, match="seeed"):
        load_spec(QUICKSTART, ["seeed=3"])
    with pytest.raises(SpecError, match="expected dotted.key=value"):
        load_spec(QUICKSTART, ["seed"])
    assert parse_override("optim.lr=1e-3") == ("optim.lr", "1e-3") or parse_override("optim.lr=1e-3")[1] == 1e-3
    assert load_spec(QUICKSTART, ["optim.lr=1e-3"]).train.optim.lr == pytest.approx(1e-3)


def test_with_overrides_rebuilds_and_validates():
    spec = load_spec(QUICKSTART)
    cfg = with_overrides(spec.train, {"loss.lam": 0.0, "optim.lr": 0.01})
    assert cfg.loss.lam == 0.0 and cfg.optim.lr == 0.01 and spec.train.loss.lam != 0.0
    with pytest.raises(KeyError, match="loss.nope"):
        with_overrides(spec.train, {"loss.nope": 1})


def _searcher_suggestions(spec, values):
    """Drive our OptunaSearch directly: report ``values`` for the first trials, return configs."""
    from orchestrator.sweep import build_searcher

    s = build_searcher(spec)
    configs = []
    for i, v in enumerate(values + [None]):
        configs.append(s.suggest(f"t{i}"))
        if v is not None:
            s.on_trial_complete(f"t{i}", {spec.search.metric: v})
    return s, configs


def test_first_trial_is_the_kd_baseline_and_optuna_learns_from_reports():
    d = base()
    d["search"].update(n_startup_trials=2, seed=0)
    spec = spec_from_dict(d)
    s, cfgs = _searcher_suggestions(spec, [0.5, 0.9, 0.1])
    assert cfgs[0]["loss.lam"] == 0.0  # baseline: λ fixed to 0, the spec's own τ
    assert cfgs[0]["loss.temperature"] == spec.train.loss.temperature
    assert all(c.get("loss.lam", 1) > 0 for c in cfgs[1:])
    study = s._ot_study
    assert [t.value for t in study.trials[:3]] == [0.5, 0.9, 0.1]
    assert study.trials[0].user_attrs["kd_baseline"] is True
    # The model-based suggestion after the startup trials depends on the reported values.
    _, other = _searcher_suggestions(spec, [0.5, 0.1, 0.9])
    assert cfgs[1] == other[1]  # same seed: same random startup suggestion
    assert cfgs[3] != other[3]  # different history: different TPE suggestion


def test_conditional_entries_are_define_by_run():
    d = base()
    d["search"]["space"] = {
        "optim.name": {"type": "choice", "values": ["adamw", "sgd"]},
        "optim.momentum": {"type": "uniform", "low": 0.5, "high": 0.99, "when": {"optim.name": "sgd"}},
        "loss.lam": {"type": "loguniform", "low": 0.1, "high": 10},
    }
    d["search"]["baseline"] = False
    d["search"]["sampler"] = "random"
    spec = spec_from_dict(d)
    s, cfgs = _searcher_suggestions(spec, [0.1] * 11)
    for c in cfgs:
        assert ("optim.momentum" in c) == (c["optim.name"] == "sgd"), c
    assert {c["optim.name"] for c in cfgs} == {"adamw", "sgd"}
    assert isinstance(s._ot_study.sampler, optuna.samplers.RandomSampler)
