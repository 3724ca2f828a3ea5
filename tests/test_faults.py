"""Sweeps survive faults and nothing is lost.

* checkpoints and caches (no Ray): a truncated ``state.pt`` is refused naming the file, and
  ``_newest_valid_checkpoint`` falls back to the newest older checkpoint that verifies; a truncated
  cache shard is refused naming the shard.
* worker death: a Ray Train worker process SIGKILLed by PID mid-trial; the trial resumes from its
  last checkpoint (not epoch 0), finishes, and its MLflow child run is the same run, continued.
* non-finite loss: ``--set optim.lr=1e30``; the trial fails once, with ``NonFiniteLossError`` in
  Tune's error, a FAILED MLflow child run tagged with the reason, an Optuna FAIL, and no retry
  (no second worker group, no second Train run).
* never-schedulable resources on a connected cluster: refused before any MLflow run is written.
* driver death: ``e2kd sweep`` SIGKILLed after its first trial finished, then ``--resume``.
* node loss: a non-head node of a 3-node ``ray.cluster_utils.Cluster`` removed mid-trial.

Ray tests are ``slow``; each uses its own Ray instance (``address="local"`` / its own
``RAY_TMPDIR``) and cleans up only processes it started.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E2KD = os.path.join(os.path.dirname(sys.executable), "e2kd")


# ------------------------------------ helpers ------------------------------------------------


def tiny_spec(work, teacher_dir: str, name: str, *, epochs: int = 4, num_trials: int = 1, **resources) -> dict:
    with open(os.path.join(ROOT, "sweeps", "quickstart.yaml")) as f:
        d = yaml.safe_load(f)
    d.update(name=name, storage=os.path.join(str(work), "runs"), epochs=epochs, batch_size=20, max_failures=1,
             eval_splits=["val"], explain_samples=2)  # less evaluation per epoch: these tests are about faults
    d["data"].update(shots=3)
    d["teacher"].update(path=teacher_dir)
    d["search"].update(num_trials=num_trials, scheduler="none", n_startup_trials=1,
                       space={"loss.lam": {"type": "loguniform", "low": 0.5, "high": 5.0}})
    d["resources"] = {"workers_per_trial": 1, "cpus_per_worker": 1, "driver_cpus": 0.25, "num_cpus": 3,
                      "max_concurrent_trials": 1, **resources}
    d["mlflow"] = {"tracking_uri": f"sqlite:///{work}/mlflow.db", "experiment": "faults"}
    return d


def mlflow_runs(uri: str, role: str, parent: str | None = None):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("faults")
    flt = f"tags.`e2kd.role` = '{role}'" + (f" and tags.`mlflow.parentRunId` = '{parent}'" if parent else "")
    return client, client.search_runs([exp.experiment_id], flt)


def study_of(exp_dir: str):
    """The Optuna study Tune saved with the experiment (the searcher state)."""
    path = sorted(glob.glob(os.path.join(exp_dir, "searcher-state-*.pkl")))[-1]  # the latest save
    with open(path, "rb") as f:
        return pickle.load(f)["_ot_study"]


E = 10  # epochs of the worker-kill and node-loss trials (one step each): the watcher needs a window


def actors(class_name: str, state: str | None = None):
    """Actors of this test's Ray cluster (other Ray instances may run on the machine: never let the
    State API guess which one)."""
    import ray
    from ray.util.state import list_actors

    filters = [("class_name", "=", class_name)] + ([("state", "=", state)] if state else [])
    return list_actors(address=ray.get_runtime_context().gcs_address, filters=filters, limit=10_000)


def session_logs(pattern: str) -> list[str]:
    """Lines matching ``pattern`` in this Ray session's worker logs."""
    import ray

    logs = os.path.join(ray._private.worker.global_worker.node.get_session_dir_path(), "logs")
    hits = []
    for path in glob.glob(os.path.join(logs, "**", "*.out"), recursive=True) + glob.glob(
            os.path.join(logs, "**", "*.log"), recursive=True):
        with open(path, errors="replace") as f:
            hits += [m.group(0) for m in re.finditer(pattern, f.read())]
    return hits


