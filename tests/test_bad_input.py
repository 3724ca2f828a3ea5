"""Bad input gets one clear line naming the file, field, path or service, before Ray starts, and
leaves nothing behind.

Every case of ``docs/bad-input.md`` runs here through the real command line
(``orchestrator.cli.main``, in-process; ``e2kd sweep`` unless the case names another command):
exit code 2, exactly one ``e2kd: error: ...`` line on stderr and nothing on stdout, bounded
output, no secret from a URI anywhere in it, within 10 s, Ray never initialised, no teacher /
cache / MLflow store / Tune directory created (nor anything in the working directory), and the
message equal to the one the doc records. Regenerate the doc (it runs the CLI in a subprocess for
every case) with::

    .venv/bin/python tests/test_bad_input.py --write-doc

Hypothesis fuzzes the spec loader: a mutated quickstart spec (as a dict, as YAML text, through
``--set``) either loads as a valid SweepSpec or raises SpecError, never another exception.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "sweeps", "quickstart.yaml")
DOC = os.path.join(ROOT, "docs", "bad-input.md")
E2KD = os.path.join(os.path.dirname(sys.executable), "e2kd")
FAST_S = 10.0  # "fails fast": the whole command, imports included, in-process
SECRET = "Pw-s3cret-77"  # in every URI with credentials below: must never be printed
MAX_OUTPUT = 2000  # characters of stdout + stderr a failing command may print


# ------------------------------------ fixtures: two teachers and a cache ---------------------


def make_assets(root: str) -> dict[str, str]:
    """Two untrained small_cnn teachers (A, B: different weights) and A's GradCAM cache of the
    3-shot digits split. No training: ``save_teacher`` writes a valid card for any model."""
    import torch

    from trainables.data import DataConfig
    from trainables.models import build_model
    from trainables.teacher import build_cache_local, save_teacher

    out = {}
    for name, seed in (("teacher-a", 0), ("teacher-b", 1)):
        torch.manual_seed(seed)
        out[name] = os.path.join(root, name)
        save_teacher(build_model("small_cnn", 10), "small_cnn", DataConfig(name="digits"), out[name],
                     test_accuracy=0.1)
    out["cache-a"] = os.path.join(root, "cache-a")
    build_cache_local(out["teacher-a"], DataConfig(name="digits", shots=3), "gradcam", out["cache-a"])
    # A teacher whose model card is not JSON, and one whose card is JSON but not a card.
    for name, card in (("teacher-badcard", "{not json"), ("teacher-emptycard", "{}")):
        out[name] = os.path.join(root, name)
        shutil.copytree(out["teacher-a"], out[name])
        with open(os.path.join(out[name], "teacher.json"), "w") as f:
            f.write(card)
    out["file"] = os.path.join(root, "a-file.txt")
    with open(out["file"], "w") as f:
        f.write("not a folder\n")
    out["bad-safetensors"] = os.path.join(root, "weights.safetensors")
    with open(out["bad-safetensors"], "wb") as f:
        f.write(b"\x00" * 64)
    out["raw-weights"] = os.path.join(root, "raw.pt")
    torch.save(build_model("small_cnn", 10).state_dict(), out["raw-weights"])
    out["empty-dir"] = os.path.join(root, "empty-dir")
    os.makedirs(out["empty-dir"])
    # An MLflow store with one experiment and no sweep (for `e2kd report`).
    from mlflow import MlflowClient

    out["store"] = os.path.join(root, "mlflow.db")
    MlflowClient(f"sqlite:///{out['store']}").create_experiment("bad", artifact_location=f"file://{root}/art")
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    return make_assets(str(tmp_path_factory.mktemp("assets")))


def base_spec(work: str, assets: dict[str, str]) -> dict:
    with open(QUICKSTART) as f:
        d = yaml.safe_load(f)
    d.update(name="bad", storage=os.path.join(work, "runs"), epochs=3)
    d["data"].update(shots=3)
    d["teacher"].update(path=os.path.join(work, "teacher-not-trained-yet"))
    d["resources"].update(workers_per_trial=1, num_cpus=3)
    d["mlflow"] = {"tracking_uri": f"sqlite:///{work}/mlflow.db", "experiment": "bad"}
    return d


# ------------------------------------ the cases ----------------------------------------------


@dataclasses.dataclass
class Case:
    id: str
    what: str  # what the user did, for the doc
    mutate: Callable[[dict, dict], Any] | None = None  # (spec dict, assets) -> None
    text: str | None = None  # the spec file verbatim (instead of a mutated quickstart)
    argv: tuple[str, ...] = ()  # extra arguments after the command ({work}, {assets[x]}, {SECRET} filled in)
    expect: tuple[str, ...] = ()  # substrings the message must hold (the field or path)
    stage: str = "spec"  # spec (load_spec) | args | preflight | teacher (before Ray in any case)
    needs_no_gpu: bool = False
    cmd: tuple[str, ...] = ("sweep", "{spec}")  # the command before argv


def fill(arg: str, work: str, assets: dict[str, str]) -> str:
    return arg.format(work=work, assets=assets, spec=os.path.join(work, "spec.yaml"), SECRET=SECRET)


with open(QUICKSTART) as _f:
    QUICKSTART_SEARCH = yaml.safe_load(_f)["search"]


def _set(path: str, value):
    def f(d, a):
        *head, last = path.split(".")
        cur = d
        for k in head:
            cur = cur.setdefault(k, {})
        cur[last] = value
    return f


def _use_teacher(name: str, **teacher):
    def f(d, a):
        d["teacher"].update(path=a[name], **{k: (a[v] if v in a else v) for k, v in teacher.items()})
    return f


CASES = [
    Case("malformed-yaml", "spec is not valid YAML (unclosed bracket)",
         text="name: bad\nloss: {lam: [1, 2\n", expect=("not valid YAML", "line 3")),
    Case("not-a-mapping", "spec is a YAML list, not a mapping", text="- name: bad\n", expect=("must be a mapping",)),
    Case("unknown-field", "misspelt top-level field `epochz: 3`", _set("epochz", 3), expect=("epochz", "unknown field")),
    Case("unknown-nested-field", "misspelt nested field `loss.lamda: 1`", _set("loss.lamda", 1.0),
         expect=("loss.lamda", "unknown field")),
    Case("wrong-type", "`epochs: ten`", _set("epochs", "ten"), expect=("epochs", "expected an integer")),
    Case("wrong-type-section", "`optim: adamw` (a string where a section is expected)", _set("optim", "adamw"),
         expect=("optim", "expected a mapping")),
    Case("negative-lambda", "`loss.lam: -1`", _set("loss.lam", -1.0), expect=("loss.lam", ">= 0")),
    Case("nan-lambda", "`loss.lam: .nan`", _set("loss.lam", float("nan")), expect=("loss.lam", "finite")),
    Case("negative-tau", "`loss.temperature: -2`", _set("loss.temperature", -2.0),
         expect=("loss.temperature", "> 0")),
    Case("nan-tau-override", "`--set loss.temperature=.nan`", argv=("--set", "loss.temperature=.nan"),
         expect=("loss.temperature", "finite")),
    Case("inf-lr-override", "`--set optim.lr=1e400` (overflows to inf)", argv=("--set", "optim.lr=1e400"),
         expect=("optim.lr", "finite")),
    Case("bad-override-syntax", "`--set seed` (no value)", argv=("--set", "seed"), expect=("--set", "dotted.key=value")),
    Case("impossible-date", "`--set seed=2024-02-30` (YAML reads a date)", argv=("--set", "seed=2024-02-30"),
         expect=("seed=2024-02-30", "not valid YAML")),
    Case("empty-search-space", "`search.space: {}`", _set("search.space", {}), expect=("search.space", "empty")),
    Case("search-key-not-a-field", "search over `loss.lamda`",
         lambda d, a: d["search"]["space"].update({"loss.lamda": {"type": "uniform", "low": 0, "high": 1}}),
         expect=("search.space.loss.lamda", "not a trial field")),
    Case("log-range-from-zero", "`loss.lam: {type: loguniform, low: 0, high: 1}`",
         lambda d, a: d["search"]["space"].update({"loss.lam": {"type": "loguniform", "low": 0, "high": 1}}),
         expect=("search.space.loss.lam", "low > 0")),
    Case("search-value-invalid", "`loss.temperature` choice holds -5",
         lambda d, a: d["search"]["space"].update({"loss.temperature": {"type": "choice", "values": [1, -5]}}),
         expect=("search.space.loss.temperature", "-5")),
    Case("choice-values-not-scalars", "`eval_splits: {type: choice, values: [[val], [test]]}` (Optuna takes scalars)",
         lambda d, a: d["search"]["space"].update({"eval_splits": {"type": "choice", "values": [["val"], ["test"]]}}),
         expect=("search.space.eval_splits", "choice")),
    Case("metric-not-reported", "`search.metric: bogus`", _set("search.metric", "bogus"),
         expect=("search.metric", "bogus")),
    Case("objectives-one", "`search.objectives` with one objective", _set("search.objectives", [{"metric": "val_acc"}]),
         expect=("search.objectives", "at least 2")),
    Case("objectives-with-asha", "`search.objectives: [val_acc, val_exp_sim]` with `search.scheduler: asha`",
         _set("search", {**QUICKSTART_SEARCH, "scheduler": "asha",
                         "objectives": [{"metric": "val_acc"}, {"metric": "val_exp_sim"}]}),
         expect=("search.scheduler", "asha", "scheduler: none")),
    Case("objective-not-reported", "`search.objectives[1].metric: val_exp_simm` (a typo)",
         _set("search.objectives", [{"metric": "val_acc"}, {"metric": "val_exp_simm"}]),
         expect=("search.objectives[1].metric", "val_exp_simm")),
    Case("optuna-storage-scheme", "`search.storage: redis://127.0.0.1:6379/0` (not a database Optuna stores in)",
         _set("search.storage", "redis://127.0.0.1:6379/0"), expect=("search.storage", "redis"), stage="preflight"),
    Case("optuna-storage-no-driver", "`search.storage: postgresql://alice:PASSWORD@…` without psycopg2 installed",
         _set("search.storage", f"postgresql://alice:{SECRET}@127.0.0.1:5432/optuna"),
         expect=("search.storage", "alice:***@", "driver is not installed"), stage="preflight"),
    Case("optuna-storage-env-unset", "`search.storage: postgresql://alice:${E2KD_NO_SUCH_VAR}@…`, the variable unset",
         _set("search.storage", "postgresql://alice:${E2KD_NO_SUCH_VAR}@127.0.0.1/optuna"),
         expect=("search.storage", "E2KD_NO_SUCH_VAR is not set"), stage="preflight"),
    Case("unknown-architecture", "`student: resnet19`", _set("student", "resnet19"),
         expect=("student", "resnet19", "known")),
    Case("unknown-teacher-architecture", "`teacher.arch: vgg11`", _set("teacher.arch", "vgg11"),
         expect=("teacher.arch", "vgg11")),
    Case("unknown-explainer", "`loss.explainer: lime`", _set("loss.explainer", "lime"),
         expect=("loss.explainer", "lime", "known")),
    Case("bcos-explainer-on-cnn", "B-cos explainer on a standard CNN: `loss.explainer: bcos_weight`, student tiny_cnn",
         _set("loss.explainer", "bcos_weight"), expect=("loss.explainer", "B-cos", "tiny_cnn")),
    Case("unknown-dataset", "`data.name: mnist`", _set("data.name", "mnist"), expect=("data.name", "mnist")),
    Case("voc-without-root", "`data.name: voc` without `data.root`", _set("data.name", "voc"),
         expect=("data.root", "voc")),
    Case("bad-sweep-name", "`name: \"it's/mine\"` (quote and slash)", _set("name", "it's/mine"),
         expect=("name", "it's/mine")),
    Case("zero-cpus", "`resources.num_cpus: 0`", _set("resources.num_cpus", 0), expect=("resources.num_cpus", ">= 1")),
    Case("file-tracking-store", "`mlflow.tracking_uri: ./mlruns` (MLflow 3 file store)",
         _set("mlflow.tracking_uri", "./mlruns"), expect=("mlflow.tracking_uri", "./mlruns"), stage="preflight"),
    Case("missing-dataset-path", "`data.name: imagefolder`, `data.root` does not exist",
         lambda d, a: d["data"].update(name="imagefolder", root="/nonexistent/e2kd-data", image_size=64),
         expect=("data.root", "/nonexistent/e2kd-data"), stage="preflight"),
    Case("k-shot-larger-than-class", "`data.shots: 500` (digits has about 107 training images per class)",
         _set("data.shots", 500), expect=("data.shots=500", "only"), stage="preflight"),
    Case("gpu-requested-none-present", "`resources.use_gpu: true` on a machine without a GPU",
         _set("resources.use_gpu", True), expect=("resources.use_gpu", "no CUDA GPU"), stage="preflight",
         needs_no_gpu=True),
    Case("unreachable-tracking-server", "`--tracking-uri http://127.0.0.1:9` (nothing listens there)",
         argv=("--tracking-uri", "http://127.0.0.1:9"), expect=("http://127.0.0.1:9", "unreachable"),
         stage="preflight"),
    Case("never-schedulable", "`resources.workers_per_trial: 10` on a local instance (`resources.num_cpus: 3`)",
         _set("resources.workers_per_trial", 10), expect=("workers_per_trial=10", "resources.num_cpus"),
         stage="preflight"),
    Case("zero-start-timeout", "`resources.start_timeout_s: 0`", _set("resources.start_timeout_s", 0),
         expect=("resources.start_timeout_s", "> 0")),
    Case("gpu-as-custom-resource", "`resources.worker_resources: {GPU: 1}`", _set("resources.worker_resources", {"GPU": 1}),
         expect=("resources.worker_resources", "gpus_per_worker")),
    Case("custom-resource-on-local-instance", "`resources.worker_resources: {accel: 1}` on a local instance",
         _set("resources.worker_resources", {"accel": 1}), expect=("resources.worker_resources", "accel", "--address"),
         stage="preflight"),
    Case("negative-mlflow-retry", "`mlflow.retry_s: -1`", _set("mlflow.retry_s", -1),
         expect=("mlflow.retry_s", ">= 0")),
    Case("cache-from-another-teacher", "`teacher.mode: cached` with a cache built by another teacher",
         _use_teacher("teacher-b", mode="cached", cache_dir="cache-a"),
         expect=("teacher.cache_dir", "teacher_sha256", "cache-a", "--force"),
         stage="preflight"),
    Case("teacher-other-architecture", "`teacher.arch: tiny_cnn` but `teacher.path` holds a small_cnn teacher",
         lambda d, a: d["teacher"].update(path=a["teacher-a"], arch="tiny_cnn"),
         expect=("teacher.arch", "tiny_cnn", "small_cnn", "teacher-a"), stage="teacher"),
] + [
    # ---- secrets: a URI's password never appears, whatever fails
    Case("secret-report-unreachable", "`e2kd report` at a tracking server with a password in its URI, not running",
         cmd=("report", "bad"), argv=("--tracking-uri", "http://alice:{SECRET}@127.0.0.1:9"),
         expect=("tracking server http://127.0.0.1:9 is unreachable",), stage="args"),
    Case("secret-ui-unreachable", "`e2kd ui` at a tracking server with a password in its URI, not running",
         cmd=("ui",), argv=("--tracking-uri", "http://alice:{SECRET}@127.0.0.1:9"),
         expect=("tracking server http://127.0.0.1:9 is unreachable",), stage="args"),
    Case("secret-spec-tracking-uri", "`mlflow.tracking_uri` with a password, server not running",
         _set("mlflow.tracking_uri", f"http://alice:{SECRET}@127.0.0.1:9"),
         expect=("tracking server http://127.0.0.1:9 is unreachable",),
         stage="preflight"),
    Case("secret-set-tracking-uri", "`--set mlflow.tracking_uri=http://alice:PASSWORD@…` (server not running)",
         argv=("--set", "mlflow.tracking_uri=http://alice:{SECRET}@127.0.0.1:9"),
         expect=("tracking server http://127.0.0.1:9 is unreachable",),
         stage="preflight"),
    Case("secret-storage-scheme", "`storage: ftp://user:PASSWORD@host/runs` (a scheme pyarrow does not read)",
         _set("storage", f"ftp://bob:{SECRET}@files.example/runs"), expect=("storage", "bob:***@", "ftp"),
         stage="preflight"),
    Case("secret-data-root-uri", "`data.root: s3://KEY:SECRET@bucket/data` (datasets are read as files)",
         _set("data.root", f"s3://AKIAEXAMPLE:{SECRET}@bucket/data"), expect=("data.root", "AKIAEXAMPLE:***@"),
         stage="preflight"),
    Case("secret-student-weights-uri", "`student_weights: s3://KEY:SECRET@bucket/w.pt`",
         _set("student_weights", f"s3://AKIAEXAMPLE:{SECRET}@bucket/w.pt"),
         expect=("student_weights", "AKIAEXAMPLE:***@"), stage="preflight"),
    Case("secret-address", "`--address ray://user:PASSWORD@host:10001`",
         argv=("--address", "ray://carol:{SECRET}@127.0.0.1:10001"), expect=("--address", "carol:***@", "credentials"),
         stage="preflight"),
    Case("secret-bad-tracking-port", "`--tracking-uri http://alice:PASSWORD@host:99999` (no such port)",
         argv=("--tracking-uri", "http://alice:{SECRET}@127.0.0.1:99999"), expect=("'http://127.0.0.1:99999' is not a valid",),
         stage="preflight"),
    # ---- unbounded input: the loader refuses it, messages stay short
    Case("billion-laughs", "a 1 KB spec whose aliases expand to 10⁹ values",
         text="name: bad\n" + "".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else '"lol"'] * 10) + "]\n"
                                      for i in range(9)), expect=("not valid YAML", "aliases")),
    Case("deep-nesting", "a value nested 30 levels deep", text="name: bad\nloss: " + "{a: " * 30 + "1" + "}" * 30 + "\n",
         expect=("not valid YAML", "deeper")),
    Case("huge-spec", "a 2 MB spec file", text="name: bad\n# " + "x" * (2 << 20) + "\n", expect=("bytes", "spec")),
    Case("huge-value", "`name:` holding 200 000 characters", _set("name", "n" * 200_000), expect=("name", "...")),
    Case("huge-key", "an unknown top-level key of 100 000 characters", _set("k" * 100_000, 1),
         expect=("unknown field",)),
    Case("huge-override", "`--set loss.lam=[1, 1, …]` with 50 000 items", argv=("--set", "loss.lam=[" + "1," * 50_000 + "1]"),
         expect=("--set", "characters, more than the 10000")),
    Case("not-utf8", "the spec file is not UTF-8 text", text="name: bad\nloss: {lam: \udcff}\n",
         expect=("cannot read the spec",)),
    Case("spec-is-a-directory", "the spec path is a directory", cmd=("sweep", "{work}"), expect=("is a directory",),
         stage="args"),
    # ---- duplicate keys: an error, never "the later one wins"
    Case("duplicate-key", "`loss: {lam: 1.0, lam: 0.0}` (the later key would silently make it KD)",
         text="name: bad\nloss: {lam: 1.0, lam: 0.0}\n", expect=("duplicate key", "lam")),
    Case("duplicate-top-level-key", "`epochs:` twice", text="name: bad\nepochs: 3\nepochs: 30\n",
         expect=("duplicate key", "epochs", "line 2")),
    Case("duplicate-key-in-override", "`--set 'loss={lam: 1, lam: 0}'`", argv=("--set", "loss={{lam: 1, lam: 0}}"),
         expect=("--set", "duplicate key")),
    # ---- values checked before Ray starts
    Case("student-weights-missing", "`student_weights:` a file that does not exist",
         _set("student_weights", "/nonexistent/e2kd/student.pt"), expect=("student_weights", "does not exist"),
         stage="preflight"),
    Case("student-weights-directory", "`student_weights:` a directory",
         lambda d, a: d.update(student_weights=a["empty-dir"]), expect=("student_weights", "directory"),
         stage="preflight"),
    Case("sqlite-store-is-directory", "`mlflow.tracking_uri: sqlite:///<a directory>`",
         lambda d, a: d["mlflow"].update(tracking_uri=f"sqlite:///{a['empty-dir']}"),
         expect=("tracking URI", "is a directory"), stage="preflight"),
    Case("sqlite-store-folder-missing", "`mlflow.tracking_uri: sqlite:////nonexistent/dir/mlflow.db`",
         _set("mlflow.tracking_uri", "sqlite:////nonexistent/e2kd/mlflow.db"), expect=("tracking URI", "does not exist"),
         stage="preflight"),
    Case("storage-is-a-file", "`storage:` an existing file", lambda d, a: d.update(storage=a["file"]),
         expect=("storage", "is a file"), stage="preflight"),
    Case("storage-under-a-file", "`storage:` a folder below an existing file",
         lambda d, a: d.update(storage=os.path.join(a["file"], "runs")), expect=("storage", "is a file"),
         stage="preflight"),
    Case("storage-not-writable", "`storage:` where no folder can be made (`/proc/…`; a read-only mount or a folder "
         "without write permission fails the same way)", _set("storage", "/proc/e2kd-runs"),
         expect=("storage", "cannot be written"), stage="preflight"),
    Case("data-root-is-a-file", "`data.root:` an existing file",
         lambda d, a: d["data"].update(name="imagefolder", root=a["file"], image_size=64),
         expect=("data.root", "is a file"), stage="preflight"),
    Case("teacher-path-is-a-file", "`teacher.path:` a file that is not a teacher.pt",
         lambda d, a: d["teacher"].update(path=a["file"]), expect=("teacher.path", "is a file"), stage="preflight"),
    Case("cache-dir-is-a-file", "`teacher.mode: cached` with `teacher.cache_dir:` an existing file",
         lambda d, a: d["teacher"].update(path=a["teacher-a"], mode="cached", cache_dir=a["file"]),
         expect=("teacher.cache_dir", "is a file"), stage="preflight"),
    Case("explain-samples-zero", "`explain_samples: 0` (the grid would be empty)", _set("explain_samples", 0),
         expect=("explain_samples", "[1, 64]")),
    Case("explain-samples-huge", "`explain_samples: 100000`", _set("explain_samples", 100_000),
         expect=("explain_samples", "[1, 64]")),
    Case("seed-negative", "`seed: -1`", _set("seed", -1), expect=("seed", "2**32")),
    Case("seed-too-large", "`--set seed=2**40`", argv=("--set", "seed=1099511627776"), expect=("seed", "2**32")),
    Case("data-seed-negative", "`data.seed: -1`", _set("data.seed", -1), expect=("data.seed", "2**32")),
    Case("teacher-training-seed", "`teacher_training.seed: -1`", _set("teacher_training.seed", -1),
         expect=("teacher_training.seed", "2**32")),
    Case("int-bounds-not-integers", "`epochs: {type: int, low: 1.5, high: 4}` in the search space",
         lambda d, a: d["search"]["space"].update({"epochs": {"type": "int", "low": 1.5, "high": 4}}),
         expect=("search.space.epochs", "integer")),
    Case("log-int-from-zero", "`batch_size: {type: int, low: 0, high: 64, log: true}`",
         lambda d, a: d["search"]["space"].update({"batch_size": {"type": "int", "low": 0, "high": 64, "log": True}}),
         expect=("search.space.batch_size", "low > 0")),
    Case("metric-name-mistyped", "`search.metric: val_agrement` (the split is right, the name is not)",
         _set("search.metric", "val_agrement"), expect=("search.metric", "val_agrement", "val_agreement")),
    Case("metric-of-another-dataset", "`search.metric: val_worst_group_acc` on digits (decoy-digits has groups)",
         _set("search.metric", "val_worst_group_acc"), expect=("search.metric", "not reported")),
    Case("image-size-huge", "`data.image_size: 100000`", _set("data.image_size", 100_000),
         expect=("data.image_size", "1024")),
    Case("epochs-huge", "`epochs: 10000000`", _set("epochs", 10_000_000), expect=("epochs", "<= 100000")),
    Case("batch-size-huge", "`batch_size: 10000000`", _set("batch_size", 10_000_000), expect=("batch_size", "<=")),
    # ---- the Ray address: checked in seconds, named
    Case("address-unreachable", "`--address 127.0.0.1:9` (no Ray there)", argv=("--address", "127.0.0.1:9"),
         expect=("--address 127.0.0.1:9", "no Ray cluster answers"), stage="preflight"),
    Case("address-bad-port", "`--address 127.0.0.1:99999`", argv=("--address", "127.0.0.1:99999"),
         expect=("--address", "1-65535"), stage="preflight"),
    Case("address-is-dashboard", "`--address http://127.0.0.1:8265` (the dashboard, not the GCS)",
         argv=("--address", "http://127.0.0.1:8265"), expect=("--address", "dashboard"), stage="preflight"),
    Case("train-address-unreachable", "`e2kd train --address 127.0.0.1:9`", cmd=("train", "{spec}"),
         argv=("--address", "127.0.0.1:9"), expect=("--address", "no Ray cluster answers"), stage="preflight"),
    Case("capacity-address-unreachable", "`e2kd capacity --address 127.0.0.1:9`", cmd=("capacity",),
         argv=("--address", "127.0.0.1:9"), expect=("--address", "no Ray cluster answers"), stage="args"),
    # ---- e2kd compare
    Case("compare-negative-lambda", "`e2kd compare --lam 0 -1`", cmd=("compare", "{spec}"), argv=("--lam", "0", "-1"),
         expect=("--lam", "-1"), stage="args"),
    Case("compare-nan-lambda", "`e2kd compare --lam nan`", cmd=("compare", "{spec}"), argv=("--lam", "nan"),
         expect=("--lam", "nan"), stage="args"),
    Case("compare-negative-seed", "`e2kd compare --seeds -1`", cmd=("compare", "{spec}"), argv=("--seeds", "-1"),
         expect=("--seeds", "-1"), stage="args"),
    Case("compare-repeated-seed", "`e2kd compare --seeds 0 0`", cmd=("compare", "{spec}"), argv=("--seeds", "0", "0"),
         expect=("--seeds", "once"), stage="args"),
    Case("compare-bad-name", "`e2kd compare --name \"it's\"`", cmd=("compare", "{spec}"), argv=("--name", "it's"),
         expect=("name", "it's"), stage="args"),
    Case("compare-not-a-number", "`e2kd compare --lam one`", cmd=("compare", "{spec}"), argv=("--lam", "one"),
         expect=("--lam", "invalid float value"), stage="args"),
    # ---- e2kd teacher / cache
    Case("teacher-no-recipe-mistyped-path", "`e2kd teacher`: no `teacher_training` section, `teacher.path` mistyped",
         lambda d, a: d.pop("teacher_training"), cmd=("teacher", "{spec}"),
         expect=("teacher.path", "no teacher_training section"), stage="teacher"),
    Case("weights-replace-without-force", "`e2kd teacher --weights raw.pt` over an existing teacher, no `--force`",
         lambda d, a: d["teacher"].update(path=a["teacher-a"]), cmd=("teacher", "{spec}"),
         argv=("--weights", "{assets[raw-weights]}"), expect=("teacher.path", "already holds a teacher", "--force"),
         stage="teacher"),
    Case("weights-missing", "`e2kd teacher --weights` a file that does not exist", cmd=("teacher", "{spec}"),
         argv=("--weights", "/nonexistent/e2kd/resnet34.pth"), expect=("--weights", "does not exist"), stage="teacher"),
    Case("weights-safetensors-unreadable", "`e2kd teacher --weights x.safetensors` (not readable here)",
         cmd=("teacher", "{spec}"), argv=("--weights", "{assets[bad-safetensors]}"),
         expect=("weights.safetensors",), stage="teacher"),
    Case("teacher-card-not-json", "`teacher.path:` a teacher whose model card is not JSON",
         lambda d, a: d["teacher"].update(path=a["teacher-badcard"]), expect=("teacher.path", "teacher.json"),
         stage="teacher"),
    Case("teacher-card-not-a-card", "`teacher.path:` a teacher whose model card is `{}`",
         lambda d, a: d["teacher"].update(path=a["teacher-emptycard"]), expect=("teacher.path", "model card"),
         stage="teacher"),
    Case("cache-no-preflight-data", "`e2kd cache` with `data.shots: 500` (checked before Ray starts, like sweep)",
         lambda d, a: (d["teacher"].update(path=a["teacher-a"], mode="cached", cache_dir="{work}/cache"),
                       d["data"].update(shots=500)), cmd=("cache", "{spec}"), expect=("data.shots=500",),
         stage="preflight"),
    Case("cache-no-teacher-no-recipe", "`e2kd cache` without a teacher and without `teacher_training`",
         lambda d, a: (d.pop("teacher_training"), d["teacher"].update(mode="cached", cache_dir="/nonexistent/e2kd/c")),
         cmd=("cache", "{spec}"), expect=("teacher.path", "no teacher_training"), stage="preflight"),
    Case("cache-address-unreachable", "`e2kd cache --address 127.0.0.1:9`",
         lambda d, a: d["teacher"].update(path=a["teacher-a"], mode="cached", cache_dir="/nonexistent/e2kd/c"),
         cmd=("cache", "{spec}"), argv=("--address", "127.0.0.1:9"), expect=("--address", "no Ray cluster answers"),
         stage="preflight"),
    # ---- read-only commands: report and ui
    Case("report-no-store", "`e2kd report` where there is no MLflow store (none is created)", cmd=("report", "bad"),
         argv=("--tracking-uri", "sqlite:///{work}/mlflow.db"), expect=("no MLflow store", "mlflow.db"), stage="args"),
    Case("ui-no-store", "`e2kd ui` where there is no MLflow store (none is created)", cmd=("ui",),
         argv=("--tracking-uri", "sqlite:///{work}/mlflow.db"), expect=("no MLflow store",), stage="args"),
    Case("report-quote-in-sweep", "`e2kd report --sweep \"it's\"` (a quote in the filter value)", cmd=("report", "bad"),
         argv=("--sweep", "it's", "--tracking-uri", "sqlite:///{assets[store]}"), expect=("no sweep", "it's"),
         stage="args"),
    Case("report-both-quotes", "`e2kd report --sweep 'a\"b'\\''c'` (both quotes: cannot be searched)",
         cmd=("report", "bad"), argv=("--sweep", "a\"b'c", "--tracking-uri", "sqlite:///{assets[store]}"),
         expect=("cannot be searched",), stage="args"),
    Case("report-register-bad-name", "`e2kd report --register a/b` (a slash in the model name)", cmd=("report", "bad"),
         argv=("--register", "a/b", "--tracking-uri", "sqlite:///{assets[store]}"), expect=("--register", "a/b"),
         stage="args"),
    Case("report-unknown-experiment", "`e2kd report nope`", cmd=("report", "nope"),
         argv=("--tracking-uri", "sqlite:///{assets[store]}"), expect=("experiment", "nope", "not found"), stage="args"),
    Case("report-out-is-a-file", "`e2kd report --out` an existing file", cmd=("report", "bad"),
         argv=("--tracking-uri", "sqlite:///{assets[store]}", "--out", "{assets[file]}"), expect=("--out", "is a file"),
         stage="args"),
    Case("report-file-store", "`e2kd report --tracking-uri ./mlruns`", cmd=("report", "bad"),
         argv=("--tracking-uri", "./mlruns"), expect=("./mlruns", "file store"), stage="args"),
    Case("ui-bad-port", "`e2kd ui --port 99999`", cmd=("ui",), argv=("--tracking-uri", "sqlite:///{assets[store]}",
                                                                   "--port", "99999"), expect=("--port", "99999"),
         stage="args"),
    Case("ui-foreign-host", "`e2kd ui --host 203.0.113.7` (not an address of this machine)", cmd=("ui",),
         argv=("--tracking-uri", "sqlite:///{assets[store]}", "--host", "203.0.113.7"),
         expect=("--host 203.0.113.7", "cannot listen"), stage="args"),
    Case("ui-optuna-no-storage", "`e2kd ui --optuna` where no sweep has written an Optuna storage (none is created)",
         cmd=("ui",), argv=("--optuna", "--tracking-uri", "sqlite:///{work}/mlflow.db"),
         expect=("--optuna-storage", "no Optuna storage"), stage="args"),
    # ---- the command line itself
    Case("unknown-command", "`e2kd swep` (a typo)", cmd=("swep",), expect=("invalid choice", "swep"), stage="args"),
    Case("unknown-option", "`e2kd sweep spec.yaml --resmue` (a typo)", argv=("--resmue",),
         expect=("unrecognized arguments", "--resmue"),
         stage="args"),
]


def write_case(case: Case, work: str, assets: dict[str, str]) -> str:
    path = os.path.join(work, "spec.yaml")
    if case.text is not None:
        text = case.text
    else:
        d = base_spec(work, assets)
        if case.mutate:
            case.mutate(d, assets)
        text = yaml.safe_dump(d, sort_keys=False, width=1 << 30).replace("{work}", work)
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(text)
    return path


def normalise(msg: str, work: str, assets: dict[str, str]) -> str:
    """Machine-specific parts of a message -> placeholders (so the doc and the test agree)."""
    msg = msg.replace(os.path.dirname(assets["teacher-a"]), "<assets>").replace(work, "<work>")
    return re.sub(r"\b[0-9a-f]{64}\b", "<sha256>", msg).strip()


def snapshot(*dirs: str) -> dict[str, tuple[int, int]]:
    out = {}
    for d in dirs:
        for dp, dn, fn in os.walk(d):
            for n in dn + fn:
                p = os.path.join(dp, n)
                st_ = os.stat(p)
                out[p] = (st_.st_size, st_.st_mtime_ns)
    return out


# ------------------------------------ the tests ----------------------------------------------


@pytest.fixture()
def no_ray_no_training(monkeypatch):
    """Anything past the checks would start Ray or train a teacher: make that fail loudly."""
    import orchestrator.sweep
    import trainables.teacher

    def refuse(*a, **k):
        raise AssertionError("the command got past its checks (it would start Ray / train a teacher)")

    monkeypatch.setattr(orchestrator.sweep, "init_ray", refuse)
    monkeypatch.setattr(orchestrator.sweep, "run_sweep", refuse)
    monkeypatch.setattr(trainables.teacher, "train_teacher", refuse)


def argv_of(case: Case, work: str, assets: dict[str, str]) -> list[str]:
    return [fill(a, work, assets) for a in (*case.cmd, *case.argv)]


def run_case(case: Case, work: str, assets: dict[str, str], capsys) -> tuple[int, str, str, float]:
    from orchestrator.cli import main

    write_case(case, work, assets)
    capsys.readouterr()
    t0 = time.monotonic()
    try:
        rc = main(argv_of(case, work, assets))
    except SystemExit as e:  # argparse: a usage error
        rc = e.code
    took = time.monotonic() - t0
    out, err = capsys.readouterr()
    return rc, out, err, took


def doc_messages() -> dict[str, str]:
    if not os.path.isfile(DOC):
        return {}
    out = {}
    for line in open(DOC):
        m = re.match(r"^\| `([a-z0-9-]+)` \|.*\| (`+) ?(e2kd: error: .*?) ?\2 \|$", line.rstrip("\n"))
        if m:
            out[m.group(1)] = m.group(3).replace("\\|", "|")
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_fails_fast_with_a_clear_message(case, tmp_path, assets, capsys, no_ray_no_training):
    import ray
    import torch

    if case.needs_no_gpu and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    work = str(tmp_path)
    before_assets = snapshot(os.path.dirname(assets["teacher-a"]))
    before_cwd = sorted(os.listdir("."))
    rc, out, err, took = run_case(case, work, assets, capsys)

    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("e2kd: error: "), err[:3000]
    assert out == "", out[:3000]
    assert len(out) + len(err) <= MAX_OUTPUT, f"{len(out) + len(err)} characters of output"
    assert SECRET not in out + err
    assert sorted(os.listdir(".")) == before_cwd  # no mlflow.db, reports/ or runs/ in the working directory
    msg = err.strip()
    for s in case.expect:
        assert s in msg, f"{s!r} not in {msg!r}"
    if case.stage == "spec":
        assert msg.startswith(f"e2kd: error: {os.path.join(work, 'spec.yaml')}: "), msg  # the file is named
    assert not ray.is_initialized()
    assert took < FAST_S, f"took {took:.1f} s"
    # Nothing half-written: only the spec file in the work dir, the shared assets untouched.
    assert sorted(os.listdir(work)) == ["spec.yaml"]
    assert snapshot(os.path.dirname(assets["teacher-a"])) == before_assets
    # The doc shows exactly this message.
    if os.environ.get("E2KD_SKIP_DOC_CHECK") == "1":  # while changing messages, before --write-doc
        return
    documented = doc_messages()
    assert case.id in documented, f"docs/bad-input.md lacks {case.id}: run `python tests/test_bad_input.py --write-doc`"
    assert documented[case.id] == normalise(msg.replace("\n", " "), work, assets), (
        "docs/bad-input.md is out of date: run `python tests/test_bad_input.py --write-doc`")


def test_ensure_teacher_accepts_a_card_without_accuracy(tmp_path, capsys):
    """A teacher written by save_teacher() with the default card (no test accuracy) is usable."""
    from orchestrator.cli import ensure_teacher
    from orchestrator.spec import spec_from_dict
    from trainables.data import DataConfig
    from trainables.models import build_model
    from trainables.teacher import save_teacher

    save_teacher(build_model("small_cnn", 10), "small_cnn", DataConfig(name="digits"), tmp_path / "t")
    d = base_spec(str(tmp_path), {})
    d["teacher"]["path"] = str(tmp_path / "t")
    assert ensure_teacher(spec_from_dict(d)).test_accuracy is None
    assert "test accuracy n/a" in capsys.readouterr().out


def test_doc_has_no_stale_cases():
    assert set(doc_messages()) == {c.id for c in CASES}


# ------------------------------------ fuzzing the loader -------------------------------------


with open(QUICKSTART) as _f:
    QUICKSTART_DICT = yaml.safe_load(_f)

_words = st.sampled_from(["digits", "voc", "imagefolder", "waterbirds", "decoy-digits", "bcos_weight", "gradcam",
                          "small_bcos_cnn", "resnet18", "cached", "live", "choice", "int", "uniform", "loguniform",
                          "loss.lam", "optim.lr", "val_acc", "test", "1e-3", "sgd", "bf16", "PACK", "asha", "max",
                          "../x", "it's", ""])
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10), _words)
_keys = st.one_of(st.text(max_size=8), st.integers(-3, 3), st.none(), st.booleans(),
                  st.sampled_from(["when", "values", "low", "high", "log", "type", "root", "shots", "cache_dir",
                                   "loss.lam", "optim.lr", "loss.temperature", "name"]))
_values = st.recursive(_scalars, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(_keys, c, max_size=3)),
                       max_leaves=6)


def _paths(d, prefix=()):
    out = [prefix] if prefix else []
    if isinstance(d, dict):
        for k, v in d.items():
            out += _paths(v, prefix + (k,))
    return out


@st.composite
def mutated_specs(draw) -> dict:
    """quickstart.yaml with 1-3 random edits: replace a value, delete a key, or add a key."""
    d = copy.deepcopy(QUICKSTART_DICT)
    for _ in range(draw(st.integers(1, 3))):
        p = draw(st.sampled_from(_paths(d)))
        parent = d
        for k in p[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["set", "set", "del", "add"]))
        if op == "set":
            parent[p[-1]] = draw(_values)
        elif op == "del":
            parent.pop(p[-1], None)
        else:  # one or two new keys (two unknown keys of different types must still be reported)
            target = parent[p[-1]] if isinstance(parent.get(p[-1]), dict) else parent
            for key in draw(st.lists(_keys, min_size=1, max_size=2)):
                target[key] = draw(_values)
    return d


FUZZ = settings(max_examples=int(os.environ.get("E2KD_FUZZ_EXAMPLES", "200")), deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


def _with(*edits: tuple[tuple, Any]) -> dict:
    """quickstart with ``(path, value)`` edits; path items may be any YAML key (None, ints)."""
    d = copy.deepcopy(QUICKSTART_DICT)
    for path, value in edits:
        cur = d
        for k in path[:-1]:
            cur = cur[k]
        cur[path[-1]] = value
    return d


@FUZZ
@given(mutated_specs())
@example(_with(((None,), 1), (("zzz",), 2)))  # unknown keys that do not sort together (found by this test)
@example(_with((("loss", 1), 1), (("loss", None), 2)))
@example(_with((("data",), {"name": "voc"})))  # a family whose splits need data.root (found by this test)
@example(_with((("name",), "../x"), (("search", "seed"), -1), (("resources", "num_cpus"), 0)))
def test_fuzzed_spec_dict_loads_or_raises_spec_error(d):
    from orchestrator.spec import SpecError, SweepSpec, spec_from_dict

    try:
        spec = spec_from_dict(d, source="fuzz", base="/tmp")
    except SpecError as e:
        assert str(e)
        return
    assert isinstance(spec, SweepSpec)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("fuzz"))


@FUZZ
@given(st.one_of(mutated_specs().map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
                 st.text(max_size=60),
                 st.lists(st.sampled_from(["name: x\n", "epochs: 2024-02-30\n", "data: [\n", "loss: {lam: .nan}\n",
                                           "!!python/object/apply:os.getcwd []\n", "? [a]\n: 1\n", "\t", "- 1\n",
                                           "&a [*a]\n", "name: " + "[" * 300, "%YAML 9.9\n---\n", "\x00", "\udcff",
                                           "search: {space: {loss.lam: {type: choice, values: [[1]]}}}\n"]),
                          max_size=4).map("".join)))
def test_fuzzed_spec_text_loads_or_raises_spec_error(fuzz_dir, text):
    from orchestrator.spec import SpecError, SweepSpec, load_spec

    path = os.path.join(fuzz_dir, "spec.yaml")
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(text)
    try:
        spec = load_spec(path)
    except SpecError as e:
        assert str(e).startswith(path)
        return
    assert isinstance(spec, SweepSpec)


@FUZZ
@given(st.lists(st.tuples(st.one_of(st.sampled_from(["seed", "epochs", "loss.lam", "loss", "optim.lr", "name",
                                                     "search.space", "search.space.loss.lam.low", "data.shots",
                                                     "resources.num_cpus", "teacher", "a..b", ".", "name.x", ""]),
                                    st.text(max_size=8)),
                          st.one_of(st.text(max_size=12), _words, st.sampled_from(
                              ["[1, 2", "{a: 1}", ".nan", "-.inf", "2024-02-30", "null", "!!python/none ''", "~",
                               "1e999", "0x10", "[[[]]]"]))),
                max_size=3))
def test_fuzzed_overrides_load_or_raise_spec_error(overrides):
    from orchestrator.spec import SpecError, SweepSpec, load_spec

    try:
        spec = load_spec(QUICKSTART, [f"{k}={v}" for k, v in overrides])
    except SpecError as e:
        assert str(e).startswith(QUICKSTART)
        return
    assert isinstance(spec, SweepSpec)


# ------------------------------------ the doc --------------------------------------------------


def shown(arg: str) -> str:
    """One argument as the doc shows it: long ones cut, quoted when needed."""
    import shlex

    arg = arg if len(arg) <= 60 else arg[:40] + "…" + f"({len(arg)} characters)"
    return shlex.quote(arg)


def code(text: str) -> str:
    """A Markdown code span that may itself hold backticks."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def write_doc(subprocesses: bool = False) -> None:
    """Run every case through the command line and write the doc: in this process
    (``orchestrator.cli.main``, the function the ``e2kd`` executable calls; Ray and teacher
    training refused as in the test), or with ``subprocesses`` one ``python -m orchestrator.cli``
    process per case (slow on a loaded machine: each imports torch, Ray and MLflow)."""
    import contextlib
    import io
    from concurrent.futures import ThreadPoolExecutor

    with tempfile.TemporaryDirectory(prefix="e2kd-bad-") as tmp:
        assets = make_assets(os.path.join(tmp, "assets"))

        def row(case: Case, work: str, rc: int, out: str, err: str) -> str:
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            start = next(i for i, ln in enumerate(lines) if ln.startswith("e2kd: error: "))
            msg = normalise(" ".join(lines[start:]), work, assets)
            assert rc == 2 and len(lines) == 1 and not out, (case.id, rc, out[-500:], err[-2000:])
            assert SECRET not in out + err, case.id
            args = [normalise(a.replace(os.path.join(work, "spec.yaml"), "spec.yaml").replace(SECRET, "PASSWORD"),
                              work, assets) for a in argv_of(case, work, assets)]
            cmd = "e2kd " + " ".join(shown(a) for a in args)
            print(case.id, msg[:120], flush=True)
            return f"| `{case.id}` | {case.what} | {code(cmd)} | {case.stage} | {code(msg.replace('|', chr(92) + '|'))} |"

        def one_subprocess(case: Case) -> str:
            work = os.path.join(tmp, case.id)
            os.makedirs(work)
            write_case(case, work, assets)
            env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": ROOT}
            p = subprocess.run([sys.executable, "-m", "orchestrator.cli", *argv_of(case, work, assets)],
                               capture_output=True, text=True, env=env, timeout=300, cwd=work)
            return row(case, work, p.returncode, p.stdout, p.stderr)

        def one_in_process(case: Case) -> str:
            import orchestrator.sweep
            import trainables.teacher
            from orchestrator.cli import main

            def refuse(*a, **k):
                raise AssertionError("the command got past its checks (it would start Ray / train a teacher)")

            orchestrator.sweep.init_ray = orchestrator.sweep.run_sweep = trainables.teacher.train_teacher = refuse
            work = os.path.join(tmp, case.id)
            os.makedirs(work)
            write_case(case, work, assets)
            out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
            os.chdir(work)
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    try:
                        rc = main(argv_of(case, work, assets))
                    except SystemExit as e:
                        rc = e.code
            finally:
                os.chdir(cwd)
            return row(case, work, rc, out.getvalue(), err.getvalue())

        if subprocesses:
            with ThreadPoolExecutor(4) as pool:
                rows = list(pool.map(one_subprocess, CASES))
        else:
            rows = [one_in_process(c) for c in CASES]
    with open(DOC, "w") as f:
        f.write(DOC_HEAD + "\n".join(rows) + "\n" + DOC_TAIL)


