"""The cluster's MLflow server refuses anyone without credentials.

Both cluster files start ``mlflow server --app-name basic-auth`` (MLflow's basic-auth app) with a
configuration written by ``python -m orchestrator.mlflow_auth`` and the admin password from the
environment (``~/.e2kd-mlflow.env``, copied to every node and exported by ``~/.bashrc``; never in
a spec or a command line). Here that exact command — its ``mlflow server`` arguments and its
environment, read from cluster-local.yaml, with the head's address, port and home directory
replaced by loopback, a free port and a temporary folder — runs for real and is asked without
credentials, with wrong ones and with the right ones; e2kd's own pre-flight check gives one line
for refused credentials.
"""
from __future__ import annotations

import base64
import os
import random
import re
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_FILES = [ROOT / "cluster.yaml", ROOT / "cluster-local.yaml"]


def mlflow_command(path: Path) -> str:
    cfg = yaml.safe_load(path.read_text())
    (cmd,) = [c for c in cfg["head_start_ray_commands"] if "mlflow server" in c]
    return cmd


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_mlflow_runs_the_basic_auth_app(path):
    cfg = yaml.safe_load(path.read_text())
    cmd = mlflow_command(path)
    assert "mlflow server --app-name basic-auth" in cmd
    assert "MLFLOW_AUTH_CONFIG_PATH=~/mlflow/basic_auth.ini" in cmd
    assert 'MLFLOW_AUTH_ADMIN_PASSWORD="${MLFLOW_TRACKING_PASSWORD}"' in cmd
    assert 'MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat ~/mlflow/flask_secret)"' in cmd  # CSRF secret, made on the head
    assert "python -m orchestrator.mlflow_auth ~/mlflow/basic_auth.ini" in cmd
    # credentials from the environment of every node, never written into the cluster file
    assert cfg["file_mounts"]["~/.e2kd-mlflow.env"] == "~/.e2kd-mlflow.env"
    assert any(". ~/.e2kd-mlflow.env" in c for c in cfg["setup_commands"])
    assert not re.search(r"MLFLOW_TRACKING_PASSWORD=[^\"$\s.]", path.read_text())
    assert any('.[auth]' in c for c in cfg["head_setup_commands"])  # Flask-WTF for the auth app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The admin password holds every character a URI's userinfo can carry (percent-encoded where it
# must be), drawn with a fixed seed, plus a random tail: the sweep test below puts it in a URI.
_USERINFO = string.ascii_letters + string.digits + "-._~!$&'()*+,;="
_rng = random.Random(14)
GENERATED_PASSWORD = ("Zq9" + "".join(_rng.choice(_USERINFO + "@:/#?% ") for _ in range(16))
                      + base64.b16encode(os.urandom(6)).decode())


