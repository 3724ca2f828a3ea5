"""Bad input gets one clear line naming the file, field or path, before Ray starts, and leaves
nothing behind.

Every case of ``docs/bad-input.md`` runs here through ``e2kd sweep`` (``orchestrator.cli.main``,
in-process): exit code 2, one ``e2kd: error: ...`` line naming the field or path, Ray never
initialised, no teacher / cache / MLflow store / Tune directory created, and the message equal to
the one the doc records. Regenerate the doc (it runs the real ``e2kd`` executable in a subprocess
for every case) with::

    .venv/bin/python tests/test_bad_input.py --write-doc

Hypothesis fuzzes the spec loader: a mutated quickstart spec (as a dict, as YAML text, through
``--set``) either loads as a valid SweepSpec or raises SpecError, never another exception.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
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
    argv: tuple[str, ...] = ()  # extra arguments after `e2kd sweep SPEC`
    expect: tuple[str, ...] = ()  # substrings the message must hold (the field or path)
    stage: str = "spec"  # spec (load_spec) | preflight | teacher (before Ray in any case)
    needs_no_gpu: bool = False


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
]


def write_case(case: Case, work: str, assets: dict[str, str]) -> str:
    path = os.path.join(work, "spec.yaml")
    if case.text is not None:
        text = case.text
    else:
        d = base_spec(work, assets)
        if case.mutate:
            case.mutate(d, assets)
        text = yaml.safe_dump(d, sort_keys=False)
    with open(path, "w") as f:
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


def run_case(case: Case, work: str, assets: dict[str, str], capsys) -> tuple[int, str, float]:
    from orchestrator.cli import main

    spec = write_case(case, work, assets)
    capsys.readouterr()
    t0 = time.monotonic()
    rc = main(["sweep", spec, *case.argv])
    took = time.monotonic() - t0
    err = capsys.readouterr().err
    return rc, err[err.find("e2kd: error: "):] if "e2kd: error: " in err else err, took


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
    rc, err, took = run_case(case, work, assets, capsys)

    lines = err.strip().splitlines()
    assert rc == 2, err
    assert lines and lines[0].startswith("e2kd: error: "), err
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


def code(text: str) -> str:
    """A Markdown code span that may itself hold backticks."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def write_doc() -> None:
    """Run every case through the real `e2kd` executable (a subprocess each) and write the doc."""
    from concurrent.futures import ThreadPoolExecutor

    with tempfile.TemporaryDirectory(prefix="e2kd-bad-") as tmp:
        assets = make_assets(os.path.join(tmp, "assets"))

        def one(case: Case) -> str:
            work = os.path.join(tmp, case.id)
            os.makedirs(work)
            spec = write_case(case, work, assets)
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            p = subprocess.run([E2KD, "sweep", spec, *case.argv], capture_output=True, text=True, env=env, timeout=300)
            lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
            start = next(i for i, ln in enumerate(lines) if ln.startswith("e2kd: error: "))
            msg = normalise(" ".join(lines[start:]), work, assets)
            assert p.returncode == 2, (case.id, p.returncode, p.stderr[-2000:])
            cmd = "e2kd sweep spec.yaml" + "".join(f" {a}" for a in case.argv)
            print(case.id, msg[:120], flush=True)
            return f"| `{case.id}` | {case.what} | `{cmd}` | {case.stage} | {code(msg.replace('|', chr(92) + '|'))} |"

        with ThreadPoolExecutor(3) as pool:
            rows = list(pool.map(one, CASES))
    with open(DOC, "w") as f:
        f.write(DOC_HEAD + "\n".join(rows) + "\n" + DOC_TAIL)


DOC_HEAD = """# Bad input: what the user sees

Every row was produced by running the real `e2kd` executable (`e2kd sweep spec.yaml ...` in a
subprocess, exit code 2) on the quickstart spec with one thing wrong. Machine-specific paths are
shown as `<work>` (the directory holding `spec.yaml`) and `<assets>` (where the test teachers and
cache live), and sha256 digests as `<sha256>`. `tests/test_bad_input.py` runs every case again and
fails when a message differs from this table; regenerate it with
`.venv/bin/python tests/test_bad_input.py --write-doc`.

*Stage* is where the problem is caught, always before Ray starts and before anything is written:
`spec` = while loading the YAML (`load_spec`: the message starts with the spec file), `preflight` =
`orchestrator.cli.preflight` (data, GPUs and CPUs of a local instance, teacher cache, tracking
server), `teacher` = the teacher check right after it. The test asserts that each case returns
within 10 s in-process, that Ray was never initialised and that nothing was written (no teacher,
cache, MLflow store or Tune directory); as a subprocess the time is Python's imports (torch, Ray,
MLflow), a few seconds on an idle laptop.

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
    if sys.argv[1:] == ["--write-doc"]:
        write_doc()
    else:
        sys.exit("usage: tests/test_bad_input.py --write-doc")
