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
import re
import signal
import socket
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
    password = "adm1n-" + base64.b16encode(os.urandom(8)).decode()
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