DOC_HEAD = """# Bad input: what the user sees

Every row was produced by running the command line (`orchestrator.cli.main`, the function the
`e2kd` executable calls, with the case's directory as the working directory; `--write-doc
--subprocesses` runs a `python -m orchestrator.cli` process per case instead) on the quickstart
spec with one thing wrong (or on the command's arguments); every case ends with exit code 2 and exactly one line on stderr. Machine-
specific paths are shown as `<work>` (the directory holding `spec.yaml`, also the working
directory) and `<assets>` (where the test teachers, cache and MLflow store live), and sha256
digests as `<sha256>`. `PASSWORD` in a case stands for a secret in a URI: it is never printed, the
message shows `user:***@`. `tests/test_bad_input.py` runs every case again and fails when a
message differs from this table; regenerate it with
`PYTHONPATH=. .venv/bin/python tests/test_bad_input.py --write-doc`.

*Stage* is where the problem is caught, always before Ray starts and before anything is written:
`spec` = while loading the YAML (`load_spec`: the message starts with the spec file; duplicate
keys, more than 1 MiB, nesting deeper than 20 or more than 20 000 values after alias expansion
are refused there), `args` = the command's own arguments and stores (`report`, `ui`,
`capacity`, `compare --seeds/--lam`, argparse), `preflight` = `orchestrator.cli.preflight` (every
path and URI of the spec, data, GPUs and CPUs of a local instance, teacher cache, the Ray
address, the tracking store or server), `teacher` = the teacher checks right after it. The test
asserts for each case: exit code 2, one line on stderr and nothing on stdout, at most 2 000
characters, no secret, within 10 s in-process, Ray never initialised and nothing written (no
teacher, cache, MLflow store or Tune directory, nothing new in the working directory); as a
subprocess the time is Python's imports (torch, Ray, MLflow), a few seconds on an idle laptop.
An error nobody anticipated takes the same path (one masked line of at most 1 000 characters,
exit code 1); `e2kd --debug …` (or `E2KD_DEBUG=1`) prints the masked traceback first.

| case | what is wrong | command | stage | message |
|---|---|---|---|---|
"""

