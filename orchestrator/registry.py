"""MLflow the way a model-training user reads it: students as pickle-free models, the registry,
datasets and sources on each run, and the link that opens the runs view.

Why a pyfunc from code, not ``mlflow.pytorch.log_model``: its ``pickle`` format pickles the
module (MLflow 3.17 refuses to load it unless MLFLOW_ALLOW_PICKLE_DESERIALIZATION is set, and
warns on every log); its safe ``pt2`` format is a ``torch.export`` graph: forward only, without
the named layers GradCAM and B-cos explanations need, an export per trial in the sweep's event
loop, and not every architecture exports. A state dict in safetensors plus the constructor
config, run by the project's own code file (:mod:`orchestrator.student_model`), loads without
pickle and gives back the ``trainables`` module itself.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from torch import nn

    from trainables.data.config import DataConfig

MODEL_NAME = "student"  # the artifact path of the logged student in each child run
STUDENT_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "student_model.py")
# MLflow 3.17's UI opens an experiment in GenAI mode unless it is tagged as model development
# (the values of the UI's experiment-kind picker: genai_development, custom_model_development).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
DEFAULT_UI = "http://127.0.0.1:5000"  # what `e2kd ui` serves by default


# ------------------------------------ the first look ------------------------------------------


def mark_model_development(client: MlflowClient, exp_id: str) -> None:
    client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def ui_base(tracking_uri: str, default: str = DEFAULT_UI) -> str:
    """Where the UI of ``tracking_uri`` is: the server itself (credentials stripped), or
    ``e2kd ui``'s address for a SQLite store."""
    from orchestrator.tracking import split_credentials

    if tracking_uri.startswith(("http://", "https://")):
        return split_credentials(tracking_uri)[0].rstrip("/")
    return default.rstrip("/")


def runs_link(base: str, exp_id: str) -> str:
    """The experiment's runs table in model-training mode (``workflowType`` overrides the UI's
    remembered GenAI/ML switch)."""
    return f"{base.rstrip('/')}/#/experiments/{exp_id}/runs?workflowType=machine_learning"


def link_line(tracking_uri: str, exp_id: str) -> str:
    """The line the sweep and the report print: the runs link, and how to serve a SQLite store."""
    serve = "" if tracking_uri.startswith(("http://", "https://")) else " (serve the store with `e2kd ui`)"
    return f"[e2kd] MLflow runs: {runs_link(ui_base(tracking_uri), exp_id)}{serve}"


def experiment_links(client: MlflowClient, base: str, limit: int = 5) -> list[str]:
    """``e2kd ui``: one line per experiment holding e2kd sweeps, newest first (read-only)."""
    from orchestrator.tracking import TAG_ROLE, tag_equals

    lines = []
    for exp in client.search_experiments(max_results=50, order_by=["last_update_time DESC"]):
        if client.search_runs([exp.experiment_id], tag_equals(TAG_ROLE, "parent"), max_results=1):
            lines.append(f"[e2kd] {exp.name}: {runs_link(base, exp.experiment_id)}")
        if len(lines) == limit:
            break
    return lines


def source_tags(spec_path: str | None, command: str = "sweep") -> dict[str, str]:
    """The Source column: the spec the run came from (``mlflow.source.type`` LOCAL; the UI shows
    the file's name)."""
    name = spec_path or f"e2kd {command}"
    return {"mlflow.source.name": name, "mlflow.source.type": "LOCAL"}


# ------------------------------------ datasets --------------------------------------------------


def dataset_source_uri(cfg: DataConfig) -> str:
    """Where the data comes from: ``data.root`` (a folder or ``s3://``), or the file scikit-learn
    reads the digits from."""
    if cfg.root:
        return cfg.root if "://" in cfg.root else "file://" + os.path.abspath(cfg.root)
    import sklearn.datasets

    return "file://" + os.path.join(os.path.dirname(sklearn.datasets.__file__), "data", "digits.csv.gz")


