"""The sweep's Optuna study lives in a real Optuna storage that Optuna's own tools open.

Unit tests (no Ray): where the storage goes by default, credentials from the environment that are
never pickled or printed, bad ``search.storage`` URLs, and a restored searcher that ignores what a
dead driver left in the storage (the KD baseline still runs once).

End to end (slow): a 2-trial multi-objective sweep on a local Ray instance, read back with
``optuna.load_study`` (Optuna's API, not the project's) and compared with Tune's results and the
MLflow child runs; a resume adds no Optuna trial; ``e2kd ui --optuna`` serves the study on
loopback; the report's Pareto front equals Optuna's ``best_trials`` over the same runs.
"""
from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest
import yaml

from orchestrator import optuna_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "Pw-s3cret-77"


def _quickstart() -> dict:
    with open(os.path.join(ROOT, "sweeps", "quickstart.yaml")) as f:
        return yaml.safe_load(f)


# ------------------------------------ where and how it is opened ---------------------------


def test_default_storage_sits_beside_the_mlflow_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from orchestrator.spec import spec_from_dict

    d = _quickstart()
    d["mlflow"]["tracking_uri"] = "sqlite:///stores/mlflow.db"
    spec = spec_from_dict(d)
    assert optuna_store.storage_url(spec) == f"sqlite:///{tmp_path}/stores/optuna.db"
    # a tracking server: inside the sweep's local storage
    assert optuna_store.default_url("runs", "http://127.0.0.1:5000") == f"sqlite:///{tmp_path}/runs/optuna.db"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # a cluster job: the head's home, not the job's temp dir
    assert optuna_store.default_url("s3://b/runs", "http://127.0.0.1:5000") == f"sqlite:///{tmp_path}/home/.e2kd/optuna.db"
    d["search"]["storage"] = "sqlite:///elsewhere.db"  # relative, like mlflow's: against the working dir
    assert optuna_store.storage_url(spec_from_dict(d)) == f"sqlite:///{tmp_path}/elsewhere.db"


def test_credentials_come_from_the_environment_and_are_never_pickled(tmp_path, monkeypatch):
    """Only the ``${VAR}`` template is pickled (Tune saves the searcher with its study in the
    experiment state); unpickling reads the environment again."""
    monkeypatch.setenv("E2KD_T_DBNAME", SECRET)
    template = f"sqlite:///{tmp_path}/" + "${E2KD_T_DBNAME}.db"
    storage = optuna_store.open_storage(template)
    study = optuna.create_study(storage=storage, study_name="s")
    study.add_trial(optuna.trial.create_trial(value=1.0))
    assert os.path.isfile(tmp_path / f"{SECRET}.db")  # the variable was used ...
    blob = pickle.dumps(study)
    assert SECRET.encode() not in blob  # ... but not pickled
    assert [t.value for t in pickle.loads(blob).trials] == [1.0]
    monkeypatch.delenv("E2KD_T_DBNAME")
    with pytest.raises(ValueError, match="E2KD_T_DBNAME is not set"):
        pickle.loads(blob)
    # a value is percent-encoded into the URL; a whole-URL variable is taken as is
    monkeypatch.setenv("E2KD_T_PW", "p@ss/w:rd")
    assert optuna_store.expand("postgresql://u:${E2KD_T_PW}@h/db") == "postgresql://u:p%40ss%2Fw%3Ard@h/db"
    monkeypatch.setenv("E2KD_T_URL", "sqlite:////x/y.db")
    assert optuna_store.expand("${E2KD_T_URL}") == "sqlite:////x/y.db"


@pytest.mark.parametrize("url,words", [
    ("redis://127.0.0.1:6379/0", "takes sqlite, postgresql, mysql URLs"),
    ("not a url", "not a database URL"),
    (f"postgresql://alice:{SECRET}@127.0.0.1:5432/optuna", "driver is not installed"),
    ("postgresql://alice:${E2KD_T_UNSET}@127.0.0.1/optuna", "E2KD_T_UNSET is not set"),
    ("sqlite:///:memory:", "in-memory"),
    ("sqlite:///{tmp}/file/optuna.db", "is a file"),
])
def test_bad_storage_url_is_one_line_naming_the_field(url, words, tmp_path):
    (tmp_path / "file").write_text("")
    if "psycopg2" in sys.modules or _importable("psycopg2"):
        if "driver" in words:
            pytest.skip("psycopg2 is installed here")
    with pytest.raises((ValueError, OSError)) as e:
        optuna_store.check_url(url.replace("{tmp}", str(tmp_path)))
    msg = str(e.value)
    assert msg.startswith("search.storage: ") and words in msg and "\n" not in msg, msg
    assert SECRET not in msg