DOC_TAIL = """
## Problems that only show up while a sweep runs

These cannot be caught before Ray starts; `tests/test_faults.py` checks each.

| problem | what happens |
|---|---|
| NaN/Inf loss (e.g. `--set optim.lr=1e30`) | The worker raises `NonFiniteLossError` ("non-finite loss nan at epoch E, step S (kd=…, exp=…); lower optim.lr or loss.lam") before anything is reported. The run fails at once: no Ray Train restart (`NonFiniteFailFast` turns it into a controller error, which Train does not retry) and Tune's trial retry stops immediately (the child run carries the tag `e2kd.nonfinite`). The Tune trial is ERROR with `NonFiniteLossError` in its error, the MLflow child run is FAILED with the tags `e2kd.nonfinite` and `e2kd.error`, and the Optuna trial is FAIL (no value to rank). |
| resources that never fit a cluster joined with `--address` | `run_sweep` refuses at once ("resources: one trial needs N CPU (the cluster has M)", naming every resource that is short, custom `worker_resources` included), before any MLflow run or Tune directory is created. On an autoscaling cluster it judges by what the autoscaler's node types × `max_workers` can provide, not by the nodes up now. |
| a Train worker, the sweep driver or a node dies | see `tests/test_faults.py`: the trial resumes from its last checkpoint, `e2kd sweep SPEC --resume` continues the sweep. |
| a truncated or corrupt checkpoint / cache shard | `CorruptCheckpointError` / `CacheError` naming the file; on resume the newest checkpoint that verifies is used. |
"""


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write-doc"] and sys.argv[2:] in ([], ["--subprocesses"]):
        write_doc(subprocesses=sys.argv[2:] == ["--subprocesses"])
    else:
        sys.exit("usage: tests/test_bad_input.py --write-doc [--subprocesses]")