class Watcher(threading.Thread):
    """Polls MLflow (once the sweep has created its Tune directory) and calls ``act(run_id,
    epochs)`` once the trial's child run has logged epoch ``after_epoch``; records what it did."""

    def __init__(self, uri: str, exp_dir: str, after_epoch: int, last_epoch: int, act):
        super().__init__(daemon=True)
        self.uri, self.exp_dir, self.after_epoch, self.last_epoch, self.act = uri, exp_dir, after_epoch, last_epoch, act
        self.done = threading.Event()
        self.info: dict = {}

    def run(self) -> None:
        t0 = time.monotonic()
        deadline = time.time() + 600
        while not self.done.is_set() and time.time() < deadline:
            time.sleep(0.25)
            if not os.path.isdir(self.exp_dir):  # MLflow store and parent run exist once Tune runs
                continue
            try:
                client, runs = mlflow_runs(self.uri, "trial")
                if not runs:
                    continue
                run_id = runs[0].info.run_id
                epochs = [int(m.value) for m in client.get_metric_history(run_id, "epoch")]
            except Exception:  # store busy: poll again
                continue
            if not epochs or max(epochs) < self.after_epoch:
                continue
            self.info.update(run_id=run_id, epochs_before=epochs, acted_after_s=round(time.monotonic() - t0, 1))
            if max(epochs) >= self.last_epoch:
                self.info["too_late"] = True
            else:
                try:
                    self.act(self.info)
                except Exception as e:  # reported by the test
                    self.info["error"] = repr(e)
            return


def sweep_with_fault(spec, act, after_epoch: int = 1):
    """Run ``spec``'s one-trial sweep while a :class:`Watcher` calls ``act(info)`` once the trial has
    logged ``after_epoch``; returns (ResultGrid, what the watcher recorded)."""
    from orchestrator.sweep import experiment_path, run_sweep

    watcher = Watcher(spec.mlflow.tracking_uri, experiment_path(spec, spec.storage), after_epoch=after_epoch,
                      last_epoch=spec.train.epochs, act=act)
    watcher.start()
    try:
        grid = run_sweep(spec, log=lambda s: None)
    finally:
        watcher.done.set()
        watcher.join(10)
    print("watcher:", watcher.info)
    return grid, watcher.info


# ------------------------------------ checkpoints and caches (no Ray) ------------------------


def _write_ckpt(directory: str, epoch: int) -> str:
    from trainables.checkpoint import save_checkpoint

    save_checkpoint(directory, {"model": {"w": __import__("torch").full((64,), float(epoch))}, "epoch": epoch,
                                "step": 10 * epoch}, meta={"epoch": epoch})
    return directory


def _truncate(path: str, keep: float = 0.5) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def test_truncated_state_pt_is_refused_naming_the_file(tmp_path):
    from trainables.checkpoint import CorruptCheckpointError, load_checkpoint

    d = _write_ckpt(str(tmp_path / "checkpoint_000000"), 1)
    assert load_checkpoint(d)["epoch"] == 1
    _truncate(os.path.join(d, "state.pt"))
    with pytest.raises(CorruptCheckpointError) as e:
        load_checkpoint(d)
    assert os.path.join(d, "state.pt") in str(e.value) and "truncated" in str(e.value)
    os.remove(os.path.join(d, "meta.json"))  # a write that died before its metadata
    with pytest.raises(CorruptCheckpointError, match="meta.json is missing"):
        load_checkpoint(d)