def _importable(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def test_restore_ignores_trials_a_dead_driver_left_and_reruns_the_baseline(tmp_path):
    """The storage can be ahead of Tune's last searcher checkpoint: a trial asked for after it (here
    the KD baseline) is marked FAIL + orphaned on restore, and the restored searcher asks for the
    baseline again; the study then holds exactly one baseline that counts."""
    from orchestrator.spec import spec_from_dict
    from orchestrator.sweep import BASELINE_ATTR, build_searcher

    spec = spec_from_dict(_quickstart())
    url = f"sqlite:///{tmp_path}/optuna.db"
    first = build_searcher(spec, storage=optuna_store.open_storage(url), study_name="s")
    ckpt = str(tmp_path / "searcher.pkl")
    first.save(ckpt)  # Tune's last save: before any trial
    assert first.suggest("t0")["loss.lam"] == 0.0  # the baseline, RUNNING in the storage; then the driver dies

    again = build_searcher(spec, storage=optuna_store.open_storage(url), study_name="s")
    again.restore(ckpt)
    cfg = again.suggest("t0")  # Tune reruns its trial t0 (unknown to the checkpoint)
    assert cfg["loss.lam"] == 0.0
    again.on_trial_complete("t0", {spec.search.metric: 0.5})
    assert again.suggest("t1")["loss.lam"] > 0
    again.on_trial_complete("t1", {spec.search.metric: 0.6})

    study = optuna.load_study(study_name="s", storage=url)  # Optuna's own view
    states = [(t.state.name, bool(t.user_attrs.get(BASELINE_ATTR)), bool(t.user_attrs.get(optuna_store.ORPHAN_ATTR)))
              for t in study.trials]
    assert states == [("FAIL", True, True), ("COMPLETE", True, False), ("COMPLETE", False, False)]
    assert [t.value for t in study.trials if t.state.name == "COMPLETE"] == [0.5, 0.6]


def test_ui_optuna_refuses_a_busy_port_in_one_line(tmp_path, capsys):
    """The dashboard's address is checked before it starts: exit code 2, one line naming --port."""
    from orchestrator import cli

    url = f"sqlite:///{tmp_path}/optuna.db"
    optuna.create_study(storage=url, study_name="s")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = cli.main(["ui", "--optuna", "--optuna-storage", url, "--port", str(port)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and f"--port {port}" in err, err


# ------------------------------------ end to end ---------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _non_loopback_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: only picks the outgoing interface
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def _listening(port: int) -> list[str]:
    """The addresses a TCP socket listens on at ``port`` (the kernel's table: /proc/net/tcp{,6})."""
    import ipaddress

    out = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, p = local.split(":")
                if state == "0A" and int(p, 16) == port:  # 0A: LISTEN
                    raw = bytes.fromhex(addr)
                    # the kernel prints each 32-bit word in host (little-endian) order
                    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                    out.append(str(ipaddress.ip_address(raw)))
    return out


@pytest.mark.slow
def test_sweep_study_in_optuna_storage_dashboard_and_pareto(tmp_path, teacher_dir):
    import ray
    from mlflow import MlflowClient

    from orchestrator import pareto, report
    from orchestrator.spec import spec_from_dict
    from orchestrator.sweep import BASELINE_ATTR, run_sweep

    d = _quickstart()
    d.update(name="t-optuna", storage=str(tmp_path / "runs"), epochs=2, batch_size=20)
    d["data"].update(shots=3)
    d["teacher"].update(path=teacher_dir)
    d["search"].update(num_trials=2, scheduler="none", n_startup_trials=1,
                       objectives=[{"metric": "val_acc", "mode": "max"}, {"metric": "val_exp_sim", "mode": "max"}],
                       space={"loss.lam": {"type": "loguniform", "low": 0.5, "high": 5.0}})
    d["resources"].update(workers_per_trial=1, num_cpus=2, max_concurrent_trials=2)
    d["mlflow"] = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "t-optuna"}
    spec = spec_from_dict(d)
    url = f"sqlite:///{tmp_path}/optuna.db"  # the default: beside mlflow.db
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "240")
    ray.init(address="local", num_cpus=2, dashboard_host="127.0.0.1", log_to_driver=False)
    try:
        grid = run_sweep(spec, log=lambda s: None)
        assert len(grid) == 2 and not grid.errors
        reported = sorted((r.metrics["val_acc"], r.metrics["val_exp_sim"]) for r in grid)
        # Optuna's own API on the storage finds the study, named after the sweep, with Tune's values.
        assert optuna.get_all_study_names(url) == ["t-optuna"]
        study = optuna.load_study(study_name="t-optuna", storage=url)
        assert [dr.name for dr in study.directions] == ["MAXIMIZE", "MAXIMIZE"]
        assert sorted(tuple(t.values) for t in study.trials) == reported
        assert {t.state.name for t in study.trials} == {"COMPLETE"}
        assert sum(bool(t.user_attrs.get(BASELINE_ATTR)) for t in study.trials) == 1
        # ... which are the MLflow child runs' final metrics.
        client = MlflowClient(spec.mlflow.tracking_uri)
        parent, children = report.load_sweep(client, "t-optuna", "t-optuna")
        assert sorted((c.data.metrics["val_acc"], c.data.metrics["val_exp_sim"]) for c in children) == reported
        assert parent.data.tags[optuna_store.TAG_STORAGE] == url

        # A resume restores the study from the storage: no trial is added or rerun.
        run_sweep(spec, resume=True, log=lambda s: None)
        assert len(optuna.load_study(study_name="t-optuna", storage=url).trials) == 2
        # A new sweep of the same name on the same storage is refused before anything runs.
        import shutil

        shutil.rmtree(tmp_path / "runs")
        with pytest.raises(RuntimeError, match="already holds an Optuna study named 't-optuna'"):
            run_sweep(spec, log=lambda s: None)
    finally:
        ray.shutdown()

    # The report's Pareto front = Optuna's non-dominated trials of the same study (the oracle),
    # mapped to MLflow runs by their values; the table and the plot are on the parent run.
    text = report.print_report("t-optuna", spec.mlflow.tracking_uri, sweep="t-optuna", out_dir=str(tmp_path / "rep"),
                               allow_unequal=True)
    assert "Pareto front over val_acc (max), val_exp_sim (max)" in text and "KD baseline" in text
    parent, children = report.load_sweep(client, "t-optuna", "t-optuna")
    front_values = sorted((c.data.metrics["val_acc"], c.data.metrics["val_exp_sim"]) for c in children
                          if c.info.run_id in pareto.front_run_ids(parent))
    assert front_values == sorted(tuple(t.values) for t in study.best_trials)
    arts = [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
    assert {"report/pareto.png", "report/pareto.md"} <= set(arts), arts

    # `e2kd ui --optuna` serves the study (optuna-dashboard's JSON API), on loopback only.
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--optuna", "--tracking-uri",
                             spec.mlflow.tracking_uri, "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        body, deadline = None, time.time() + 60
        while body is None and time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    assert r.status == 200
                    body = json.loads(r.read())
            except OSError:
                time.sleep(0.5)
        assert body is not None, proc.stdout.read() if proc.poll() is not None else "no answer in 60 s"
        assert [s["study_name"] for s in body["study_summaries"]] == ["t-optuna"]
        sid = body["study_summaries"][0]["study_id"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{sid}?after=0", timeout=10) as r:
            assert r.status == 200 and len(json.loads(r.read())["trials"]) == 2
        listening = _listening(port)
        assert listening == ["127.0.0.1"], listening
        ip = _non_loopback_ip()
        if ip is not None:
            with pytest.raises(OSError):
                socket.create_connection((ip, port), timeout=2).close()
    finally:
        proc.terminate()
        proc.wait(20)