def training_dataset(cfg: DataConfig):
    """The distillation (train) split as an MLflow dataset: its name says the selection, its digest
    is the start of the split's fingerprint (the teacher card and cache use the same one)."""
    from mlflow.data.dataset_source_registry import get_registered_sources, resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from trainables.data import dataset_info

    info = dataset_info(cfg)
    name = f"{cfg.name}-train" + (f"-{cfg.shots}shot-seed{cfg.seed}" if cfg.shots else "")
    uri = dataset_source_uri(cfg)
    # MLflow registers its local-file source twice; naming the last match avoids its warning.
    fits = [src for src in get_registered_sources() if src._can_resolve(uri)]
    return MetaDataset(resolve_dataset_source(uri, candidate_sources=fits[-1:] or None), name=name,
                       digest=info.fingerprint[:16])


def log_datasets(client: MlflowClient, run_id: str, cfg: DataConfig) -> None:
    """``mlflow.log_input`` of the training split on ``run_id`` (MLflow drops a repeat)."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    ds = training_dataset(cfg)
    client.log_inputs(run_id, datasets=[DatasetInput(ds._to_mlflow_entity(),
                                                     tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])])


def try_log_datasets(client: MlflowClient, run_id: str, cfg: DataConfig, what: str) -> None:
    """:func:`log_datasets`, for the UI's Dataset column only: a data problem is printed (the trial
    reports it itself), an MLflow outage is raised (retried with the run's creation)."""
    from orchestrator.tracking import _is_mlflow_outage, short

    try:
        log_datasets(client, run_id, cfg)
    except Exception as e:
        if _is_mlflow_outage(e):
            raise
        print(f"[e2kd] could not record the dataset of {what} in MLflow: {short(e, 200)}")


# ------------------------------------ the student model ----------------------------------------


def log_student(tracking_uri: str, run_id: str, checkpoint) -> None:
    """Log the checkpoint's student as ``student`` (see the module docstring): weights as
    safetensors, its config, a signature and an input example. The checkpoint is read through
    its own filesystem (local, shared mount or S3)."""
    import mlflow
    import numpy as np
    import torch
    import torchvision
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec
    from safetensors.torch import save_file

    from trainables.checkpoint import load_checkpoint, read_meta
    from trainables.models import MODELS, build_model

    with checkpoint.as_directory() as d:
        meta = read_meta(d)
        state = load_checkpoint(d)
    model = build_model(meta["student"], meta["num_classes"])
    model.load_state_dict(state["model"])  # refuses a state dict that does not fit, before logging
    size = MODELS[meta["student"]].input_size
    channels = 6 if model.is_bcos else 3
    config = {"arch": meta["student"], "num_classes": int(meta["num_classes"]), "input_size": size,
              "channels": channels}
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, channels, size, size))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, config["num_classes"]))]))
    with tempfile.TemporaryDirectory() as tmp:
        weights, cfg_path = os.path.join(tmp, "weights.safetensors"), os.path.join(tmp, "student.json")
        # Own, contiguous copies: safetensors refuses tensors that share storage.
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}, weights)
        with open(cfg_path, "w") as f:
            json.dump(config, f)
        code = os.path.join(tmp, "code", "trainables")  # models.py alone: the architectures, nothing else
        os.makedirs(code)
        import trainables.models

        open(os.path.join(code, "__init__.py"), "w").close()
        shutil.copyfile(trainables.models.__file__, os.path.join(code, "models.py"))
        reqs = [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}",
                f"safetensors=={_version('safetensors')}", f"mlflow=={mlflow.__version__}"]
        if model.is_bcos:
            reqs.append(f"bcos=={_version('bcos')}")
        mlflow.set_tracking_uri(tracking_uri)
        with mlflow.start_run(run_id=run_id):
            # Requirements given, not inferred: inference loads the model in a subprocess (~6 s of
            # CPU per trial), and this runs in the sweep's event loop, which waits for it.
            mlflow.pyfunc.log_model(name=MODEL_NAME, python_model=STUDENT_CODE,
                                    artifacts={"weights": weights, "config": cfg_path}, code_paths=[code],
                                    signature=signature, input_example=np.zeros((2, channels, size, size), np.float32),
                                    pip_requirements=reqs)
            mlflow.log_dict(meta, f"{MODEL_NAME}/checkpoint_meta.json")