def test_newest_valid_checkpoint_falls_back_to_the_previous_good_one(tmp_path, capsys):
    import pyarrow.fs as pafs
    import ray.train

    from trainables.checkpoint import CorruptCheckpointError, load_checkpoint
    from trainables.train_loop import _newest_valid_checkpoint

    fs = pafs.LocalFileSystem()
    good = _write_ckpt(str(tmp_path / "checkpoint_000000"), 1)
    bad = _write_ckpt(str(tmp_path / "checkpoint_000001"), 2)
    _truncate(os.path.join(bad, "state.pt"))
    with _newest_valid_checkpoint(ray.train.Checkpoint(bad, fs)) as d:  # the latest registered one is corrupt
        assert load_checkpoint(d)["epoch"] == 1
        assert os.path.realpath(d) == os.path.realpath(good)
    assert f"skipping checkpoint {bad}" in capsys.readouterr().out
    with _newest_valid_checkpoint(ray.train.Checkpoint(good, fs)) as d:  # never a *newer* sibling
        assert load_checkpoint(d)["epoch"] == 1
    _truncate(os.path.join(good, "state.pt"))
    with pytest.raises(CorruptCheckpointError, match="no readable checkpoint"):
        with _newest_valid_checkpoint(ray.train.Checkpoint(bad, fs)):
            pass


def test_truncated_cache_shard_is_refused_naming_the_shard(tmp_path):
    import numpy as np

    from trainables.data.cache import CacheError, CacheWriter, open_cache

    with CacheWriter(tmp_path / "cache", {"teacher_sha256": "a" * 64}, 10, (8, 8), rows_per_shard=16) as w:
        w.add(np.arange(40), np.zeros((40, 10), np.float32), np.ones((40, 8, 8), np.float32))
        manifest = w.close()
    shard = os.path.join(tmp_path, "cache", manifest["shards"][1]["file"])
    _truncate(shard, 0.6)
    for verify in (True, False):  # checksum, and (without it) the Parquet reader itself
        with pytest.raises(CacheError) as e:
            open_cache(tmp_path / "cache", verify=verify)
        assert shard in str(e.value)


# ------------------------------------ on one local Ray instance ------------------------------


