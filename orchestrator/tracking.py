"""MLflow layout: one parent run per sweep, exactly one child run per Tune trial.

Why not Ray's ``MLflowLoggerCallback``/``setup_mlflow``: they make flat runs (no parent), log
every Tune result key as a metric, and create a second run when a trial restarts (ray#48664).
Here the child run is looked up by the ``e2kd.trial_id`` tag before one is created, so a retried
trial or a resumed sweep continues the same run.

Where logging happens:
- parent and child runs: the sweep driver and the trial's driver fn (``get_or_create_child``);
- per-epoch metrics and the explanation PNG: :class:`MlflowEpochCallback`, a Ray Train
  ``UserCallback`` that runs in the Train controller (no rank logic needed);
- the final student and the run status: :class:`MlflowTrialFinalizer`, a Tune callback in the
  sweep process, which also sees trials that ASHA stopped early.

A tracking server that stops answering (a restart, a network blip) must not fail a trial or lose
what it logged: every per-epoch write goes through an :class:`Outbox` in the trial's own storage
(local or ``s3://…``), which a background sender empties once the server answers again; trial
start and end wait for the server up to ``mlflow.retry_s``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from importlib import metadata
from typing import TYPE_CHECKING, Any, TypeVar

import ray.train
import ray.tune

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from trainables.data.config import DataConfig

# MLflow is imported where it is used, not here: each trial's Ray Train controller unpickles the
# callbacks below before it starts the trial's workers, and importing MLflow there (~1.5 s of CPU,
# more under load) delayed every trial's start. The controller's sender thread imports it later,
# off that path.

from trainables import storage as storage_fs

TAG_SWEEP = "e2kd.sweep"
TAG_ROLE = "e2kd.role"
TAG_TRIAL = "e2kd.trial_id"
TAG_PARENT = "mlflow.parentRunId"
PNG_NAME = "explanations.png"
MAX_PARAM_LEN = 6000


# userinfo: anything up to the last '@' before the host's '/', whitespace or a double quote; an
# RFC 3986 password may hold ' and the other sub-delims, so a repr()'d URI is masked too (at worst
# a little more than the credentials is hidden, never less).
# Both runs are bounded: masking stays linear in the text's length (an unbounded scheme run made
# a 1 MB message take minutes: every position of a long word was a candidate scheme).
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]{0,31}://)(?P<userinfo>[^/\s\"<>]{1,1024})@")


def mask_uri(text: str) -> str:
    """Hide the credentials of every ``scheme://user:password@host`` in ``text`` (messages, logs,
    the spec logged to MLflow): ``http://user:***@host``. Prefer MLFLOW_TRACKING_USERNAME /
    MLFLOW_TRACKING_PASSWORD (or a token) over credentials in the URI."""
    def repl(m: re.Match) -> str:
        user = m.group("userinfo").split(":", 1)[0]
        return f"{m.group('scheme')}{user}:***@" if ":" in m.group("userinfo") else f"{m.group('scheme')}***@"

    return _URL_CREDENTIALS.sub(repl, text)


def absolute_sqlite(uri: str, base: str | None = None) -> str:
    """``sqlite:///relative.db`` -> absolute against ``base`` (default: the working directory);
    other URIs unchanged."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(os.path.join(base or os.getcwd(), uri[len("sqlite:///"):]))
    return uri


def resolve_tracking_uri(uri: str, base: str | None = None) -> str:
    """``sqlite:///relative.db`` -> absolute (workers run in other directories); others unchanged."""
    if uri.startswith("sqlite:///"):
        return absolute_sqlite(uri, base)
    if uri.startswith("file:") or ("://" not in uri and uri not in ("databricks",)):
        raise ValueError(f"mlflow.tracking_uri {mask_uri(uri)!r}: MLflow's file store is read-only in 3.x; use "
                         "sqlite:///path/to/mlflow.db or http://host:5000")
    return uri


def default_artifact_location(uri: str) -> str | None:
    """Next to a SQLite store, artifacts go to <db dir>/mlartifacts (not the CWD's ./mlruns)."""
    if uri.startswith("sqlite:///"):
        return "file://" + os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "mlartifacts")
    return None


