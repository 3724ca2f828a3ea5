"""MLflow as a model-training user meets it: the logged student (no pickle), the Model Registry,
datasets and sources on the runs, the link to the runs view, images with their epoch, and a
readable λ axis. No Ray, no training: stores are filled with the product's own functions."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from mlflow import MlflowClient

from orchestrator import cli, registry, report, tracking
from trainables.checkpoint import load_checkpoint, save_checkpoint
from trainables.data import DataConfig
from trainables.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _checkpoint(path, arch: str, seed: int) -> str:
    torch.manual_seed(seed)
    model = build_model(arch, 10)
    save_checkpoint(str(path), {"model": model.state_dict()}, {"student": arch, "num_classes": 10, "epoch": 3})
    return str(path)


def _store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    return uri, client, tracking.ensure_experiment(client, "exp", tracking.default_artifact_location(uri))


# The fresh process refuses every unpickling entry point before it loads the models.
LOADER = r"""
import json, pickle, sys
import numpy as np
import mlflow, torch

def refuse(*a, **k):
    raise AssertionError("the student was unpickled")

class NoUnpickler(pickle.Unpickler):
    def load(self):
        refuse()

pickle.load = pickle.loads = refuse
pickle.Unpickler = NoUnpickler
torch.load = refuse
try:
    import cloudpickle
    cloudpickle.load = cloudpickle.loads = refuse
except ImportError:
    pass
from orchestrator.registry import load_student

out = {}
for uri, shape in json.loads(sys.argv[1]):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    pyfunc = mlflow.pyfunc.load_model(uri)
    module = load_student(uri)
    with torch.no_grad():
        out[uri] = {"module": module.eval()(x).tolist(), "pyfunc": pyfunc.predict(x.numpy()).tolist(),
                    "type": type(module).__name__}
