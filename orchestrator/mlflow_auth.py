"""The cluster's MLflow server runs MLflow's basic-auth app: every request but ``/health`` needs a
user and password; nobody who merely reaches the port can read or write runs.

    python -m orchestrator.mlflow_auth CONFIG.ini sqlite:////home/ray/mlflow/basic_auth.db

writes the auth app's configuration (``MLFLOW_AUTH_CONFIG_PATH``). The admin user is
``MLFLOW_TRACKING_USERNAME`` and its password, set on the server's first start,
``MLFLOW_TRACKING_PASSWORD`` — both from the environment (on the cluster: ``~/.e2kd-mlflow.env``,
chmod 600, copied to every node by the cluster file and exported by ``~/.bashrc``), never from a
spec or a command line. The e2kd processes on every node read the same two variables, which
MLflow's client sends as HTTP basic auth. ``default_permission = NO_PERMISSIONS``: users added
later see only what they are granted.
"""
from __future__ import annotations

import os
import sys

CONFIG = """[mlflow]
default_permission = NO_PERMISSIONS
database_uri = {database_uri}
admin_username = {admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
grant_default_workspace_access = false
"""


def write_config(path: str, database_uri: str) -> str:
    admin = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    if not admin or not os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        raise SystemExit("e2kd: error: MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD must be set "
                         "(the MLflow server's admin user; ~/.e2kd-mlflow.env on the cluster)")
    if any(c in admin for c in "\n\r[]=:"):
        raise SystemExit("e2kd: error: MLFLOW_TRACKING_USERNAME holds characters an .ini file cannot")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(CONFIG.format(database_uri=database_uri, admin=admin))
    # The auth app's CSRF protection needs a static Flask secret (MLFLOW_FLASK_SERVER_SECRET_KEY):
    # made once, kept beside the configuration, read by the server's start command.
    secret = os.path.join(os.path.dirname(os.path.abspath(path)), "flask_secret")
    if not os.path.isfile(secret) or not os.path.getsize(secret):
        import secrets

        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m orchestrator.mlflow_auth CONFIG.ini DATABASE_URI")
    write_config(sys.argv[1], sys.argv[2])
