"""MLflow layout: one parent run per sweep, exactly one child run per Tune trial.

Why not Ray's ``MLflowLoggerCallback``/``setup_mlflow``: they make flat runs (no parent), log
every Tune result key as a metric, and create a second run when a trial restarts (ray#48664).
Here the child run is looked up by the ``e2kd.trial_id`` tag before one is created, so a retried
trial or a resumed sweep continues the same run.

Where logging happens:
- parent and child runs: the sweep driver and the trial's driver fn (``get_or_create_child``);
- per-epoch metrics and the explanation PNG: :class:`MlflowEpochCallback`, a Ray Train
  ``UserCallback`` that runs in the Train controller (no rank logic needed);
- the final student and the run status: :class:`MlflowTrialFinalizer`, a Tune callback in the
  sweep process, which also sees trials that ASHA stopped early.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from importlib import metadata
from typing import Any

import ray.train
import ray.tune
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

TAG_SWEEP = "e2kd.sweep"
TAG_ROLE = "e2kd.role"
TAG_TRIAL = "e2kd.trial_id"
TAG_PARENT = "mlflow.parentRunId"
PNG_NAME = "explanations.png"
MAX_PARAM_LEN = 6000


_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s'\"]+)@")


def mask_uri(text: str) -> str:
    """Hide the credentials of every ``scheme://user:password@host`` in ``text`` (messages, logs,
    the spec logged to MLflow): ``http://user:***@host``. Prefer MLFLOW_TRACKING_USERNAME /
    MLFLOW_TRACKING_PASSWORD (or a token) over credentials in the URI."""
    def repl(m: re.Match) -> str:
        user = m.group("userinfo").split(":", 1)[0]
        return f"{m.group('scheme')}{user}:***@" if ":" in m.group("userinfo") else f"{m.group('scheme')}***@"

    return _URL_CREDENTIALS.sub(repl, text)


def resolve_tracking_uri(uri: str, base: str | None = None) -> str:
    """``sqlite:///relative.db`` -> absolute (workers run in other directories); others unchanged."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = uri[len("sqlite:///"):]
        return "sqlite:///" + os.path.abspath(os.path.join(base or os.getcwd(), path))
    if uri.startswith("file:") or ("://" not in uri and uri not in ("databricks",)):
        raise ValueError(f"mlflow.tracking_uri {mask_uri(uri)!r}: MLflow's file store is read-only in 3.x; use "
                         "sqlite:///path/to/mlflow.db or http://host:5000")
    return uri