def short(text: str, limit: int = 300) -> str:
    """Masked, on one line, at most ``limit`` characters: how any text that came from outside
    (an exception, a server's answer) appears in a message."""
    text = " ".join(mask_uri(str(text)).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """``http://user:pw@host:5000/x`` -> (``http://host:5000/x``, user, pw), percent-decoded;
    without userinfo the MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD environment."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        u, _, pw = userinfo.partition(":")
        user, password = unquote(u), unquote(pw)
    return urlunsplit(parts._replace(netloc=netloc)), user, password


def adopt_credentials(uri: str | None) -> str | None:
    """Move ``user:password@`` out of an http(s) tracking URI into this process's
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (MLflow's client sends them as basic auth;
    the Ray instance this command starts, and so every trial, inherits them) and return the bare
    URI. Why: a URI travels — into Tune's pickled experiment state in the sweep's storage
    (tuner.pkl), into the trials' context, into logs — the environment does not leave the machine.
    On a cluster (``--address``) the nodes' own environment must hold them (the cluster files'
    ~/.e2kd-mlflow.env)."""
    if not uri or not uri.startswith(("http://", "https://")) or "@" not in uri.split("/", 3)[2]:
        return uri
    bare, user, password = split_credentials(uri)
    os.environ["MLFLOW_TRACKING_USERNAME"] = user or ""
    os.environ["MLFLOW_TRACKING_PASSWORD"] = password or ""
    return bare


def _call_with_deadline(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """``fn()`` in a daemon thread, given up after ``timeout_s`` (name resolution and connects
    that ignore socket timeouts must not hang a command)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=run, name=f"e2kd-probe-{what}", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise TimeoutError(f"no answer within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


API_TIMEOUT_S = 30.0


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before Ray starts, when an http(s) tracking server does not answer, or refuses
    the credentials (in the URI, or MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN)."""
    if not uri.startswith(("http://", "https://")):
        return
    import base64
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    try:
        bare, user, password = split_credentials(uri)
        host, port = urlsplit(bare).hostname, urlsplit(bare).port  # ValueError: a bad port
        if not host:
            raise ValueError("no host")
    except ValueError as e:
        raise ValueError(f"tracking URI {mask_uri(uri)!r} is not a valid http(s) URL ({short(e, 100)})") from None
    headers = {}
    if user is not None or password is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user or ''}:{password or ''}".encode()).decode()
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"

    def get(path: str, timeout: float) -> int:
        req = urllib.request.Request(bare.rstrip("/") + path, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    where = f"MLflow tracking server {mask_uri(uri)}"
    try:
        _call_with_deadline(lambda: get("/health", timeout_s), timeout_s, "health")
    except (urllib.error.URLError, OSError, TimeoutError, ValueError) as e:
        raise ConnectionError(f"{where} is unreachable ({short(e, 200)}); start it or pass "
                              "--tracking-uri sqlite:///mlflow.db") from None
    # /health answers without credentials on an authenticating server: ask for something real. The
    # server is up, so it gets longer: the basic-auth app hashes the password on every request
    # (scrypt), which takes seconds on a busy head node.
    try:
        code = _call_with_deadline(lambda: get("/api/2.0/mlflow/experiments/search?max_results=1", API_TIMEOUT_S),
                                   API_TIMEOUT_S, "api")
    except (urllib.error.URLError, OSError, TimeoutError, ValueError) as e:
        raise ConnectionError(f"{where} answers /health but not its API ({short(e, 200)}); is it overloaded, "
                              "or a proxy in front of it misconfigured?") from None
    if code in (401, 403):
        raise ConnectionError(f"{where} refused the credentials (HTTP {code}); set MLFLOW_TRACKING_USERNAME and "
                              "MLFLOW_TRACKING_PASSWORD in the environment")


def sqlite_path(uri: str) -> str | None:
    """The database file of a ``sqlite:///`` tracking URI (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return uri[len("sqlite:///"):].split("?", 1)[0]


def check_store(uri: str, write: bool) -> None:
    """Before anything runs: a SQLite store must be a file in a writable folder (``write``) or
    exist already (read-only commands never create one); a server must answer."""
    path = sqlite_path(uri)
    if path is None:
        check_reachable(uri)
        return
    if os.path.isdir(path):
        raise ValueError(f"tracking URI {mask_uri(uri)}: {path} is a directory, not a SQLite file")
    if not os.path.isdir(os.path.dirname(path) or "."):
        raise FileNotFoundError(f"tracking URI {mask_uri(uri)}: the folder {os.path.dirname(path)} does not exist")
    if not os.path.exists(path):
        if not write:
            raise FileNotFoundError(f"tracking URI {mask_uri(uri)}: no MLflow store at {path} (nothing recorded "
                                    "there yet); pass --tracking-uri of the store your sweep used")
        check_writable("mlflow.tracking_uri", os.path.dirname(path) or ".")
    elif write and not os.access(path, os.W_OK):
        raise PermissionError(f"mlflow.tracking_uri: {path} is not writable")


def check_writable(field: str, path: str) -> None:
    """``path`` (a folder to be created or written into) can be: its nearest existing ancestor is a
    folder in which a folder can be made (probed with an empty temporary folder, removed at once:
    read-only mounts, missing permissions and pseudo file systems all fail here, not later)."""
    p = os.path.abspath(path)
    if os.path.exists(p) and not os.path.isdir(p):
        raise NotADirectoryError(f"{field}: {p} is a file, not a folder")
    anc = p
    while not os.path.exists(anc):
        anc = os.path.dirname(anc)
    if not os.path.isdir(anc):
        raise NotADirectoryError(f"{field}: {p} cannot be created: {anc} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".e2kd-probe-", dir=anc))
    except OSError as e:
        raise PermissionError(f"{field}: {p} cannot be written: no folder can be made in {anc} "
                              f"({e.strerror or type(e).__name__})") from None


def filter_value(value: str) -> str:
    """``value`` as a quoted string literal of an MLflow search filter. MLflow's filter grammar
    has no escapes: a value is quoted with whichever quote it does not hold, and one holding both
    (or a backtick or newline) is refused, so user text can never change the filter's meaning."""
    value = str(value)
    if any(c in value for c in "`\n\r\\") or ("'" in value and '"' in value):
        raise ValueError(f"{value[:80]!r} cannot be searched for in MLflow (quotes, backticks or newlines)")
    return f'"{value}"' if "'" in value else f"'{value}'"


def tag_equals(key: str, value: str) -> str:
    """A filter clause ``tags.`key` = 'value'`` built safely (see :func:`filter_value`)."""
    if "`" in key:
        raise ValueError(f"tag key {key[:80]!r} holds a backtick")
    return f"tags.`{key}` = {filter_value(value)}"


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The experiment's id (created or restored), tagged as model development so MLflow's UI opens
    its runs, not its GenAI traces (a kind the user picked in the UI is kept)."""
    from orchestrator import registry

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if registry.EXPERIMENT_KIND_TAG not in exp.tags:
            registry.mark_model_development(client, exp.experiment_id)
        return exp.experiment_id
    exp_id = client.create_experiment(name, artifact_location=artifact_location)
    registry.mark_model_development(client, exp_id)
    return exp_id


def _param_batch(params: dict[str, Any]) -> list[Param]:
    from mlflow.entities import Param

    return [Param(k, mask_uri(str(v))[:MAX_PARAM_LEN]) for k, v in sorted(params.items())]


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    batch = _param_batch(params)
    for i in range(0, len(batch), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=batch[i:i + 100])


def git_commit() -> str:
    """The commit the sweep runs: ``E2KD_GIT_COMMIT`` when set (a cluster's copy of the project has
    no .git: pass it from the submitting machine, docs/cluster.md), else ``git rev-parse HEAD``."""
    if os.environ.get("E2KD_GIT_COMMIT"):
        return os.environ["E2KD_GIT_COMMIT"].strip()[:64]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {}
    for pkg in ("e2kd", "torch", "torchvision", "ray", "optuna", "mlflow", "pyarrow", "bcos"):
        try:
            out[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[f"version.{pkg}"] = "not installed"
    return out


def find_parent(client: MlflowClient, exp_id: str, sweep: str) -> str | None:
    runs = client.search_runs([exp_id], f"{tag_equals(TAG_SWEEP, sweep)} and {tag_equals(TAG_ROLE, 'parent')}",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def create_parent(client: MlflowClient, exp_id: str, sweep: str, spec_path: str, params: dict[str, Any],
                  tags: dict[str, str] | None = None) -> str:
    from orchestrator.registry import source_tags

    run = client.create_run(exp_id, run_name=f"sweep-{sweep}", tags={**source_tags(spec_path), **(tags or {}),
        TAG_SWEEP: sweep, TAG_ROLE: "parent", "mlflow.source.git.commit": git_commit(),
        "mlflow.note.content": f"e²KD sweep from {os.path.basename(spec_path)}", **package_versions()})
    log_params(client, run.info.run_id, params)
    if spec_path and os.path.isfile(spec_path):
        with open(spec_path) as f:
            text = f.read()
        with tempfile.TemporaryDirectory() as d:  # the spec as written, credentials masked
            copy = os.path.join(d, os.path.basename(spec_path))
            with open(copy, "w") as f:
                f.write(mask_uri(text))
            client.log_artifact(run.info.run_id, copy, artifact_path="spec")
    return run.info.run_id


def find_child(client: MlflowClient, exp_id: str, parent_id: str, trial_id: str) -> str | None:
    runs = client.search_runs([exp_id], f"{tag_equals(TAG_TRIAL, trial_id)} and {tag_equals(TAG_PARENT, parent_id)}",
                              max_results=2)
    return runs[0].info.run_id if runs else None


def get_or_create_child(uri: str, exp_id: str, parent_id: str, sweep: str, trial_id: str,
                        params: dict[str, Any], tags: dict[str, str], data: DataConfig | None = None) -> str:
    """The one child run of ``trial_id``: found by tag when the trial is retried or the sweep
    resumes, created (with params, the parent's source, and ``data`` as its training dataset)
    otherwise."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run_id = find_child(client, exp_id, parent_id, trial_id)
    if run_id is not None:
        client.set_terminated(run_id, status="RUNNING")
        client.set_tag(run_id, "e2kd.restarts", str(int(client.get_run(run_id).data.tags.get("e2kd.restarts", "0")) + 1))
        return run_id
    source = {k: v for k, v in client.get_run(parent_id).data.tags.items() if k.startswith("mlflow.source.")}
    run = client.create_run(exp_id, run_name=f"trial-{trial_id}", tags={
        **source, TAG_PARENT: parent_id, TAG_SWEEP: sweep, TAG_ROLE: "trial", TAG_TRIAL: trial_id, **tags})
    log_params(client, run.info.run_id, params)
    if data is not None:
        from orchestrator.registry import try_log_datasets

        try_log_datasets(client, run.info.run_id, data, f"trial {trial_id}")
    return run.info.run_id


# ------------------------------------ outages: retry and outbox --------------------------------

T = TypeVar("T")
DEFAULT_RETRY_S = 900.0


def retry(fn: Callable[[], T], what: str, budget_s: float, log: Callable[[str], None] | None = None) -> T:
    """``fn()`` until it succeeds or ``budget_s`` has passed (backoff 1 s doubling to 30 s); the
    last error is raised after that. Only transient errors are retried (the tracking server or the
    storage not answering); anything else is raised at once. MLflow's own HTTP retries (about
    4 minutes for a refused connection) happen inside each call; this loop is for longer outages."""
    deadline, wait, said = time.monotonic() + budget_s, 1.0, False
    while True:
        try:
            return fn()
        except Exception as e:
            if not _transient(e) or time.monotonic() + wait > deadline:
                raise
            if not said:
                (log or print)(f"[e2kd] {what}: MLflow not reachable ({mask_uri(str(e))[:200]}); retrying for up to "
                    f"{budget_s:.0f} s")
                said = True
            time.sleep(wait)
            wait = min(30.0, wait * 2)


def storage_filesystem(storage: str):
    """The filesystem of a sweep's ``storage``: Ray Train checkpoint paths reported to Tune carry no
    scheme (``bucket/prefix/...`` on S3), so they are only meaningful together with it."""
    return storage_fs.filesystem(storage)[0]


class Outbox:
    """A durable, ordered queue of one run's MLflow writes, kept in the run's storage.

    ``put`` writes the payload files first and the record (``<time>-<id>.json``) last, under a
    temporary name renamed into place, so a reader never sees a partial record. ``drain`` sends the
    records oldest first and deletes each once MLflow has it, stopping at the first error. Sending
    a record twice (a crash between send and delete) changes nothing: MLflow drops a metric equal
    in key, value, timestamp and step, and an artifact overwrites its own path."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")

    def put(self, run_id: str, metrics=(), artifacts: dict[str, bytes] | None = None,
            tags: dict[str, str] | None = None, step: int | None = None) -> None:
        fs, root = storage_fs.filesystem(self.uri)
        fs.create_dir(root, recursive=True)
        stem = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        files = {}
        for name, data in (artifacts or {}).items():
            files[name] = f"{stem}.{name}"
            with fs.open_output_stream(f"{root}/{files[name]}") as f:
                f.write(data)
        # metrics: MLflow Metric objects or (key, value, timestamp ms, step) tuples
        record = {"run_id": run_id, "metrics": [[m.key, m.value, m.timestamp, m.step] if hasattr(m, "key") else list(m)
                                                for m in metrics],
                  "artifacts": files, "tags": tags or {}, "step": step}
        tmp = f"{root}/.{stem}.tmp"
        with fs.open_output_stream(tmp) as f:
            f.write(json.dumps(record).encode())
        fs.move(tmp, f"{root}/{stem}.json")

    def pending(self) -> list[str]:
        import pyarrow.fs as pafs

        fs, root = storage_fs.filesystem(self.uri)
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".json")
                      and not i.base_name.startswith("."))

    def drain(self, client: MlflowClient) -> int:
        """Send every pending record; returns how many were sent. Raises on the first MLflow error
        (what is left stays for the next drain)."""
        from mlflow.entities import Metric

        fs, root = storage_fs.filesystem(self.uri)
        sent = 0
        for path in self.pending():
            with fs.open_input_stream(path) as f:
                rec = json.loads(f.read())
            run_id = rec["run_id"]
            if rec["metrics"]:
                client.log_batch(run_id, metrics=[Metric(k, float(v), int(ts), int(step))
                                                  for k, v, ts, step in rec["metrics"]])
            for name, blob in rec["artifacts"].items():
                with tempfile.TemporaryDirectory() as d:
                    local = os.path.join(d, name)  # the artifact keeps its own name, not the blob's
                    with fs.open_input_stream(f"{root}/{blob}") as src, open(local, "wb") as dst:
                        dst.write(src.read())
                    client.log_artifact(run_id, local)
                    if name == PNG_NAME and rec.get("step") is not None:
                        log_step_image(client, run_id, local, int(rec["step"]))
            for k, v in rec["tags"].items():
                client.set_tag(run_id, k, v)
            for blob in rec["artifacts"].values():
                _delete(fs, f"{root}/{blob}")
            _delete(fs, path)
            sent += 1
        return sent


IMAGE_KEY = "explanations"  # the grid's key in the run's Images tab (one image per epoch, with a slider)


def log_step_image(client: MlflowClient, run_id: str, png_path: str, step: int) -> None:
    """The grid again as an MLflow image at ``step`` (the epoch), for the run's image slider; the
    plain ``explanations.png`` stays the latest grid. Skipped when that step is there already (a
    record sent twice must not add a second image)."""
    from PIL import Image

    prefix = f"images/{IMAGE_KEY}+step+{step}+"
    if any(a.path.startswith(prefix) for a in client.list_artifacts(run_id, "images")):
        return
    with Image.open(png_path) as im:
        client.log_image(run_id, im.convert("RGB"), key=IMAGE_KEY, step=step, synchronous=True)


def _delete(fs, path: str) -> None:
    try:
        fs.delete_file(path)
    except FileNotFoundError:  # another drainer (the trial driver, the sweep) got there first
        pass


def outbox_uri(storage: str, train_run_name: str) -> str:
    """Next to the Train run's checkpoints: reachable from the Train controller, the trial driver and
    the sweep process on any node (storage is shared: S3 or a shared mount)."""
    return f"{storage.rstrip('/')}/{train_run_name}/e2kd-mlflow-outbox"


class MlflowEpochCallback(ray.train.UserCallback):
    """Runs in the Ray Train controller: each epoch's rank-0 metrics and the explanation PNG go into
    the run's :class:`Outbox`, and a background thread sends them. The training loop never waits
    for MLflow, and an exception here would become a controller error that Train does not retry,
    so nothing in this callback raises for an MLflow problem.

    Only ``explanations.png`` is read from the checkpoint (through the checkpoint's own filesystem),
    not the whole checkpoint. The thread and client are created lazily because the callback is
    pickled to the controller actor."""

    def __init__(self, tracking_uri: str, run_id: str, outbox: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.outbox = outbox
        self._wake: threading.Event | None = None

    def _kick(self) -> None:
        if self._wake is None:
            self._wake = threading.Event()
            threading.Thread(target=self._send_forever, name="e2kd-mlflow-sender", daemon=True).start()
        self._wake.set()

    def _send_forever(self) -> None:
        from mlflow import MlflowClient

        client, box, wait = MlflowClient(self.tracking_uri), Outbox(self.outbox), 1.0
        while True:
            self._wake.wait()
            self._wake.clear()
            try:
                box.drain(client)
                wait = 1.0
            except Exception as e:  # server down: keep the records, try again later
                print(f"[e2kd] MLflow unreachable, {len(box.pending())} epoch record(s) buffered in {mask_uri(self.outbox)} "
                      f"({mask_uri(str(e))[:200]})")
                time.sleep(wait)
                wait = min(30.0, wait * 2)
                self._wake.set()

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        m = metrics[0]
        step = int(m.get("epoch", 0))
        now = int(time.time() * 1000)
        batch = [(k, float(v), now, step) for k, v in m.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
        artifacts = {}
        if checkpoint is not None:
            try:
                with checkpoint.filesystem.open_input_stream(f"{checkpoint.path.rstrip('/')}/{PNG_NAME}") as f:
                    artifacts[PNG_NAME] = f.read()
            except (FileNotFoundError, OSError):
                pass
        self._put(batch, artifacts, step=step)

    def _put(self, metrics=(), artifacts: dict[str, bytes] | None = None,
             tags: dict[str, str] | None = None, step: int | None = None) -> None:
        try:  # a storage blip is retried; a longer storage outage costs these records, never the run
            retry(lambda: Outbox(self.outbox).put(self.run_id, metrics, artifacts, tags, step),
                  "buffering an epoch record", 120.0)
        except Exception as e:
            print(f"[e2kd] could not buffer an MLflow record in {mask_uri(self.outbox)}: {mask_uri(str(e))[:300]}")
        self._kick()

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        first = next(iter(worker_exceptions.values()), None)
        self._put(tags={"e2kd.last_error": mask_uri(f"{type(first).__name__}: {first}")[:5000]})


class NonFiniteFailFast(ray.train.UserCallback):
    """A NaN/Inf loss is deterministic: restarting the workers from the last checkpoint would hit it
    again. Raising from ``after_exception`` turns the worker error into a controller error, which
    Train's failure policy does not retry, so the run fails at once instead of using up
    ``FailureConfig(max_failures)``. (Here rather than in ``orchestrator.sweep``: the controller
    imports the module of every callback it is given, and this one is light.)"""

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        from trainables.train_loop import NonFiniteLossError

        for rank, e in sorted(worker_exceptions.items()):
            if isinstance(e, NonFiniteLossError):
                raise NonFiniteLossError(f"worker rank {rank}: {e}")


TAG_STOPPED_EARLY = "e2kd.stopped_early"  # "epoch N of M" on a run the scheduler stopped
TAG_KD_ROLE = "e2kd.kd_role"  # a KD run's part in the comparison: baseline | matched | tuned


class MlflowTrialFinalizer(ray.tune.Callback):
    """Runs in the sweep process: sends what is left in each trial's outbox, logs the final student
    from the trial's last checkpoint and closes the child run — FINISHED only when the student is
    in MLflow, FAILED otherwise. ASHA-stopped trials count as finished and are tagged
    ``e2kd.stopped_early``.

    When the tracking server stays down longer than ``retry_s``, the trial is left RUNNING in MLflow
    and the sweep goes on; :meth:`finalize_leftovers` (at the end of the sweep, and again on
    ``--resume``) finalises every child run still RUNNING whose trial has ended."""

    def __init__(self, tracking_uri: str, exp_id: str, parent_id: str, storage: str, sweep: str,
                 retry_s: float = DEFAULT_RETRY_S):
        # No logger attribute: Tune pickles its callbacks with the experiment state.
        self.tracking_uri = tracking_uri
        self.exp_id = exp_id
        self.parent_id = parent_id
        self.storage = storage
        self.sweep = sweep
        self.retry_s = retry_s
        self.server_down = False  # after one exhausted budget, later trials try once, not retry_s each

    def finalize(self, trial_id: str, last_result: dict | None, status: str, error_text: str | None = None) -> None:
        """Raises on an MLflow outage (nothing is closed then); records a bad checkpoint on the run."""
        from mlflow import MlflowClient

        client = MlflowClient(self.tracking_uri)
        run_id = find_child(client, self.exp_id, self.parent_id, trial_id)
        if run_id is None:
            return
        Outbox(outbox_uri(self.storage, train_run_name(self.sweep, trial_id))).drain(client)
        ran, want = (last_result or {}).get("epoch"), client.get_run(run_id).data.params.get("epochs")
        if status == "FINISHED" and ran is not None and want and int(ran) < int(want):
            # ASHA stopped it: FINISHED (its student is logged) but never read as a fully trained run.
            client.set_tag(run_id, TAG_STOPPED_EARLY, f"epoch {int(ran)} of {int(want)}")
        if status == "FINISHED":
            ckpt = (last_result or {}).get("checkpoint_path")
            try:
                if not ckpt:
                    raise FileNotFoundError("the trial reported no checkpoint")
                log_student(self.tracking_uri, run_id, ray.train.Checkpoint(ckpt, storage_filesystem(self.storage)))
            except Exception as e:  # a model that cannot be logged must not fail the sweep
                if _transient(e):
                    raise
                # Never FINISHED without its model: the run says what is missing instead.
                client.set_tag(run_id, "e2kd.model_log_error", mask_uri(str(e))[:5000])
                status = "FAILED"
        if error_text:
            client.set_tag(run_id, "e2kd.error", mask_uri(error_text)[-5000:])
        client.set_terminated(run_id, status=status)

    def _attempt(self, trial_id: str, last_result: dict | None, status: str, error_text: str | None = None) -> None:
        try:
            retry(lambda: self.finalize(trial_id, last_result, status, error_text), f"finalising trial {trial_id}",
                  0.0 if self.server_down else self.retry_s)
            self.server_down = False
        except Exception as e:
            self.server_down = True
            print(f"[e2kd] trial {trial_id}: MLflow unreachable ({mask_uri(str(e))[:200]}); its run is "
                     "finalised at the end of the sweep")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._attempt(trial.trial_id, trial.last_result, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._attempt(trial.trial_id, trial.last_result, "FAILED", _error_text(trial))

    def finalize_leftovers(self, trials) -> list[str]:
        """Finalise the child runs still RUNNING whose trial has ended (TERMINATED or ERROR Tune
        trials); returns the trial ids MLflow could not be told about within ``retry_s``."""
        ended = {t.trial_id: t for t in trials if t.status in ("TERMINATED", "ERROR")}

        def leftovers() -> list[str]:
            from mlflow import MlflowClient

            runs = MlflowClient(self.tracking_uri).search_runs(
                [self.exp_id], f"tags.`{TAG_PARENT}` = '{self.parent_id}' and attributes.status = 'RUNNING'")
            return [t for t in (r.data.tags.get(TAG_TRIAL) for r in runs) if t in ended]

        def finalize_all() -> None:
            for trial_id in leftovers():
                t = ended[trial_id]
                self.finalize(trial_id, t.last_result, "FAILED" if t.status == "ERROR" else "FINISHED",
                              _error_text(t) if t.status == "ERROR" else None)

        try:
            retry(finalize_all, "finalising trials", self.retry_s)
            return []
        except Exception:
            try:
                return leftovers()
            except Exception:
                return sorted(ended)


def _error_text(trial) -> str | None:
    if trial.error_file and os.path.exists(trial.error_file):
        with open(trial.error_file) as f:
            return f.read()
    return None


def _transient(e: BaseException) -> bool:
    """Worth retrying: the tracking server or the storage (S3 answers with OSError) not answering.
    A missing file or a bad checkpoint is not."""
    if isinstance(e, FileNotFoundError):
        return False
    return _is_mlflow_outage(e) or isinstance(e, OSError)


def _is_mlflow_outage(e: BaseException) -> bool:
    """A connection-level failure talking to the tracking server (retried), as opposed to a bad or
    missing checkpoint (recorded on the run)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(e, (requests.exceptions.RequestException, ConnectionError)):
        return True
    # MLflow's REST client wraps connection errors, timeouts and exhausted 5xx retries this way.
    return isinstance(e, MlflowException) and str(e).startswith("API request to") and " failed with " in str(e)


def train_run_name(sweep: str, trial_id: str) -> str:
    """The Ray Train run of one trial: deterministic, so a retried trial or a resumed sweep resumes
    its own Train run from the latest checkpoint instead of starting over."""
    return f"{sweep}-train-{trial_id}"


def log_student(tracking_uri: str, run_id: str, checkpoint: ray.train.Checkpoint) -> None:
    """The checkpoint's student as a pickle-free MLflow model (:func:`orchestrator.registry.log_student`)."""
    from orchestrator.registry import log_student as log

    log(tracking_uri, run_id, checkpoint)


def trial_params(flat: dict[str, Any]) -> dict[str, Any]:
    return {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in flat.items()}