def _version(pkg: str) -> str:
    from importlib import metadata

    return metadata.version(pkg)


def load_student(model_uri: str) -> nn.Module:
    """The logged student as its ``trainables`` module (``runs:/<id>/student``, ``models:/NAME/1``)."""
    import mlflow

    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().model


# ------------------------------------ the registry ---------------------------------------------


def register_best(client: MlflowClient, summary: dict[str, Any], name: str):
    """Register the best e²KD run's student as a new version of ``name``, tagged with its teacher,
    λ, τ, student and final metrics. Returns the ModelVersion."""
    from orchestrator.tracking import short

    best = summary.get("best")
    if best is None:
        raise ValueError(f"--register {short(name, 80)}: the sweep has no finished e²KD run to register")
    model_id = logged_student_id(client, best)
    if model_id is None:
        raise ValueError(f"--register {short(name, 80)}: run {best.info.run_id} has no logged student "
                         f"({short(best.data.tags.get('e2kd.model_log_error', 'not logged'), 200)})")
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="e²KD students registered by `e2kd report --register`")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    p, tags = best.data.params, best.data.tags
    vtags = {"teacher": tags.get("teacher", p.get("teacher.arch", "?")), "student": p.get("student", "?"),
             "loss.lam": p.get("loss.lam", "?"), "loss.temperature": p.get("loss.temperature", "?"),
             "explainer": p.get("loss.explainer", "?"), "e2kd.sweep": tags.get("e2kd.sweep", "?"),
             "selected_by": f"{summary['metric']} ({summary['mode']})"}
    vtags.update({k: f"{v:.6g}" for k, v in best.data.metrics.items()
                  if k.startswith(("val_", "test_")) and not k.endswith("_s")})
    # MLflow 3 keeps a model in its LoggedModel, not under the run's artifacts: register that.
    return client.create_model_version(name, f"models:/{model_id}", run_id=best.info.run_id, model_id=model_id,
                                       tags=vtags, description=f"best e²KD student of sweep {vtags['e2kd.sweep']}")


def logged_student_id(client: MlflowClient, run) -> str | None:
    """The id of the last ``student`` model the run logged (a retried trial may have logged two)."""
    outputs = run.outputs.model_outputs if run.outputs else []
    for out in sorted(outputs, key=lambda o: o.step, reverse=True):
        if client.get_logged_model(out.model_id).name == MODEL_NAME:
            return out.model_id
    return None


def check_model_name(name: str) -> None:
    """A registered model's name must survive a filter string and the UI's URL."""
    from orchestrator.tracking import short

    if not name.strip() or len(name) > 256 or any(c in name for c in "\n\r/'\"%`"):
        raise ValueError(f"--register {short(repr(name), 80)}: a model name is 1-256 characters without "
                         "slashes, quotes, % or newlines")


def register_sweep_best(experiment: str, tracking_uri: str, sweep: str | None, name: str,
                        allow_unequal: bool = False) -> str:
    """``e2kd report --register NAME``: the sweep's best e²KD student as a new version of ``name``
    in the Model Registry; returns (and prints) where it is."""
    from mlflow import MlflowClient

    from orchestrator import report, tracking

    check_model_name(name)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    parent, children = report.load_sweep(client, experiment, sweep)
    version = register_best(client, report.summarise(parent, children, allow_unequal), name)
    from urllib.parse import quote

    where = f"{ui_base(uri)}/#/models/{quote(version.name, safe='')}/versions/{version.version}"
    line = (f"[e2kd] registered {version.name} version {version.version} (run {version.run_id}); load it with "
            f"orchestrator.registry.load_student('models:/{version.name}/{version.version}'); {where}")
    print(line)
    return line
