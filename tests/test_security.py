"""Security defaults.

* ``e2kd ui`` binds 127.0.0.1 unless told otherwise (the command it builds is checked; no server).
* A local Ray instance (``init_ray``) binds its dashboard to 127.0.0.1 (the call it makes here; the
  real listening socket is checked in ``tests/test_faults.py::TestOnOneLocalRayInstance::
  test_local_dashboard_listens_on_loopback_only``).
* Checkpoints and teachers load with ``weights_only=True``: a pickle whose ``__reduce__`` runs code
  is refused, and the code never runs (even when the checksum matches).
* Specs and ``--set`` values load with ``yaml.safe_load``: ``!!python/...`` tags are refused, and
  never run.
* No credentials in messages, logs or MLflow: ``scheme://user:password@`` is shown as
  ``user:***@`` by ``tracking.mask_uri`` in the CLI's output, errors, the sweep's log line, MLflow
  params and the spec copy logged to the parent run; a static check keeps every f-string in
  ``orchestrator/`` that interpolates a URI or address behind ``mask_uri``.
* cluster.yaml opens no port to the world but SSH, keeps the dashboard and MLflow off public
  interfaces and turns token auth on: covered by ``tests/test_cluster_config.py``
  (``test_no_ingress_open_to_world_except_ssh``, ``test_world_open_checker_catches_planted_rules``,
  ``test_dashboard_not_on_all_interfaces``, ``test_mlflow_on_private_address``,
  ``test_token_auth_everywhere``), not repeated here.
"""
from __future__ import annotations

import ast
import glob
import json
import os
import types

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "sweeps", "quickstart.yaml")
SECRET = "s3cret-Pa55"


