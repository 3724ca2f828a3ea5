"""Fixtures shared by the training, sweep and fault tests."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> str:
    """A small_cnn digits teacher trained for one short epoch (~256 images): enough for tests that
    exercise the loop, the sweep and its faults, not for accuracy claims. Read-only for tests."""
    from trainables.data import DataConfig
    from trainables.teacher import train_teacher

    out = tmp_path_factory.mktemp("teacher")
    train_teacher("small_cnn", DataConfig(name="digits"), out, epochs=1, batch_size=64, max_train_samples=256,
                  progress=None)
    return str(out)
