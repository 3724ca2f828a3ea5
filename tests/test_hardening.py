"""Hardening, round 2 (issue 14): the CLI's one error path, credentials in URIs, concurrent writers.

* An exception nobody anticipated ends like any other error: one masked line of bounded length,
  exit code 1, the traceback only with ``--debug`` (masked too).
* Hypothesis feeds URIs with generated credentials through every command path that prints or
  logs a URI (the tracking-server check of ``sweep``/``report``/``ui``, ``--address``, the
  catch-all, the MLflow params and tags of a parent and a child run, the spec copy logged to
  MLflow, the retry log line) and finds the secret nowhere, raw or percent-decoded. Ray's own
  logs are not fed here: e2kd gives Ray no URI but ``--address`` (refused with credentials) and
  the storage path, which ``tests/test_security.py`` checks in the MLflow params.
* Two writers of one teacher or cache path: the second is refused at once, nothing mixed.
"""
from __future__ import annotations

import os
import string
from urllib.parse import quote, unquote

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "sweeps", "quickstart.yaml")


# ------------------------------------ the catch-all ------------------------------------------


def _boom(secret: str):
    def fn(args):
        raise ZeroDivisionError(f"while talking to http://alice:{secret}@mlflow.internal:5000/api " + "x" * 10**6)
    return fn