def default_artifact_location(uri: str) -> str | None:
    """Next to a SQLite store, artifacts go to <db dir>/mlartifacts (not the CWD's ./mlruns)."""
    if uri.startswith("sqlite:///"):
        return "file://" + os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "mlartifacts")
    return None


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before Ray starts, when an http(s) tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise ConnectionError(f"MLflow tracking server {mask_uri(uri)} is unreachable ({mask_uri(str(e))}); start it or pass "
                              "--tracking-uri sqlite:///mlflow.db") from None


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def _param_batch(params: dict[str, Any]) -> list[Param]:
    return [Param(k, mask_uri(str(v))[:MAX_PARAM_LEN]) for k, v in sorted(params.items())]


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    batch = _param_batch(params)
    for i in range(0, len(batch), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=batch[i:i + 100])


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {}
    for pkg in ("e2kd", "torch", "torchvision", "ray", "optuna", "mlflow", "pyarrow", "bcos"):
        try:
            out[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[f"version.{pkg}"] = "not installed"
    return out


def find_parent(client: MlflowClient, exp_id: str, sweep: str) -> str | None:
    runs = client.search_runs([exp_id], f"tags.`{TAG_SWEEP}` = '{sweep}' and tags.`{TAG_ROLE}` = 'parent'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def create_parent(client: MlflowClient, exp_id: str, sweep: str, spec_path: str, params: dict[str, Any],
                  tags: dict[str, str] | None = None) -> str:
    run = client.create_run(exp_id, run_name=f"sweep-{sweep}", tags={**(tags or {}),
        TAG_SWEEP: sweep, TAG_ROLE: "parent", "mlflow.source.git.commit": git_commit(),
        "mlflow.note.content": f"e²KD sweep from {os.path.basename(spec_path)}", **package_versions()})
    log_params(client, run.info.run_id, params)
    if spec_path and os.path.isfile(spec_path):
        with open(spec_path) as f:
            text = f.read()
        with tempfile.TemporaryDirectory() as d:  # the spec as written, credentials masked
            copy = os.path.join(d, os.path.basename(spec_path))
            with open(copy, "w") as f:
                f.write(mask_uri(text))
            client.log_artifact(run.info.run_id, copy, artifact_path="spec")
    return run.info.run_id


def find_child(client: MlflowClient, exp_id: str, parent_id: str, trial_id: str) -> str | None:
    runs = client.search_runs([exp_id], f"tags.`{TAG_TRIAL}` = '{trial_id}' and tags.`{TAG_PARENT}` = '{parent_id}'",
                              max_results=2)
    return runs[0].info.run_id if runs else None


def get_or_create_child(uri: str, exp_id: str, parent_id: str, sweep: str, trial_id: str,
                        params: dict[str, Any], tags: dict[str, str]) -> str:
    """The one child run of ``trial_id``: found by tag when the trial is retried or the sweep
    resumes, created (with params) otherwise."""
    client = MlflowClient(uri)
    run_id = find_child(client, exp_id, parent_id, trial_id)
    if run_id is not None:
        client.set_terminated(run_id, status="RUNNING")
        client.set_tag(run_id, "e2kd.restarts", str(int(client.get_run(run_id).data.tags.get("e2kd.restarts", "0")) + 1))
        return run_id
    run = client.create_run(exp_id, run_name=f"trial-{trial_id}", tags={
        TAG_PARENT: parent_id, TAG_SWEEP: sweep, TAG_ROLE: "trial", TAG_TRIAL: trial_id, **tags})
    log_params(client, run.info.run_id, params)
    return run.info.run_id


class MlflowEpochCallback(ray.train.UserCallback):
    """Runs in the Ray Train controller: logs each epoch's rank-0 metrics and the explanation PNG.

    The client is created lazily because the callback is pickled to the controller actor."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client: MlflowClient | None = None

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        client = self._client = self._client or MlflowClient(self.tracking_uri)
        m = metrics[0]
        step = int(m.get("epoch", 0))
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in m.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
        client.log_batch(self.run_id, metrics=batch)
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                png = os.path.join(d, PNG_NAME)
                if os.path.isfile(png):
                    client.log_artifact(self.run_id, png)

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        client = self._client = self._client or MlflowClient(self.tracking_uri)
        first = next(iter(worker_exceptions.values()), None)
        client.set_tag(self.run_id, "e2kd.last_error", f"{type(first).__name__}: {first}"[:5000])


class MlflowTrialFinalizer(ray.tune.Callback):
    """Runs in the sweep process: closes each trial's child run (FINISHED/FAILED) and logs the
    final student from the trial's last checkpoint. ASHA-stopped trials count as finished."""

    def __init__(self, tracking_uri: str, exp_id: str, parent_id: str):
        self.tracking_uri = tracking_uri
        self.exp_id = exp_id
        self.parent_id = parent_id

    def _run(self, trial) -> str | None:
        return find_child(MlflowClient(self.tracking_uri), self.exp_id, self.parent_id, trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        run_id = self._run(trial)
        if run_id is None:
            return
        client = MlflowClient(self.tracking_uri)
        ckpt = (trial.last_result or {}).get("checkpoint_path")
        if ckpt:
            try:
                log_student(self.tracking_uri, run_id, ckpt)
            except Exception as e:  # a model that cannot be logged must not fail the sweep
                client.set_tag(run_id, "e2kd.model_log_error", str(e)[:5000])
        client.set_terminated(run_id, status="FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        run_id = self._run(trial)
        if run_id is not None:
            client = MlflowClient(self.tracking_uri)
            if trial.error_file and os.path.exists(trial.error_file):
                with open(trial.error_file) as f:
                    client.set_tag(run_id, "e2kd.error", f.read()[-5000:])
            client.set_terminated(run_id, status="FAILED")


def log_student(tracking_uri: str, run_id: str, checkpoint_path: str) -> None:
    """Log the checkpoint's student with mlflow.pytorch (state dict + architecture in the model)."""
    import mlflow
    import torch

    from trainables.checkpoint import load_checkpoint, read_meta
    from trainables.models import MODELS, build_model

    fs_path = checkpoint_path
    if "://" in checkpoint_path:  # remote storage: copy the checkpoint locally first
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(checkpoint_path)
        fs_path = tempfile.mkdtemp(prefix="e2kd-ckpt-")
        pafs.copy_files(path, fs_path, source_filesystem=fs)
    meta = read_meta(fs_path)
    state = load_checkpoint(fs_path)
    model = build_model(meta["student"], meta["num_classes"])
    model.load_state_dict(state["model"])
    model.eval()
    size = MODELS[meta["student"]].input_size
    channels = 6 if model.is_bcos else 3
    example = torch.zeros(2, channels, size, size)
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(model, name="student", input_example=example.numpy(),
                                 serialization_format="pickle")
        mlflow.log_dict(meta, "student/checkpoint_meta.json")


def trial_params(flat: dict[str, Any]) -> dict[str, Any]:
    return {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in flat.items()}
