"""Model registry: offline builds, output shapes, checkpoint loading and its error messages."""
from __future__ import annotations

import pytest
import torch

from trainables.models import MODELS, build_model, load_weights

torch.set_num_threads(1)


def _input(model, name: str, batch: int = 2) -> torch.Tensor:
    size = 224 if "vit" in name else min(MODELS[name].input_size, 64)  # ViT: fixed patch grid
    return torch.rand(batch, 6 if model.is_bcos else 3, size, size)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_builds_offline_and_classifies(name):
    torch.manual_seed(0)
    model = build_model(name, 7).eval()  # random init: nothing is downloaded (no network here)
    x = _input(model, name)
    with torch.no_grad():
        logits = model(x)
        logits2, feats = model(x, with_features=True)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits2, logits)
    assert feats.dim() == 4 and feats.shape[0] == 2


def test_unknown_architecture_and_bad_num_classes():
    with pytest.raises(ValueError, match="unknown architecture 'resnet9000'"):
        build_model("resnet9000", 10)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("small_cnn", 1)


@pytest.mark.parametrize("layout", ["ours", "wrapped", "raw"])
@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_load_weights_round_trip(tmp_path, name, layout):
    torch.manual_seed(0)
    src = build_model(name, 5)
    with torch.no_grad():  # make the BN buffers non-default so they are checked too
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    src.eval()
    path = tmp_path / f"{name}.pt"
    sd = {"ours": src.state_dict(), "wrapped": {"model": src.state_dict(), "epoch": 3}, "raw": src.net.state_dict()}[layout]
    torch.save(sd, path)

    torch.manual_seed(1)
    dst = build_model(name, 5, weights=path).eval()
    for (k, a), (k2, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert k == k2
        assert torch.equal(a, b), k
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_wrong_architecture_names_file_and_arch(tmp_path):
    path = tmp_path / "teacher_resnet34.pt"
    torch.save(build_model("resnet34", 10).state_dict(), path)
    with pytest.raises(ValueError) as exc:
        build_model("resnet18", 10, weights=path)
    msg = str(exc.value)
    assert str(path) in msg and "'resnet18'" in msg and "unexpected keys" in msg
    # same architecture, wrong class count: a shape mismatch, still naming both
    path10 = tmp_path / "r18_10.pt"
    torch.save(build_model("resnet18", 10).state_dict(), path10)
    model = build_model("resnet18", 5)
    with pytest.raises(ValueError, match="shape mismatch") as exc:
        load_weights(model, path10, arch="resnet18")
    assert str(path10) in str(exc.value) and "fc.weight" in str(exc.value)


def test_truncated_and_missing_files_fail_clearly(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(build_model("small_cnn", 10).state_dict(), good)
    data = good.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read weights file") as exc:
        build_model("small_cnn", 10, weights=bad)
    assert str(bad) in str(exc.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        build_model("small_cnn", 10, weights=tmp_path / "nope.pt")
    notdict = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), notdict)
    with pytest.raises(ValueError, match="not a state dict"):
        build_model("small_cnn", 10, weights=notdict)