@pytest.mark.slow
class TestOnOneLocalRayInstance:
    """One `address="local"` instance (the call `e2kd sweep` makes), shut down after the class, before
    the tests below start their own clusters."""

    @pytest.fixture(scope="class")
    def local_ray(self):
        import ray

        from orchestrator.sweep import init_ray

        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "240")
        assert init_ray(None, 3, log=lambda s: None)  # the same call `e2kd sweep` makes
        try:
            yield ray
        finally:
            ray.shutdown()

    def test_local_dashboard_listens_on_loopback_only(self, local_ray):
        import psutil

        url = local_ray._private.worker.global_worker.node.address_info["webui_url"]
        host, port = url.rsplit(":", 1)
        assert host == "127.0.0.1", url
        listening = {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == int(port)}
        assert listening == {"127.0.0.1"}, listening


    def test_worker_killed_mid_trial_resumes_from_checkpoint(self, tmp_path, teacher_dir, local_ray):
        from orchestrator.spec import spec_from_dict

        # 10 one-step epochs: wide enough a window for the watcher, which sees an epoch only once
        # MLflow has it (a loaded machine delays that by seconds; with 4 epochs the trial had ended).
        spec = spec_from_dict(tiny_spec(tmp_path, teacher_dir, "f-worker", epochs=E))
        uri = spec.mlflow.tracking_uri

        def kill_the_worker(info):
            (w,) = actors("RayTrainWorker", "ALIVE")
            info.update(pid=w.pid, actor_id=w.actor_id)
            os.kill(w.pid, signal.SIGKILL)

        grid, info = sweep_with_fault(spec, kill_the_worker)
        assert "pid" in info, f"the worker was not killed mid-trial: {info}"
        assert len(grid) == 1 and not grid.errors, grid.errors
        assert grid[0].metrics["epoch"] == E

        # The killed worker is dead; the trial went on in a new worker process.
        workers = actors("RayTrainWorker")
        assert any(w.actor_id == info["actor_id"] and w.state == "DEAD" for w in workers)
        assert any(w.pid != info["pid"] for w in workers)

        # Resumed from its last checkpoint, not from epoch 0.
        resumed = [int(m) for m in re.findall(r"resumed from checkpoint at epoch (\d+)",
                                              "\n".join(session_logs(r"\[e2kd\] resumed from checkpoint at epoch \d+")))]
        assert resumed and 1 <= resumed[-1] <= max(info["epochs_before"]), (resumed, info)

        # Exactly one child run: the same run, continued; per-epoch history never restarts at 1.
        client, parents = mlflow_runs(uri, "parent")
        _, children = mlflow_runs(uri, "trial", parents[0].info.run_id)
        assert len(children) == 1 and children[0].info.run_id == info["run_id"]
        child = children[0]
        assert child.info.status == "FINISHED"
        assert "e2kd.restarts" not in child.data.tags  # the trial driver was not rerun: Train restarted the workers
        assert "e2kd.last_error" in child.data.tags  # the worker death was recorded
        epochs = [int(m.value) for m in client.get_metric_history(child.info.run_id, "epoch")]
        assert epochs[0] == 1 and epochs.count(1) == 1 and epochs[-1] == E and set(epochs) == set(range(1, E + 1)), epochs
        steps = sorted(m.value for m in client.get_metric_history(child.info.run_id, "step"))
        assert steps[-1] == E * 1  # 30 images / batch 20 = 1 full batch per epoch (drop_last), counted across the restart


    def test_nonfinite_loss_fails_the_trial_once_with_the_reason(self, tmp_path, teacher_dir, local_ray):
        from optuna.trial import TrialState

        from orchestrator.spec import spec_from_dict
        from orchestrator.sweep import experiment_path, run_sweep

        d = tiny_spec(tmp_path, teacher_dir, "f-nan", epochs=3)
        d["optim"]["lr"] = 1e30  # the first step sends the weights to ±1e30: NaN logits
        spec = spec_from_dict(d)
        workers_before, controllers_before = len(actors("RayTrainWorker")), len(actors("TrainController"))
        grid = run_sweep(spec, log=lambda s: None)

        # Tune: the trial is ERROR, with the reason.
        assert len(grid) == 1 and len(grid.errors) == 1
        assert "NonFiniteLossError" in repr(grid[0].error) + str(grid[0].error), repr(grid[0].error)
        assert "non-finite loss" in str(grid[0].error)
        # No retry spent on a deterministic failure: one worker group, one Train run.
        assert len(actors("RayTrainWorker")) - workers_before == 1
        assert len(actors("TrainController")) - controllers_before == 1

        # MLflow: the child run FAILED, with the reason as tags; no NaN metric.
        import math

        client, parents = mlflow_runs(spec.mlflow.tracking_uri, "parent")
        assert parents[0].info.status == "FAILED"
        _, (child,) = mlflow_runs(spec.mlflow.tracking_uri, "trial", parents[0].info.run_id)
        assert child.info.status == "FAILED"
        assert "non-finite loss" in child.data.tags["e2kd.nonfinite"]
        assert "NonFiniteLossError" in child.data.tags["e2kd.error"]
        assert all(math.isfinite(v) for v in child.data.metrics.values()), child.data.metrics

        # Optuna: a FAIL without a value, never a NaN it would rank.
        (trial,) = study_of(experiment_path(spec, spec.storage)).trials
        assert trial.state == TrialState.FAIL and trial.value is None


    def test_train_command_fails_once_on_nonfinite_loss_and_closes_its_run(self, tmp_path, teacher_dir, local_ray,
                                                                           capsys):
        from orchestrator import cli

        d = tiny_spec(tmp_path, teacher_dir, "f-train-nan", epochs=3)
        d["optim"]["lr"] = 1e30
        path = tmp_path / "nan.yaml"
        path.write_text(yaml.safe_dump(d))
        controllers_before = len(actors("TrainController"))
        assert cli.main(["train", str(path)]) == 2
        err = capsys.readouterr().err
        assert "non-finite loss" in err and "failed" in err, err
        assert len(actors("TrainController")) - controllers_before == 1  # not retried (max_failures=1)
        _, (run,) = mlflow_runs(d["mlflow"]["tracking_uri"], "train")
        assert run.info.status == "FAILED"  # not left RUNNING in the UI
        assert "non-finite loss" in run.data.tags["e2kd.failure"]


    def test_train_command_twice_trains_twice(self, tmp_path, teacher_dir, local_ray):
        """A second `e2kd train` with other --set values trains its own run. (Before, every `e2kd
        train` of a spec used the Train run name `<name>-train`, so the second resumed the first's
        last checkpoint at the final epoch and trained nothing.)"""
        from orchestrator import cli

        d = tiny_spec(tmp_path, teacher_dir, "f-train-twice", epochs=2)
        path = tmp_path / "train.yaml"
        path.write_text(yaml.safe_dump(d))
        assert cli.main(["train", str(path)]) == 0
        assert cli.main(["train", str(path), "--set", "seed=1"]) == 0
        client, runs = mlflow_runs(d["mlflow"]["tracking_uri"], "train")
        assert len(runs) == 2
        for run in runs:
            assert run.info.status == "FINISHED"
            assert [int(m.value) for m in client.get_metric_history(run.info.run_id, "epoch")] == [1, 2]
            assert "student" in {a.path for a in client.list_artifacts(run.info.run_id)}
        assert sorted(r.data.params["seed"] for r in runs) == ["0", "1"]
        train_runs = [n for n in os.listdir(tmp_path / "runs") if n.startswith("f-train-twice-train-")]
        assert len(train_runs) == 2, train_runs

    def test_unschedulable_on_a_connected_cluster_is_refused_before_anything_is_written(self, tmp_path, teacher_dir,
                                                                                       local_ray):
        from orchestrator.spec import spec_from_dict
        from orchestrator.sweep import run_sweep

        spec = spec_from_dict(tiny_spec(tmp_path, teacher_dir, "f-huge", workers_per_trial=10))
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=r"one trial needs 10\.25 CPU.*the cluster has 3"):
            run_sweep(spec, log=lambda s: None)
        assert time.monotonic() - t0 < 10
        assert sorted(os.listdir(tmp_path)) == []  # no MLflow store, no Tune directory


