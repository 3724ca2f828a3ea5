"""The MLflow tracking server stops mid-sweep and comes back: every trial still finishes, and
afterwards every epoch's metrics, every explanation PNG and every student are in MLflow, each once.

A real ``mlflow server`` (SQLite backend, proxied artifacts) on 127.0.0.1 is SIGKILLed (its whole
process group, as a crash would) once the first trial has logged an epoch, and restarted on the same
port and database after a pause; meanwhile the trials keep training. ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``
in every process stands for an outage longer than MLflow's own retry budget (about 4 minutes of
backoff for a refused connection), so that this test takes seconds instead of minutes: without the
product's outbox, the first failed request ends the trial (checked once against the code before
the outbox, commit 58d780a: the trial errored with MLflow's "Connection refused", then the finaliser's
own MLflow call raised inside Tune and the whole sweep failed with a TuneError).

Also, without a server: a trial whose checkpoint is missing is closed FAILED with the reason, never
FINISHED (the finaliser's second code path).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
EPOCHS = 4
OUTAGE_S = 15


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


class Server:
    """``mlflow server`` in its own process group, restartable on the same port and store."""

    def __init__(self, work: str):
        self.work, self.port = work, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout_s: float = 180) -> None:
        self.starts += 1
        log = open(os.path.join(self.work, f"mlflow-{self.starts}.log"), "w")
        self.proc = subprocess.Popen(
            [os.path.join(BIN, "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.work}/mlflow.db",
             "--artifacts-destination", os.path.join(self.work, "mlartifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout_s
        while not _up(self.url):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{open(log.name).read()[-3000:]}")
            time.sleep(0.5)

    def kill(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # our own session: the server and its workers
            except ProcessLookupError:
                pass
            self.proc.wait(10)
            self.proc = None


def _spec(work: str, teacher_dir: str, url: str) -> dict:
    with open(os.path.join(ROOT, "sweeps", "quickstart.yaml")) as f:
        d = yaml.safe_load(f)
    d.update(name="outage", storage=os.path.join(work, "runs"), epochs=EPOCHS, batch_size=20,
             eval_splits=["val"], explain_samples=2)
    d["data"].update(shots=3)
    d["teacher"].update(path=teacher_dir)
    d["search"].update(num_trials=2, scheduler="none", n_startup_trials=1,
                       space={"loss.lam": {"type": "loguniform", "low": 0.5, "high": 5.0}})
    d["resources"] = {"workers_per_trial": 1, "cpus_per_worker": 1, "driver_cpus": 0.25, "num_cpus": 3,
                      "max_concurrent_trials": 1}
    d["mlflow"] = {"tracking_uri": url, "experiment": "outage", "retry_s": 300}
    return d


@pytest.mark.slow
def test_mlflow_server_outage_mid_sweep_loses_nothing(tmp_path, teacher_dir, monkeypatch):
    import ray
    from mlflow import MlflowClient

    from orchestrator.spec import spec_from_dict
    from orchestrator.sweep import run_sweep

    work = str(tmp_path)
    server = Server(work)
    server.start()
    # Set before Ray starts, so every Ray process (trial drivers, Train controllers) inherits them.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "240")
    spec = spec_from_dict(_spec(work, teacher_dir, server.url))
    seen: dict = {}
    stop = threading.Event()

    def outage() -> None:
        client = MlflowClient(server.url)
        while not stop.is_set():
            try:
                exp = client.get_experiment_by_name("outage")
                runs = client.search_runs([exp.experiment_id], "tags.`e2kd.role` = 'trial'") if exp else []
                if runs and client.get_metric_history(runs[0].info.run_id, "epoch"):
                    break
            except Exception:
                pass
            time.sleep(0.5)
        else:
            return
        server.kill()
        seen["down_at"] = time.time()
        time.sleep(OUTAGE_S)
        server.start()
        seen["up_at"] = time.time()

    watcher = threading.Thread(target=outage, daemon=True)
    ray.init(address="local", num_cpus=3, dashboard_host="127.0.0.1", log_to_driver=False)
    try:
        watcher.start()
        t0 = time.time()
        grid = run_sweep(spec, log=print)
        stop.set()
        watcher.join(OUTAGE_S + 200)
    finally:
        ray.shutdown()
        if server.proc is None:
            server.start()
    try:
        assert "down_at" in seen and "up_at" in seen, f"the outage did not happen: {seen}"
        print(f"[outage] server down {seen['down_at'] - t0:.0f}–{seen['up_at'] - t0:.0f} s into a sweep of "
              f"{time.time() - t0:.0f} s")
        assert len(grid) == 2 and not grid.errors, [r.error for r in grid]

        client = MlflowClient(server.url)
        exp = client.get_experiment_by_name("outage")
        parents = client.search_runs([exp.experiment_id], "tags.`e2kd.role` = 'parent'")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
        assert len(children) == 2, [c.info.run_name for c in children]
        counts = {}
        for c in children:
            assert c.info.status == "FINISHED", (c.info.run_name, c.info.status, c.data.tags)
            for key in ("epoch", "val_acc", "train_loss"):
                steps = [m.step for m in client.get_metric_history(c.info.run_id, key)]
                assert steps == list(range(1, EPOCHS + 1)), (c.info.run_name, key, steps)  # all, each once
            arts = {a.path for a in client.list_artifacts(c.info.run_id)}
            assert {"explanations.png", "student"} <= arts, arts
            counts[c.info.run_name] = len(c.data.metrics)
        # Nothing left behind in the trials' outboxes.
        leftover = [os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(work, "runs"))
                    if "e2kd-mlflow-outbox" in dp for f in fs]
        assert leftover == [], leftover
        print(f"[outage] 2 FINISHED child runs, {EPOCHS} points per metric each, PNG + student each: {counts}")
    finally:
        server.kill()


def test_finaliser_never_finishes_a_run_without_its_model(tmp_path):
    """A trial that ended with no readable checkpoint: FAILED with the reason (was FINISHED with a tag)."""
    from mlflow import MlflowClient

    from orchestrator import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = tracking.ensure_experiment(client, "fin", str(tmp_path / "art"))
    parent = tracking.create_parent(client, exp, "s", "", {})
    runs = {t: tracking.get_or_create_child(uri, exp, parent, "s", t, params={}, tags={}) for t in ("a", "b")}
    fin = tracking.MlflowTrialFinalizer(uri, exp, parent, str(tmp_path / "runs"), "s", retry_s=0)
    fin.finalize("a", {"checkpoint_path": str(tmp_path / "runs" / "missing" / "checkpoint_000001")}, "FINISHED")
    fin.finalize("b", {}, "FINISHED")
    for t, run_id in runs.items():
        run = client.get_run(run_id)
        assert run.info.status == "FAILED", (t, run.info.status)
        assert run.data.tags.get("e2kd.model_log_error"), run.data.tags


def test_outbox_resend_is_idempotent_and_ordered(tmp_path):
    """Records are sent oldest first and deleted once sent; sending one twice (a crash between send
    and delete) leaves MLflow unchanged."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from orchestrator import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = tracking.ensure_experiment(client, "box", str(tmp_path / "art"))
    run_id = client.create_run(exp).info.run_id
    box = tracking.Outbox(str(tmp_path / "box"))
    for step in (1, 2, 3):
        box.put(run_id, [Metric("m", float(step), 1000 + step, step)], {"explanations.png": b"png%d" % step})
    first = box.pending()[0]
    with open(first) as f:
        dup = f.read()
    assert box.drain(client) == 3 and box.pending() == []
    with open(first, "w") as f:  # the same record again, as after a crash before its delete
        f.write(dup)
    with open(first.replace(".json", ".explanations.png"), "wb") as f:
        f.write(b"png1")
    assert box.drain(client) == 1
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "m")] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    local = client.download_artifacts(run_id, "explanations.png", str(tmp_path / "dl"))
    with open(local, "rb") as f:
        assert f.read() == b"png1"  # the resent (oldest) record was sent last


