"""Teacher training (short run), model card, checksum verification."""
from __future__ import annotations

import json
import os

import pytest
import torch

from trainables.data import DataConfig, dataset_info
from trainables.models import build_model, file_sha256, load_weights
from trainables.teacher import CARD_FILE, WEIGHTS_FILE, load_teacher, read_card, save_teacher, train_teacher


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    lines: list[str] = []
    card = train_teacher("small_cnn", DataConfig(name="decoy-digits"), out, epochs=3, batch_size=32, seed=0,
                         progress=lines.append, max_train_samples=512)
    return out, card, lines


@pytest.mark.slow
def test_short_training_run_card_and_checksum(trained):
    out, card, lines = trained
    assert sum(line.startswith("epoch ") for line in lines) == 3  # progress per epoch
    assert card.test_accuracy > 0.5  # chance is 0.1
    # decoy-digits teachers train on clean digits
    assert card.data_name == "decoy-digits" and card.teacher_data == "digits"
    assert card.data_fingerprint == dataset_info(DataConfig()).fingerprint
    assert card.arch == "small_cnn" and card.num_classes == 10 and card.encoding == "rgb" and card.epochs == 3
    weights = os.path.join(out, WEIGHTS_FILE)
    assert card.sha256 == file_sha256(weights)
    with open(os.path.join(out, CARD_FILE)) as f:
        assert json.load(f)["sha256"] == card.sha256
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # atomic writes leave no temp files
    # plain state dict, readable without our code
    sd = torch.load(weights, weights_only=True)
    fresh = build_model("small_cnn", 10)
    load_weights(fresh, weights, arch="small_cnn")
    model, card2 = load_teacher(out)
    assert card2 == card and not model.training
    x = torch.randn(2, 3, 32, 32)
    fresh.eval()
    assert torch.equal(model(x), fresh(x)) and set(sd) == set(fresh.state_dict())
    assert load_teacher(weights)[1] == card  # the .pt path works too


def test_checksum_mismatch_names_file(tmp_path):
    model = build_model("small_cnn", 10)
    card = save_teacher(model, "small_cnn", DataConfig(), tmp_path)
    assert read_card(tmp_path) == card
    weights = os.path.join(tmp_path, WEIGHTS_FILE)
    with open(weights, "r+b") as f:  # flip one byte
        f.seek(200)
        b = f.read(1)
        f.seek(200)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(ValueError, match="checksum") as e:
        load_teacher(tmp_path)
    assert weights in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_teacher(tmp_path / "missing")


def test_bcos_teacher_card(tmp_path):
    card = save_teacher(build_model("small_bcos_cnn", 10), "small_bcos_cnn", DataConfig(), tmp_path)
    model, c = load_teacher(tmp_path)
    assert c.encoding == "bcos6" and model.is_bcos and card.test_accuracy is None


def spec_file(tmp_path, teacher_path: str, with_recipe: bool, **teacher) -> str:
    """quickstart.yaml with ``teacher_path`` (and other teacher fields), with or without its
    teacher_training section (the cluster specs have none), written to ``tmp_path/spec.yaml``."""
    import yaml

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "sweeps", "quickstart.yaml")) as f:
        d = yaml.safe_load(f)
    if not with_recipe:
        d.pop("teacher_training", None)
    d["teacher"].update(path=teacher_path, **teacher)
    d["storage"] = str(tmp_path / "runs")
    d["resources"].update(workers_per_trial=1, num_cpus=2)
    d["mlflow"] = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "recipe"}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(d))
    return str(path)


def test_missing_teacher_without_recipe_is_refused_not_trained(tmp_path, monkeypatch):
    """A mistyped teacher.path in a spec that gives no teacher_training section must be refused
    (naming teacher.path), never trained (SweepSpec used to fill in a default recipe, always truthy)."""
    import dataclasses

    import trainables.teacher
    from orchestrator.cli import ensure_teacher, preflight
    from orchestrator.spec import TeacherTrainingConfig, load_spec

    def no_training(*a, **k):
        raise AssertionError("train_teacher called for a spec without a teacher_training section")

    monkeypatch.setattr(trainables.teacher, "train_teacher", no_training)
    typo = str(tmp_path / "teachers" / "digits-smal_cnn")
    spec = load_spec(spec_file(tmp_path, typo, with_recipe=False))
    with pytest.raises(FileNotFoundError, match="teacher.path") as e:
        preflight(spec)
    assert typo in str(e.value) and "teacher_training" in str(e.value)
    with pytest.raises(FileNotFoundError, match="teacher.path"):
        ensure_teacher(spec)
    with pytest.raises(ValueError, match="teacher_training"):
        ensure_teacher(spec, force=True)
    assert spec.teacher_training is None  # the section absent: no recipe
    assert not os.path.exists(typo)
    # a spec that gives the section still gets its missing teacher trained (the quickstart path)
    trained = []
    monkeypatch.setattr(trainables.teacher, "train_teacher", lambda *a, **k: trained.append(a) or "card")
    with_recipe = dataclasses.replace(spec, teacher_training=TeacherTrainingConfig())
    preflight(with_recipe)
    assert ensure_teacher(with_recipe) == "card" and trained[0][2] == typo
