"""Training checkpoints: written atomically, verified by checksum when read.

A checkpoint directory holds ``state.pt`` (model/optimizer/scheduler state, loaded with
``weights_only=True``) and ``meta.json`` (epoch, metrics, sha256 of state.pt). ``meta.json`` is
written last, so a directory without it, or whose checksum does not match, is incomplete and is
refused with a message naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import torch

STATE = "state.pt"
META = "meta.json"


class CorruptCheckpointError(ValueError):
    pass


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(directory: str, state: dict[str, Any], meta: dict[str, Any] | None = None) -> None:
    os.makedirs(directory, exist_ok=True)
    state_path = os.path.join(directory, STATE)
    atomic_torch_save(state, state_path)
    full_meta = dict(meta or {}, sha256=_sha256(state_path))
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
    actual = _sha256(state_path)
    if actual != meta.get("sha256"):
        raise CorruptCheckpointError(
            f"checkpoint file {state_path} is corrupt or truncated: sha256 {actual[:12]}… != recorded "
            f"{str(meta.get('sha256'))[:12]}…")
    return torch.load(state_path, map_location=map_location, weights_only=True)
