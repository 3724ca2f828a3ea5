"""The e2kd command line, in-process: importing existing weights as a teacher, error exit codes."""
from __future__ import annotations

import os

import torch

from orchestrator.cli import main
from trainables.models import build_model
from trainables.teacher import load_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "sweeps", "quickstart.yaml")


def test_teacher_import_round_trip_and_mismatch(tmp_path, capsys):
    src = build_model("small_cnn", 10)
    raw = tmp_path / "raw.pt"
    torch.save(src.net.state_dict(), raw)  # raw network keys, as a release file would have them
    assert main(["teacher", QUICKSTART, "--weights", str(raw), "--set", f"teacher.path={tmp_path}/t"]) == 0
    model, card = load_teacher(tmp_path / "t")
    assert card.arch == "small_cnn" and card.extra["imported_from"] == str(raw)
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k

    code = main(["teacher", QUICKSTART, "--weights", str(raw), "--set", f"teacher.path={tmp_path}/t2",
                 "--set", "teacher.arch=resnet18"])
    err = capsys.readouterr().err
    assert code == 2 and str(raw) in err and "resnet18" in err
    assert not os.path.exists(tmp_path / "t2" / "teacher.pt")  # nothing half-written


def test_bad_spec_exits_2_with_one_line(tmp_path, capsys):
    code = main(["sweep", QUICKSTART, "--set", "loss.lam=-1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "loss.lam" in err and QUICKSTART in err