# ------------------------------------ driver death (the real CLI) ----------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ours(marker: str, pgid: int) -> list[int]:
    """Processes of a killed `e2kd sweep`: its process group, or started under its RAY_TMPDIR."""
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == os.getpid():
            continue
        pid = int(p)
        try:
            if os.getpgid(pid) == pgid:
                pids.append(pid)
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if marker.encode() in cmd or f"RAY_TMPDIR={marker}".encode() in env.split(b"\0"):
            pids.append(pid)
    return pids


def _kill_ours(marker: str, pgid: int) -> None:
    for _ in range(3):
        pids = _ours(marker, pgid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(1)


def end_sweeps(procs: list[subprocess.Popen], work: str) -> None:
    """Teardown of `e2kd sweep` processes started in their own sessions: SIGKILL what still runs,
    then every Ray process they started (found by ``work``, their RAY_TMPDIR); ``work`` removed."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(30)
        _kill_ours(work, p.pid)
    shutil.rmtree(work, ignore_errors=True)


def _trial_states(exp_dir: str) -> dict[str, str]:
    states = {}
    for path in sorted(glob.glob(os.path.join(exp_dir, "experiment_state-*.json")))[-1:]:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        for trial_json, _ in data["trial_data"]:
            t = json.loads(trial_json)
            states[t["trial_id"]] = t["status"]
    return states


def first_finished_trial(proc: subprocess.Popen, log: str, name: str, uri: str, states, timeout_s: float):
    """Poll a running `e2kd sweep` until one of its trials is over both in Tune's experiment state
    (``states()`` -> {trial_id: status}) and in MLflow (its child run FINISHED; the parent exists
    once the sweep line is printed). Returns that child run, or None if the sweep exited or
    ``timeout_s`` passed first."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if f"[e2kd] sweep '{name}'" not in open(log).read():
            continue
        done = {t for t, st in states().items() if st == "TERMINATED"}
        try:
            _, children = mlflow_runs(uri, "trial")
        except Exception:  # store busy: poll again
            continue
        child = next((c for c in children if c.info.status == "FINISHED" and c.data.tags["e2kd.trial_id"] in done), None)
        if child is not None:
            return child
    return None


def _digest_tree(path: str) -> dict[str, str]:
    out = {}
    for dp, _, fn in os.walk(path):
        for n in fn:
            p = os.path.join(dp, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.mark.slow
def test_driver_killed_then_resume_reruns_nothing(teacher_dir):
    work = tempfile.mkdtemp(prefix="e2kdf-")  # short: Ray's socket paths live under RAY_TMPDIR
    spec_path = os.path.join(work, "spec.yaml")
    # Both trials run at once: when the first finishes, the driver is killed while the other is mid-trial.
    d = tiny_spec(work, teacher_dir, "f-driver", epochs=3, num_trials=2, max_concurrent_trials=2)
    with open(spec_path, "w") as f:
        yaml.safe_dump(d, f)
    uri, exp_dir = d["mlflow"]["tracking_uri"], os.path.join(work, "runs", "f-driver")
    env = {**os.environ, "RAY_TMPDIR": work, "PYTHONUNBUFFERED": "1", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "240"}
    log1, log2 = os.path.join(work, "first.log"), os.path.join(work, "resume.log")
    procs, t0 = [], time.monotonic()

    def say(what: str) -> None:  # timings, shown when the test fails
        print(f"[{time.monotonic() - t0:6.1f} s] {what}", flush=True)

    try:
        with open(log1, "w") as out:
            first = subprocess.Popen([E2KD, "sweep", spec_path], cwd=work, env=env, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(first)
        child = first_finished_trial(first, log1, "f-driver", uri, lambda: _trial_states(exp_dir), 400)
        assert child is not None, "no trial finished:\n" + open(log1).read()[-3000:]
        finished = child.data.tags["e2kd.trial_id"]
        say(f"trial {finished} finished; killing the driver")
        assert first.poll() is None, "the sweep ended before it could be killed"
        client, (parent,) = mlflow_runs(uri, "parent")
        result_json = glob.glob(os.path.join(exp_dir, f"*{finished}*", "result.json"))[0]
        before = {"result": _digest_tree(os.path.dirname(result_json)),
                  "train": _digest_tree(os.path.join(work, "runs", f"f-driver-train-{finished}")),
                  "history": [(m.step, m.value) for m in client.get_metric_history(child.info.run_id,
                                                                                     "val_agreement")]}

        os.killpg(first.pid, signal.SIGKILL)  # the driver, mid-sweep, without warning
        first.wait(30)
        _kill_ours(work, first.pid)  # the Ray processes it started (ray-notes §5.3)
        say("driver and its Ray processes killed; resuming")

        with open(log2, "w") as out:
            resume = subprocess.Popen([E2KD, "sweep", spec_path, "--resume"], cwd=work, env=env, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(resume)
        rc = resume.wait(400)
        say(f"resume exited with {rc}")
        text = open(log2).read()
        assert rc == 0, text[-4000:]
        assert f"resuming sweep 'f-driver': MLflow parent run {parent.info.run_id}" in text

        # Finished trial: not rerun (same result files, same Train run directory, same history).
        assert _digest_tree(os.path.dirname(result_json)) == before["result"]
        assert _digest_tree(os.path.join(work, "runs", f"f-driver-train-{finished}")) == before["train"]
        assert [(m.step, m.value) for m in client.get_metric_history(child.info.run_id,
                                                                      "val_agreement")] == before["history"]
        # Every trial finished, exactly as many as asked for.
        states = _trial_states(exp_dir)
        assert len(states) == 2 and set(states.values()) == {"TERMINATED"}, states
        # Optuna's history was restored, KD baseline included: no extra suggestion.
        study = study_of(exp_dir)
        assert len(study.trials) == 2
        assert sum(bool(t.user_attrs.get("kd_baseline")) for t in study.trials) == 1
        assert all(t.value is not None for t in study.trials)
        # The same study in the Optuna storage beside mlflow.db, read with Optuna's own API: the two
        # trials, once each, with the values Tune saved (a trial the killed driver had only just asked
        # for would be there too, FAIL and tagged orphaned, never counted).
        import optuna

        stored = optuna.load_study(study_name="f-driver", storage=f"sqlite:///{work}/optuna.db")
        kept = [t for t in stored.trials if not t.user_attrs.get("e2kd.orphaned")]
        assert [t.state.name for t in kept] == ["COMPLETE", "COMPLETE"]
        assert sorted(t.value for t in kept) == sorted(t.value for t in study.trials)
        assert {t.state.name for t in stored.trials if t not in kept} <= {"FAIL"}
        # MLflow: the same single parent, one child per trial, all closed.
        _, parents = mlflow_runs(uri, "parent")
        assert [p.info.run_id for p in parents] == [parent.info.run_id] and parents[0].info.status == "FINISHED"
        _, children = mlflow_runs(uri, "trial", parent.info.run_id)
        assert sorted(c.data.tags["e2kd.trial_id"] for c in children) == sorted(states)
        assert {c.info.status for c in children} == {"FINISHED"}
        assert "e2kd.restarts" not in next(c for c in children if c.data.tags["e2kd.trial_id"] == finished).data.tags
    finally:
        end_sweeps(procs, work)


# ------------------------------------ node loss ----------------------------------------------


@pytest.mark.slow
def test_node_removed_mid_trial_sweep_completes(tmp_path, teacher_dir, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.spec import spec_from_dict

    tmp = tempfile.mkdtemp(prefix="e2kdn-")
    monkeypatch.setenv("RAY_TMPDIR", tmp)  # this cluster's address file and sessions stay in our directory
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "240")
    # Trial drivers (0.25 CPU) are pinned to the head by a custom resource; the head's other 0.75
    # CPU cannot hold a 1-CPU Train worker, so the worker runs on one of the two other nodes.
    cluster = Cluster(initialize_head=True, shutdown_at_exit=False,
                      head_node_args={"num_cpus": 1, "resources": {"e2kd_driver": 1}, "include_dashboard": True,
                                      "dashboard_host": "127.0.0.1", "dashboard_port": _free_port()})
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        spec = spec_from_dict(tiny_spec(tmp_path, teacher_dir, "f-node", epochs=E, num_cpus=None,
                                        driver_resource="e2kd_driver"))

        def remove_the_workers_node(info):
            (w,) = actors("RayTrainWorker", "ALIVE")
            (node,) = [n for n in nodes if n.node_id == w.node_id]
            info.update(node_id=w.node_id, actor_id=w.actor_id)
            cluster.remove_node(node, allow_graceful=False)

        grid, info = sweep_with_fault(spec, remove_the_workers_node)
        assert "node_id" in info, f"no node was removed mid-trial: {info}"
        assert len(grid) == 1 and not grid.errors, grid.errors
        assert grid[0].metrics["epoch"] == E
        # The GCS marks a removed node dead after its health checks fail (seconds): the trial,
        # moved to another node, may finish before that.
        deadline = time.monotonic() + 60
        while (alive_nodes := {n["NodeID"] for n in ray.nodes() if n["Alive"]}) and info["node_id"] in alive_nodes \
                and time.monotonic() < deadline:
            time.sleep(1)
        assert info["node_id"] not in alive_nodes and len(alive_nodes) == 2
        # The trial finished on what remains: a worker on another node.
        assert any(w.node_id != info["node_id"] and w.actor_id != info["actor_id"] for w in actors("RayTrainWorker"))
        client, parents = mlflow_runs(spec.mlflow.tracking_uri, "parent")
        _, children = mlflow_runs(spec.mlflow.tracking_uri, "trial", parents[0].info.run_id)
        assert len(children) == 1 and children[0].info.status == "FINISHED"
        assert "e2kd.restarts" not in children[0].data.tags  # Train moved the worker; the trial driver lived on
        epochs = [int(m.value) for m in client.get_metric_history(children[0].info.run_id, "epoch")]
        assert epochs.count(1) == 1 and epochs[-1] == E, epochs
    finally:
        ray.shutdown()
        cluster.shutdown()
        _kill_ours(tmp, pgid=-1)  # anything of this cluster that outlived it (found by its RAY_TMPDIR)
        shutil.rmtree(tmp, ignore_errors=True)