def test_git_commit_from_the_submitting_machine(tmp_path, monkeypatch):
    """A cluster's copy of the project has no .git: E2KD_GIT_COMMIT (passed with the job) is what the
    parent run records."""
    from mlflow import MlflowClient

    from orchestrator import tracking

    monkeypatch.setenv("E2KD_GIT_COMMIT", "0123abcd" * 5)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = tracking.ensure_experiment(client, "git", str(tmp_path / "art"))
    parent = tracking.create_parent(client, exp, "s", "", {})
    assert client.get_run(parent).data.tags["mlflow.source.git.commit"] == "0123abcd" * 5


def test_leftover_runs_are_finalised_only_for_ended_trials(tmp_path):
    """At the end of a sweep (or on --resume), child runs left RUNNING while MLflow was down are closed
    — but only for trials that ended: an interrupted trial keeps its run open for the resume."""
    from types import SimpleNamespace

    from mlflow import MlflowClient

    from orchestrator import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = tracking.ensure_experiment(client, "left", str(tmp_path / "art"))
    parent = tracking.create_parent(client, exp, "s", "", {})
    runs = {t: tracking.get_or_create_child(uri, exp, parent, "s", t, params={}, tags={}) for t in ("done", "mid", "err")}
    err_file = tmp_path / "error.txt"
    err_file.write_text("RuntimeError: boom")
    trials = [SimpleNamespace(trial_id="done", status="TERMINATED", last_result={}, error_file=None),
              SimpleNamespace(trial_id="mid", status="PENDING", last_result={"epoch": 1}, error_file=None),
              SimpleNamespace(trial_id="err", status="ERROR", last_result={}, error_file=str(err_file))]
    fin = tracking.MlflowTrialFinalizer(uri, exp, parent, str(tmp_path / "runs"), "s", retry_s=0)
    assert fin.finalize_leftovers(trials) == []
    status = {t: client.get_run(r).info.status for t, r in runs.items()}
    assert status == {"done": "FAILED", "mid": "RUNNING", "err": "FAILED"}, status  # "done" has no checkpoint
    assert "boom" in client.get_run(runs["err"]).data.tags["e2kd.error"]
