"""Training checkpoints: written atomically, verified by checksum when read.

A checkpoint directory holds ``state.pt`` (model/optimizer/scheduler state, loaded with
``weights_only=True``) and ``meta.json`` (epoch, metrics, sha256 of state.pt). ``meta.json`` is
written last, so a directory without it, or whose checksum does not match, is incomplete and is
refused with a message naming the file.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch

from trainables.models import file_sha256

STATE = "state.pt"
META = "meta.json"


class CorruptCheckpointError(ValueError):
    pass


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temp file in the same directory, then rename over ``path``: readers see
    the old file or the whole new one, never a partial one."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, w)


def atomic_torch_save(obj: Any, path: str) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_checkpoint(directory: str, state: dict[str, Any], meta: dict[str, Any] | None = None) -> None:
    os.makedirs(directory, exist_ok=True)
    state_path = os.path.join(directory, STATE)
    atomic_torch_save(state, state_path)
    full_meta = dict(meta or {}, sha256=file_sha256(state_path))
    atomic_write_bytes(os.path.join(directory, META), json.dumps(full_meta, default=float).encode())


def read_meta(directory: str) -> dict[str, Any]:
    meta_path = os.path.join(directory, META)
    if not os.path.isfile(meta_path):
        raise CorruptCheckpointError(f"checkpoint {directory} is incomplete: {META} is missing")
    try:
        with open(meta_path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(f"checkpoint metadata {meta_path} is corrupt: {e}") from e


def load_checkpoint(directory: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    meta = read_meta(directory)
    state_path = os.path.join(directory, STATE)
    if not os.path.isfile(state_path):
        raise CorruptCheckpointError(f"checkpoint {directory} is incomplete: {STATE} is missing")
    actual = file_sha256(state_path)
    if actual != meta.get("sha256"):
        raise CorruptCheckpointError(
            f"checkpoint file {state_path} is corrupt or truncated: sha256 {actual[:12]}… != recorded "
            f"{str(meta.get('sha256'))[:12]}…")
    return torch.load(state_path, map_location=map_location, weights_only=True)