def test_unanticipated_error_is_one_masked_bounded_line(monkeypatch, capsys):
    from orchestrator import cli

    secret = "Unseen-Pw-123"
    monkeypatch.setattr(cli, "cmd_report", _boom(secret))
    assert cli.main(["report", "exp"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("e2kd: error: ZeroDivisionError: "), err[:300]
    assert secret not in err and "alice:***@mlflow.internal" in err and "--debug" in err
    assert len(err) <= cli.MAX_MESSAGE + 20
    # --debug: the traceback first (masked), then the same line
    for argv in (["--debug", "report", "exp"], ["report", "exp", "--debug"]):
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "test_hardening.py" in err, err[:500]
        assert secret not in err and err.rstrip().splitlines()[-1].startswith("e2kd: error: ZeroDivisionError")


def test_user_errors_of_any_kind_exit_2_in_one_line(monkeypatch, capsys):
    from orchestrator import cli

    for exc in (PermissionError(13, "Permission denied", "/data/x"), KeyError("teacher.arch"),
                IsADirectoryError(21, "Is a directory", "/tmp"), TimeoutError("no answer within 5 s")):
        def fn(args, exc=exc):
            raise exc
        monkeypatch.setattr(cli, "cmd_report", fn)
        assert cli.main(["report", "exp"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("e2kd: error: "), err


# ------------------------------------ credentials, generated ---------------------------------

# RFC 3986 userinfo characters (unreserved + sub-delims), percent-encoded where needed; the secret
# starts with a fixed tag so that it cannot be a substring of anything e2kd prints by chance.
_userinfo_chars = string.ascii_letters + string.digits + "-._~!$&'()*+,;="
_secrets = st.text(alphabet=_userinfo_chars + "@:/#?% ", min_size=4, max_size=24).map(lambda s: "Zq9" + s)
_users = st.text(alphabet=string.ascii_letters + string.digits + "-._", min_size=1, max_size=10)
_schemes = st.sampled_from(["http", "https"])
_hosts = st.sampled_from(["127.0.0.1:9", "127.0.0.1:1", "localhost:9"])


def _uri(scheme: str, user: str, secret: str, host: str) -> str:
    return f"{scheme}://{user}:{quote(secret, safe=_userinfo_chars)}@{host}"


def _clean(text: str, secret: str, uri: str) -> None:
    raw = uri.split("://", 1)[1].rsplit("@", 1)[0].split(":", 1)[1]  # the password as written in the URI
    for s in {secret, raw, unquote(raw)}:
        assert s not in text, f"secret {s!r} printed: {text[:500]!r}"


URI_FUZZ = settings(max_examples=int(os.environ.get("E2KD_URI_EXAMPLES", "25")), deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    from mlflow import MlflowClient

    d = tmp_path_factory.mktemp("uri-store")
    uri = f"sqlite:///{d}/mlflow.db"
    MlflowClient(uri).create_experiment("uri", artifact_location=f"file://{d}/art")
    return uri


@URI_FUZZ
@given(scheme=_schemes, user=_users, secret=_secrets, host=_hosts)
def test_generated_credentials_never_printed_by_the_cli(capsys, monkeypatch, tmp_path_factory, scheme, user, secret,
                                                        host):
    import orchestrator.sweep
    from orchestrator import cli

    monkeypatch.setattr(orchestrator.sweep, "init_ray", lambda *a, **k: pytest.fail("Ray would start"))
    uri = _uri(scheme, user, secret, host)
    work = tmp_path_factory.mktemp("uri")
    d = yaml.safe_load(open(QUICKSTART))
    d["teacher"]["path"] = str(work / "teacher")
    d["storage"] = str(work / "runs")
    d["mlflow"]["tracking_uri"] = uri
    spec = work / "spec.yaml"
    spec.write_text(yaml.safe_dump(d))
    runs = [
        ["sweep", str(spec)],  # the spec's tracking URI
        ["sweep", QUICKSTART, "--tracking-uri", uri, "--set", f"teacher.path={work}/teacher",
         "--set", f"storage={work}/runs"],
        ["train", str(spec)],
        ["compare", str(spec)],
        ["report", "uri", "--tracking-uri", uri],
        ["ui", "--tracking-uri", uri],
        ["sweep", str(spec), "--address", uri.replace(scheme, "ray", 1)],
        ["capacity", "--address", uri.replace(scheme, "ray", 1)],
        ["sweep", str(spec), "--set", f"storage={uri.replace(scheme, 'ftp', 1)}/runs"],
        ["sweep", str(spec), "--set", f"data.root={uri.replace(scheme, 's3', 1)}"],
        ["sweep", str(spec), "--set", f"student_weights={uri.replace(scheme, 's3', 1)}/w.pt"],
    ]
    for argv in runs:
        rc = cli.main(argv)
        out, err = capsys.readouterr()
        assert rc == 2, (argv, err)
        _clean(out + err, secret, uri)
    # the catch-all, with and without --debug
    monkeypatch.setattr(cli, "cmd_report", lambda a: (_ for _ in ()).throw(RuntimeError(f"failed: {uri}/api")))
    for argv in (["report", "x"], ["--debug", "report", "x"]):
        cli.main(argv)
        out, err = capsys.readouterr()
        _clean(out + err, secret, uri)


@URI_FUZZ
@given(scheme=_schemes, user=_users, secret=_secrets, host=_hosts)
def test_generated_credentials_never_reach_mlflow(store, tmp_path_factory, capsys, scheme, user, secret, host):
    from mlflow import MlflowClient

    from orchestrator import tracking

    uri = _uri(scheme, user, secret, host)
    work = tmp_path_factory.mktemp("uri-mlflow")
    spec = work / "spec.yaml"
    d = yaml.safe_load(open(QUICKSTART))
    d["mlflow"]["tracking_uri"] = uri
    d["storage"] = uri.replace(scheme, "s3", 1) + "/runs"
    spec.write_text(yaml.safe_dump(d))
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("uri").experiment_id
    parent = tracking.create_parent(client, exp, "uri", str(spec), {"storage": d["storage"], "mlflow.tracking_uri": uri},
                                    tags={"e2kd.tracking": tracking.mask_uri(uri)})
    child = tracking.get_or_create_child(store, exp, parent, "uri", "t1", {"data.root": uri}, {"e2kd.origin": "x"})
    logged = []
    for run_id in (parent, child):
        r = client.get_run(run_id)
        logged += [*r.data.params.values(), *r.data.tags.values()]
    art = client.download_artifacts(parent, "spec", str(work / "dl"))
    logged += [open(os.path.join(art, f)).read() for f in os.listdir(art)]
    # the retry log line of an outage
    lines = []
    with pytest.raises(ConnectionError):
        tracking.retry(lambda: (_ for _ in ()).throw(ConnectionError(f"refused: {uri}")), "x", 0.0, log=lines.append)
    _clean("\n".join(map(str, logged + lines)) + "".join(capsys.readouterr()), secret, uri)


def test_check_reachable_sends_credentials_not_as_host(monkeypatch):
    """``user:pw@`` is authentication, not part of the host: the check reaches a live server and
    sends HTTP basic auth."""
    import http.server
    import threading

    from orchestrator import tracking

    seen = []

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        tracking.check_reachable(f"http://alice:p%40ss@127.0.0.1:{srv.server_port}")
    finally:
        srv.shutdown()
    import base64

    assert seen and all(a == "Basic " + base64.b64encode(b"alice:p@ss").decode() for _, a in seen), seen


# ------------------------------------ one writer per path ------------------------------------


def test_second_writer_of_a_teacher_is_refused(tmp_path, capsys):
    from orchestrator import cli
    from orchestrator.locks import BusyError, lock_path, writer_lock

    target = str(tmp_path / "teacher")
    with writer_lock("teacher.path", target):
        assert os.path.exists(lock_path(target))
        with pytest.raises(BusyError, match=f"teacher.path: {target} is being written by another e2kd process "
                                            f"\\(pid {os.getpid()}\\)"):
            with writer_lock("teacher.path", target):
                pass
        # through the CLI: `e2kd teacher` while another process holds the teacher
        rc = cli.main(["teacher", QUICKSTART, "--set", f"teacher.path={target}", "--set", "teacher_training.epochs=1"])
        err = capsys.readouterr().err
        assert rc == 2 and "is being written by another e2kd process" in err and err.count("\n") == 1, err
        assert not os.path.exists(target)  # nothing written
    assert not os.path.exists(lock_path(target))  # released and removed
    with writer_lock("teacher.cache_dir", "s3://bucket/cache"):  # a store URI is not locked
        pass
