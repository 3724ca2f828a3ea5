"""The training loop without Ray (Hooks): exact resume from a checkpoint, the cached-teacher path,
NaN detection, and λ = 0 never explaining during training."""
from __future__ import annotations

import contextlib
import os
import shutil

import pytest
import torch

import trainables.train_loop as tl
from orchestrator.spec import load_spec
from trainables.checkpoint import load_checkpoint
from trainables.teacher import build_cache_local

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg_for(teacher_dir, *extra):
    return load_spec(os.path.join(ROOT, "sweeps", "quickstart.yaml"),
                     [f"teacher.path={teacher_dir}", "data.shots=3", "batch_size=10", "explain_samples=2",
                      *extra]).train


class Recorder:
    """Hooks.report that keeps a copy of every checkpoint directory."""

    def __init__(self, root):
        self.root, self.dirs, self.metrics = root, [], []

    def __call__(self, metrics, ckpt_dir):
        self.metrics.append(dict(metrics))
        if ckpt_dir:
            dst = os.path.join(self.root, f"ckpt{metrics['epoch']}")
            shutil.copytree(ckpt_dir, dst)
            self.dirs.append(dst)


def test_resume_is_exact(tmp_path, teacher_dir):
    torch.set_num_threads(1)
    cfg = cfg_for(teacher_dir, "epochs=3")
    straight = Recorder(tmp_path / "a")
    tl.fit(cfg, tl.Hooks(report=straight, log=lambda s: None))
    # Interrupted after epoch 1, resumed from its checkpoint.
    resumed = Recorder(tmp_path / "b")
    tl.fit(cfg,
           tl.Hooks(report=resumed, log=lambda s: None,
                    latest_checkpoint=lambda: contextlib.nullcontext(straight.dirs[0])))
    assert [m["epoch"] for m in resumed.metrics] == [2, 3]
    a, b = load_checkpoint(straight.dirs[-1]), load_checkpoint(resumed.dirs[-1])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert straight.metrics[-1]["val_acc"] == resumed.metrics[-1]["val_acc"]
    assert os.path.isfile(os.path.join(straight.dirs[-1], "explanations.png"))


def test_cached_teacher_feeds_training(tmp_path, teacher_dir, monkeypatch):
    cache = str(tmp_path / "cache")
    cfg = cfg_for(teacher_dir, "epochs=1", "teacher.mode=cached", f"teacher.cache_dir={cache}")
    build_cache_local(teacher_dir, cfg.data, "gradcam", cache)

    def no_live_teacher(*a, **k):
        raise AssertionError("the live teacher ran during cached training")

    monkeypatch.setattr(tl, "teacher_targets", no_live_teacher)
    m = tl.fit(cfg, tl.Hooks(log=lambda s: None))
    assert m["train_exp"] > 0 and m["epoch"] == 1


def test_kd_never_explains_in_training(teacher_dir, monkeypatch):
    calls = []
    real = tl.teacher_targets
    monkeypatch.setattr(tl, "teacher_targets", lambda t, x, e, need: calls.append(need) or real(t, x, e, need))
    m = tl.fit(cfg_for(teacher_dir, "epochs=1", "loss.lam=0"), tl.Hooks(log=lambda s: None))
    assert calls and not any(calls) and m["train_exp"] == 0


def test_nonfinite_loss_stops_with_reason(teacher_dir):
    with pytest.raises(tl.NonFiniteLossError, match="non-finite loss"):
        tl.fit(cfg_for(teacher_dir, "epochs=1", "optim.lr=1e30", "optim.grad_clip=null"), tl.Hooks(log=lambda s: None))


def test_precision_option_fp32_default_bf16_on_cuda_only():
    """fp32 is the default (the paper's arithmetic); bf16 autocasts on CUDA only; a wrong value names
    the field; the option is a trial parameter (MLflow params, --set)."""
    from trainables.config import TrainConfig, flatten, with_overrides

    cfg = TrainConfig()
    assert cfg.precision == "fp32" and flatten(cfg)["precision"] == "fp32"
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert isinstance(tl.autocast_context(cfg, cuda), contextlib.nullcontext)  # fp32: no autocast anywhere
    bf16 = with_overrides(cfg, {"precision": "bf16"})
    assert isinstance(tl.autocast_context(bf16, cpu), contextlib.nullcontext)  # CPU runs stay fp32
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else contextlib.nullcontext():
        ctx = tl.autocast_context(bf16, cuda)  # only built, not entered: no GPU needed ("CUDA is not available")
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    for bad in ("fp16", "auto", "off"):
        with pytest.raises(ValueError, match=f"precision must be fp32 or bf16; got '{bad}'"):
            TrainConfig(precision=bad)
    with pytest.raises(ValueError, match="teacher.cache_map_side"):
        with_overrides(cfg, {"teacher.cache_map_side": 0})
    assert flatten(cfg)["teacher.cache_map_side"] is None