print("RESULT" + json.dumps(out))
"""


def test_logged_student_loads_without_pickle_in_a_fresh_process(tmp_path):
    import mlflow

    uri, client, exp = _store(tmp_path)
    cases = []
    for arch, shape in (("tiny_cnn", (4, 3, 32, 32)), ("small_bcos_cnn", (4, 6, 32, 32))):
        ck = _checkpoint(tmp_path / f"ck-{arch}", arch, seed=len(cases))
        run = client.create_run(exp).info.run_id
        import ray.train

        tracking.log_student(uri, run, ray.train.Checkpoint(ck))
        cases.append((arch, shape, ck, f"runs:/{run}/{registry.MODEL_NAME}"))

        # The artifact: safetensors weights, a JSON config, code; nothing pickled anywhere.
        local = mlflow.artifacts.download_artifacts(cases[-1][3], tracking_uri=uri, dst_path=str(tmp_path / arch))
        files = {os.path.relpath(os.path.join(d, f), local) for d, _, fs in os.walk(local) for f in fs}
        assert {"MLmodel", "student_model.py", "artifacts/weights.safetensors", "artifacts/student.json",
                "code/trainables/models.py"} <= files, files
        for f in files:
            with open(os.path.join(local, f), "rb") as fh:
                head = fh.read(4)
            assert not head.startswith(PICKLE_MAGIC), f"{f} is a pickle"
            if zipfile.is_zipfile(os.path.join(local, f)):  # torch.save archives hold data.pkl
                pytest.fail(f"{f} is a zip archive: {zipfile.ZipFile(os.path.join(local, f)).namelist()[:5]}")
            assert not f.endswith((".pkl", ".pt", ".pth")), f
        with open(os.path.join(local, "MLmodel")) as fh:
            mlmodel = fh.read()
        # models from code: loaded by running student_model.py; no pickled python_model, no pytorch flavor
        assert "loader_module: mlflow.pyfunc.loaders.code_model" in mlmodel, mlmodel
        assert "  pytorch:" not in mlmodel and "python_model:" not in mlmodel and ".pkl" not in mlmodel, mlmodel
        assert "signature:" in mlmodel and json.load(open(os.path.join(local, "artifacts/student.json")))["arch"] == arch
        assert "e2kd.model_log_error" not in client.get_run(run).data.tags

    env = {**os.environ, "PYTHONPATH": ROOT, "MLFLOW_TRACKING_URI": uri}
    env.pop("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", None)
    r = subprocess.run([sys.executable, "-c", LOADER, json.dumps([(u, s) for _, s, _, u in cases])],
                       capture_output=True, text=True, timeout=300, cwd=str(tmp_path), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT", 1)[1])
    for arch, shape, ck, model_uri in cases:
        # The oracle: the checkpoint's own weights in a model built here.
        ref = build_model(arch, 10)
        ref.load_state_dict(load_checkpoint(ck)["model"])
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = ref.eval()(x)
        got = out[model_uri]
        assert got["type"] == type(ref).__name__
        torch.testing.assert_close(torch.tensor(got["module"]), want)
        torch.testing.assert_close(torch.tensor(got["pyfunc"]), want)


def _sweep(uri, client, exp, tmp_path):
    """A parent and three finished children (KD and two e²KD) on digits, as a sweep leaves them."""
    import ray.train

    parent = tracking.create_parent(client, exp, "s1", os.path.join(ROOT, "sweeps", "quickstart.yaml"), {},
                                    tags={"e2kd.metric": "val_agreement", "e2kd.mode": "max"})
    data = DataConfig(name="digits", shots=3, seed=7)
    runs = {}
    for i, (lam, val) in enumerate(((0.0, 0.80), (0.5, 0.90), (3.0, 0.85))):
        run = tracking.get_or_create_child(
            uri, exp, parent, "s1", f"t{i}", data=data,
            params={"loss.lam": lam, "loss.temperature": 1.0, "student": "tiny_cnn", "loss.explainer": "gradcam"},
            tags={"method": "kd" if lam == 0 else "e2kd", "teacher": "small_cnn"})
        client.log_metric(run, "val_agreement", val)
        client.log_metric(run, "test_acc", val - 0.05)
        tracking.log_student(uri, run, ray.train.Checkpoint(_checkpoint(tmp_path / f"ck{i}", "tiny_cnn", seed=i)))
        client.set_terminated(run, "FINISHED")
        runs[lam] = run
    client.set_terminated(parent, "FINISHED")
    return parent, runs, data


def test_register_datasets_sources_and_links(tmp_path, capsys):
    from trainables.data import dataset_info

    uri, client, exp = _store(tmp_path)
    parent, runs, data = _sweep(uri, client, exp, tmp_path)

    # The experiment opens as model development; every run names its source.
    assert client.get_experiment(exp).tags[registry.EXPERIMENT_KIND_TAG] == "custom_model_development"
    for run_id in (parent, *runs.values()):
        tags = client.get_run(run_id).data.tags
        assert tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.source.name"].endswith(os.path.join("sweeps", "quickstart.yaml"))

    # Each child's training dataset: name, the split's fingerprint as digest, the source file.
    fp = dataset_info(data).fingerprint
    for run_id in runs.values():
        inputs = client.get_run(run_id).inputs.dataset_inputs
        assert len(inputs) == 1, inputs
        ds = inputs[0].dataset
        assert (ds.name, ds.digest) == ("digits-train-3shot-seed7", fp[:16])
        assert json.loads(ds.source)["uri"].endswith("digits.csv.gz")
        assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"

    # `e2kd report --register NAME`: the best e²KD run (λ = 0.5) becomes version 1, with its tags.
    assert cli.main(["report", "exp", "--tracking-uri", uri, "--out", str(tmp_path / "rep"),
                     "--register", "digits-student"]) == 0
    out = capsys.readouterr().out
    link = f"http://127.0.0.1:5000/#/experiments/{exp}/runs?workflowType=machine_learning"
    assert f"[e2kd] MLflow runs: {link}" in out
    assert "registered digits-student version 1" in out and "#/models/digits-student/versions/1" in out
    versions = client.search_model_versions("name = 'digits-student'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", runs[0.5])]
    tags = versions[0].tags
    assert (tags["teacher"], tags["student"], tags["loss.lam"], tags["loss.temperature"]) == \
        ("small_cnn", "tiny_cnn", "0.5", "1.0")
    assert float(tags["val_agreement"]) == pytest.approx(0.90) and float(tags["test_acc"]) == pytest.approx(0.85)
    assert tags["selected_by"] == "val_agreement (max)"
    # The registered version is the best run's checkpoint (λ = 0.5 was the second trial, ck1).
    got, want = registry.load_student("models:/digits-student/1").state_dict(), load_checkpoint(str(tmp_path / "ck1"))["model"]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # A second registration adds version 2; a bad name is one line naming the option.
    assert cli.main(["report", "exp", "--tracking-uri", uri, "--out", str(tmp_path / "rep"),
                     "--register", "digits-student"]) == 0
    assert sorted(str(v.version) for v in client.search_model_versions("name = 'digits-student'")) == ["1", "2"]
    capsys.readouterr()
    assert cli.main(["report", "exp", "--tracking-uri", uri, "--out", str(tmp_path / "rep"),
                     "--register", "a/b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("e2kd: error: --register 'a/b'"), err

    # A server's link is the server's own address, credentials stripped.
    assert registry.runs_link(registry.ui_base("http://u:p@mlflow.example:5000/"), "7") == \
        "http://mlflow.example:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert registry.experiment_links(client, "http://127.0.0.1:5000") == [f"[e2kd] exp: {link}"]


def test_explanation_grid_is_an_image_per_epoch_sent_once(tmp_path):
    from PIL import Image

    uri, client, exp = _store(tmp_path)
    run = client.create_run(exp).info.run_id
    box = tracking.Outbox(str(tmp_path / "outbox"))
    for epoch, color in ((1, "red"), (2, "blue")):
        png = tmp_path / f"{epoch}.png"
        Image.new("RGB", (40, 20), color).save(png)
        box.put(run, [("val_agreement", 0.5, 0, epoch)], {tracking.PNG_NAME: png.read_bytes()}, step=epoch)
    assert box.drain(client) == 2
    # The same record sent again (a crash between send and delete) adds no image.
    box.put(run, [], {tracking.PNG_NAME: (tmp_path / "2.png").read_bytes()}, step=2)
    assert box.drain(client) == 1
    images = sorted(a.path for a in client.list_artifacts(run, "images") if a.path.endswith(".png"))
    steps = [int(p.split("+step+")[1].split("+")[0]) for p in images]
    assert steps == [1, 2], images
    assert all(os.path.basename(p).startswith(f"{tracking.IMAGE_KEY}+step+") for p in images)
    assert client.get_run(run).data.tags.get("mlflow.loggedImages") == "True"
    # the plain artifact stays the latest grid
    local = client.download_artifacts(run, tracking.PNG_NAME, str(tmp_path / "dl"))
    assert Image.open(local).getpixel((0, 0)) == (0, 0, 255)


@pytest.mark.parametrize("lams", [[1.25, 1.9, 2.8, 4.0, 6.5, 9.0], [0.1, 0.37, 2.9, 9.5], [0.5, 0.6], [0.01, 100.0]])
def test_lambda_axis_has_few_plain_labels_that_do_not_overlap(lams):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))  # the report's layout
    ax = axes[0]
    ax.scatter(lams, range(len(lams)))
    report.log_axis_ticks(ax, lams)
    fig.tight_layout()
    fig.canvas.draw()
    lo, hi = ax.get_xlim()
    assert lo <= min(lams) and max(lams) <= hi
    shown = [(t.label1.get_window_extent(), t.label1.get_text()) for t in
             ax.xaxis.get_major_ticks() + ax.xaxis.get_minor_ticks()
             if t.label1.get_visible() and t.label1.get_text() and lo <= t.get_loc() <= hi]
    shown.sort(key=lambda b: b[0].x0)
    texts = [s for _, s in shown]
    assert 2 <= len(texts) <= 7, texts
    assert all(float(s) > 0 for s in texts), texts  # plain numbers, not 2×10^0 mathtext
    assert all(a.x1 < b.x0 for (a, _), (b, _) in zip(shown, shown[1:])), texts
    plt.close(fig)