def _get(url: str, user: str | None = None, password: str | None = None) -> int:
    req = urllib.request.Request(url)
    if user is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs Flask-WTF (pip install -e '.[dev]')")
    home = tmp_path_factory.mktemp("head-home")
    (home / "mlflow").mkdir()
    port = _free_port()
    cmd = mlflow_command(ROOT / "cluster-local.yaml")
    # the cluster's command from "python -m orchestrator.mlflow_auth" to the server's log redirect,
    # with the head's address, port and home directory replaced; run in the foreground
    start = cmd.index("python -m orchestrator.mlflow_auth")
    script = cmd[start:cmd.index(">> ~/mlflow/server.log")]
    script = (script.replace("if ! mlflow_up; then", "").replace("nohup ", "exec ")
              .replace('"${MLFLOW_HOST}"', "127.0.0.1").replace("--port 5000", f"--port {port} --workers 1"))
    # --workers 1: one server process (uvicorn's supervisor kills worker processes that boot slower
    # than its health-check timeout, which happens on a loaded 2-core test machine)
    password = GENERATED_PASSWORD
    env = {**os.environ, "HOME": str(home), "MLFLOW_TRACKING_USERNAME": "e2kd-admin",
           "MLFLOW_TRACKING_PASSWORD": password, "PYTHONPATH": os.pathsep.join(
               [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(["bash", "-c", script], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=home)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the MLflow server exited ({proc.returncode}): {(home / 'server.log').read_text()[-3000:]}")
            try:
                if _get(url + "/health") == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"the MLflow server did not answer: {(home / 'server.log').read_text()[-3000:]}")
        # The auth app's first API request creates its user store (seconds on a loaded machine):
        # make it here, so the tests time what a running server answers, not its warm-up.
        req = urllib.request.Request(url + "/api/2.0/mlflow/experiments/search?max_results=1")
        req.add_header("Authorization", "Basic " + base64.b64encode(f"e2kd-admin:{password}".encode()).decode())
        urllib.request.urlopen(req, timeout=120).close()
        yield url, "e2kd-admin", password, home
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its workers
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def test_cluster_mlflow_refuses_unauthenticated_requests(auth_server):
    url, user, password, home = auth_server
    api = url + "/api/2.0/mlflow/experiments/search?max_results=1"
    assert _get(api) == 401  # anyone who reaches the port
    assert _get(api, user, "wrong-password") == 401
    assert _get(url + "/ajax-api/2.0/mlflow/experiments/search?max_results=1") == 401
    assert _get(api, user, password) == 200
    ini = (home / "mlflow" / "basic_auth.ini").read_text()
    assert "admin_username = e2kd-admin" in ini and password not in ini  # the password only in the environment
    assert oct((home / "mlflow" / "basic_auth.ini").stat().st_mode & 0o777) == "0o600"


def test_e2kd_uses_credentials_from_the_environment(auth_server, monkeypatch):
    from mlflow import MlflowClient

    from orchestrator import tracking

    url, user, password, _ = auth_server
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    with pytest.raises(ConnectionError, match="refused the credentials .*MLFLOW_TRACKING_USERNAME"):
        tracking.check_reachable(url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    tracking.check_reachable(url)
    client = MlflowClient(url)
    exp = tracking.ensure_experiment(client, "auth-check", None)
    assert client.get_experiment(exp).name == "auth-check"


def test_sweep_with_credentials_in_the_uri_leaves_the_password_nowhere(auth_server, teacher_dir, tmp_path):
    """A real sweep (one trial, one epoch) against the authenticated server, the credentials only in
    ``--tracking-uri http://user:PW@host``: the password is in none of stdout/stderr, the MLflow
    params, tags and text artifacts, the run's storage (Tune's experiment state) and every log
    file of the Ray session (RAY_TMPDIR: GCS, raylet, dashboard, agents, workers)."""
    import shutil
    import tempfile
    from urllib.parse import quote

    from mlflow import MlflowClient

    from test_faults import E2KD, tiny_spec

    url, user, password, _ = auth_server
    uri = url.replace("://", f"://{user}:{quote(password, safe=_USERINFO)}@", 1)
    work = tempfile.mkdtemp(prefix="e2kdpw-")  # short: Ray's socket paths live under RAY_TMPDIR
    try:
        d = tiny_spec(work, teacher_dir, "pw-sweep", epochs=1, num_trials=1)
        d["mlflow"]["experiment"] = "pw-sweep"
        spec = os.path.join(work, "spec.yaml")
        with open(spec, "w") as f:
            yaml.safe_dump(d, f)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        env.update(RAY_TMPDIR=work, PYTHONUNBUFFERED="1")
        r = subprocess.run([E2KD, "sweep", spec, "--tracking-uri", uri], cwd=work, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        forms = {password, quote(password, safe=_USERINFO), quote(password, safe="")}
        texts = {"stdout": r.stdout, "stderr": r.stderr}
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = user, password
        try:
            client = MlflowClient(url)
            exp = client.get_experiment_by_name("pw-sweep")
            runs = client.search_runs([exp.experiment_id])
            assert {r.data.tags.get("e2kd.role") for r in runs} == {"parent", "trial"}, runs
            for run in runs:
                texts[f"run {run.info.run_id}"] = repr((run.data.params, run.data.tags))
                for a in client.list_artifacts(run.info.run_id, "spec"):
                    texts[a.path] = open(client.download_artifacts(run.info.run_id, a.path, str(tmp_path))).read()
        finally:
            os.environ.pop("MLFLOW_TRACKING_USERNAME"), os.environ.pop("MLFLOW_TRACKING_PASSWORD")
        files = 0
        for dp, _, fns in os.walk(work):  # Ray's session logs and the run's storage
            for fn in fns:
                p = os.path.join(dp, fn)
                if os.path.isfile(p) and not os.path.islink(p):
                    files += 1
                    with open(p, "rb") as f:
                        texts[p] = f.read().decode("utf-8", "replace")
        assert files > 20 and any("/logs/" in p and "raylet" in p for p in texts), sorted(texts)[:50]
        leaks = [(where, s) for where, text in texts.items() for s in forms if s in text]
        assert leaks == [], "password found in: " + "; ".join(
            f"{w}: ...{texts[w][max(0, texts[w].index(f) - 150):texts[w].index(f)]!r}" for w, f in leaks)
    finally:
        shutil.rmtree(work, ignore_errors=True)