class Payload:
    """Unpickling this calls ``os.mkdir(marker)``: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


# ------------------------------------ network bindings ---------------------------------------


def test_mlflow_ui_binds_loopback_by_default(monkeypatch, capsys, tmp_path):
    from orchestrator import cli, tracking

    commands = []
    monkeypatch.chdir(tmp_path)
    open("mlflow.db", "w").close()  # `ui` opens an existing store only
    monkeypatch.setattr(tracking, "check_reachable", lambda uri: None)  # no server at 5001
    monkeypatch.setattr(cli, "check_port_free", lambda host, port: None)  # 5000 may be taken on this machine

    class FakePopen:  # no server: only the command line it would run
        def __init__(self, cmd, *a, **k):
            commands.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setattr(cli, "subprocess", types.SimpleNamespace(Popen=FakePopen))  # this module's only
    assert cli.main(["ui"]) == 0
    assert cli.main(["ui", "--tracking-uri", f"http://alice:{SECRET}@127.0.0.1:5001"]) == 0
    for cmd in commands:
        assert cmd[cmd.index("--host") + 1] == "127.0.0.1", cmd
        assert "0.0.0.0" not in cmd
        assert SECRET not in " ".join(cmd)  # not on a command line (`ps` shows those to every user)
    out = capsys.readouterr().out
    # the credentials went to the environment of the command (adopt_credentials), not into the URI
    assert "http://127.0.0.1:5000" in out and SECRET not in out and "store http://127.0.0.1:5001)" in out


def test_local_ray_dashboard_binds_loopback(monkeypatch):
    import orchestrator.sweep as sweep

    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(sweep.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(sweep.ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(sweep.ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert sweep.init_ray(None, 2, log=lambda s: None)
    (kw,) = calls
    assert kw["address"] == "local" and kw["dashboard_host"] == "127.0.0.1", kw


# ------------------------------------ pickles ------------------------------------------------


def test_checkpoint_with_code_in_its_pickle_is_refused(tmp_path):
    import pickle

    from trainables.checkpoint import load_checkpoint, save_checkpoint

    marker = str(tmp_path / "pwned-by-checkpoint")
    d = str(tmp_path / "checkpoint_000000")
    # save_checkpoint records the payload's own sha256: the checksum passes, only weights_only stops it.
    save_checkpoint(d, {"model": {"w": torch.zeros(2)}, "epoch": 1, "hook": Payload(marker)}, meta={"epoch": 1})
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(d)
    assert not os.path.exists(marker)


def test_teacher_with_code_in_its_pickle_is_refused(tmp_path):
    from trainables.data import DataConfig
    from trainables.models import build_model, file_sha256
    from trainables.teacher import load_teacher, save_teacher

    marker = str(tmp_path / "pwned-by-teacher")
    tdir = str(tmp_path / "teacher")
    save_teacher(build_model("small_cnn", 10), "small_cnn", DataConfig(name="digits"), tdir, test_accuracy=0.1)
    weights = os.path.join(tdir, "teacher.pt")
    sd = torch.load(weights, weights_only=True)
    torch.save({**sd, "hook": Payload(marker)}, weights)
    card_path = os.path.join(tdir, "teacher.json")
    card = json.load(open(card_path))
    card["sha256"] = file_sha256(weights)  # a consistent card: the checksum does not stop it
    json.dump(card, open(card_path, "w"))
    with pytest.raises(ValueError, match="cannot read weights file .*teacher.pt"):
        load_teacher(tdir)
    assert not os.path.exists(marker)


# ------------------------------------ YAML ---------------------------------------------------


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.mkdir", "!!python/object/new:os.mkdir"])
def test_yaml_python_tags_are_refused(tmp_path, tag):
    from orchestrator.spec import SpecError, load_spec

    marker = str(tmp_path / "pwned-by-yaml")
    spec = tmp_path / "spec.yaml"
    spec.write_text(open(QUICKSTART).read().replace("name: quickstart", f"name: {tag} ['{marker}']"))
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(str(spec))
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(QUICKSTART, [f"name={tag} ['{marker}']"])
    assert not os.path.exists(marker)


# ------------------------------------ credentials --------------------------------------------


def test_mask_uri():
    from orchestrator.tracking import mask_uri

    assert mask_uri(f"http://alice:{SECRET}@mlflow:5000/x") == "http://alice:***@mlflow:5000/x"
    assert mask_uri(f"https://{SECRET}@h") == "https://***@h"
    assert mask_uri(f"see postgresql://u:{SECRET}@db/m and s3://k:{SECRET}@b/p") == (
        "see postgresql://u:***@db/m and s3://k:***@b/p")
    assert mask_uri(f"http://u:p@{SECRET}@h/x") == "http://u:***@h/x"  # '@' inside the password
    for clean in ("sqlite:////tmp/mlflow.db", "http://127.0.0.1:5000", "runs/a@b"):
        assert mask_uri(clean) == clean


def test_unreachable_server_message_hides_the_password(tmp_path, capsys, monkeypatch):
    import ray

    import orchestrator.sweep
    from orchestrator import tracking
    from orchestrator.cli import main

    uri = f"http://alice:{SECRET}@127.0.0.1:9"
    with pytest.raises(ConnectionError) as e:
        tracking.check_reachable(uri)
    assert SECRET not in str(e.value) and "alice:***@127.0.0.1:9" in str(e.value)

    monkeypatch.setattr(orchestrator.sweep, "init_ray", lambda *a, **k: pytest.fail("Ray would start"))
    spec = tmp_path / "spec.yaml"
    d = yaml.safe_load(open(QUICKSTART))
    d["teacher"]["path"] = str(tmp_path / "no-teacher")
    d["mlflow"]["tracking_uri"] = uri
    spec.write_text(yaml.safe_dump(d))
    for argv in (["sweep", str(spec)], ["sweep", QUICKSTART, "--tracking-uri", uri]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        # the CLI moved the credentials to the environment first (tracking.adopt_credentials)
        assert "unreachable" in err and SECRET not in err and "http://127.0.0.1:9 is unreachable" in err, err
        assert "MLFLOW_TRACKING_PASSWORD" not in os.environ  # ... for the command's duration only
    assert not ray.is_initialized() and not os.path.exists(tmp_path / "no-teacher")


def test_no_credentials_reach_mlflow(tmp_path):
    from mlflow import MlflowClient

    from orchestrator import tracking

    spec = tmp_path / "spec.yaml"
    d = yaml.safe_load(open(QUICKSTART))
    d["mlflow"]["tracking_uri"] = f"http://alice:{SECRET}@mlflow.internal:5000"
    d["storage"] = f"s3://AKIAEXAMPLE:{SECRET}@bucket/runs"
    spec.write_text(yaml.safe_dump(d))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = tracking.ensure_experiment(client, "sec", tracking.default_artifact_location(uri))
    run = tracking.create_parent(client, exp, "sec", str(spec), {"storage": d["storage"], "loss.lam": 1.0})
    params = client.get_run(run).data.params
    assert params["storage"] == "s3://AKIAEXAMPLE:***@bucket/runs" and params["loss.lam"] == "1.0"
    logged = client.download_artifacts(run, "spec", str(tmp_path / "dl"))
    text = "".join(open(p).read() for p in glob.glob(os.path.join(logged, "*")))
    assert "mlflow.internal" in text and "alice:***@" in text  # the spec is there, its secrets are not
    assert SECRET not in text and SECRET not in json.dumps(params)
    # The spec on disk is left as the user wrote it.
    assert SECRET in spec.read_text()


def test_every_printed_uri_is_masked():
    """Static guard: an f-string in orchestrator/ that interpolates a URI, URL or address (the
    sweep's log line, error messages, the UI banner) must go through mask_uri."""
    offenders = []
    for path in sorted(glob.glob(os.path.join(ROOT, "orchestrator", "*.py"))):
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if not isinstance(node, ast.JoinedStr):
                continue
            for v in node.values:
                if isinstance(v, ast.FormattedValue):
                    e = v.value
                    name = e.id if isinstance(e, ast.Name) else e.attr if isinstance(e, ast.Attribute) else ""
                    if "uri" in name.lower() or "url" in name.lower() or name == "address":
                        offenders.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: {ast.unparse(node)[:100]}")
    assert offenders == [], "wrap these in tracking.mask_uri(...):\n" + "\n".join(offenders)
