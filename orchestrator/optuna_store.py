"""The sweep's Optuna study in a real Optuna storage, so Optuna's own tools see it.

Tune's ``OptunaSearch`` keeps its study in memory unless it is given a storage; here every search
phase of a sweep writes its study to an RDB storage (SQLite by default, next to the MLflow store),
named like the phase's Tune experiment (``<sweep>``, ``<sweep>.kd-arm``), so ``optuna-dashboard``
(``e2kd ui --optuna``) and ``optuna.load_study`` open it while the sweep runs and after.

Tune stays the source of truth for what ran: the searcher is still checkpointed with Tune's
experiment state and restored from it. The storage can only be *ahead* of that checkpoint (a
trial asked for after Tune's last save, by a driver that then died); such trials are marked FAIL
with :data:`ORPHAN_ATTR` on restore, so the dashboard shows no trial RUNNING forever and the KD
baseline/grid bookkeeping ignores them.

Credentials: ``search.storage`` may hold ``${VAR}`` placeholders, filled from the environment when
the storage is opened (percent-encoded; ``${VAR}`` alone is a whole URL, taken as is). Only the
template is pickled into Tune's experiment state, and every message masks the URL.
"""
from __future__ import annotations

import os
import re
import urllib.parse
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from orchestrator import tracking

DB_NAME = "optuna.db"
TAG_STORAGE = "e2kd.optuna_storage"  # parent-run tag: the study's storage URL (masked)
TAG_OBJECTIVES = "e2kd.objectives"  # parent-run tag: "metric:mode,metric:mode" of a multi-objective search
ORPHAN_ATTR = "e2kd.orphaned"  # a trial the storage holds but Tune's restored state never asked for
FIELD = "search.storage"
# SQLAlchemy dialects Optuna's RDBStorage supports (a "+driver" suffix is allowed: postgresql+psycopg2)
DIALECTS = ("sqlite", "postgresql", "mysql")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


# ------------------------------------ where the study lives ---------------------------------


def default_url(storage: str, tracking_uri: str) -> str:
    """SQLite beside ``mlflow.db`` when MLflow is a SQLite file, else inside the sweep's local
    ``storage``, else (both remote: a cluster job, whose working directory is a temporary copy) in
    ``~/.e2kd`` of the machine running the sweep driver (the head)."""
    db = tracking.sqlite_path(tracking_uri)
    if db:
        folder = os.path.dirname(db)
    elif "://" not in storage:
        folder = os.path.abspath(storage)
    else:
        folder = os.path.join(os.path.expanduser("~"), ".e2kd")
    return "sqlite:///" + os.path.join(folder, DB_NAME)


def storage_url(spec, tracking_uri: str | None = None) -> str:
    """The study's storage URL (a template: ``${VAR}`` not yet filled)."""
    if spec.search.storage:
        return tracking.absolute_sqlite(spec.search.storage)  # relative: like mlflow's
    uri = tracking.resolve_tracking_uri(tracking_uri or spec.mlflow.tracking_uri)
    return default_url(spec.storage, uri)


def expand(template: str, field: str = FIELD) -> str:
    """Fill ``${VAR}`` from the environment (a missing variable is an error naming it, never its value)."""
    whole = _ENV.fullmatch(template)
    missing = [m.group(1) for m in _ENV.finditer(template) if m.group(1) not in os.environ]
    if missing:
        raise ValueError(f"{field}: environment variable {missing[0]} is not set (it fills ${{{missing[0]}}} in "
                         f"{tracking.mask_uri(template)})")
    if whole:
        url = os.environ[whole.group(1)]
    else:
        url = _ENV.sub(lambda m: urllib.parse.quote(os.environ[m.group(1)], safe=""), template)
    # RDBStorage runs str.format on the URL (its {SCHEMA_VERSION} template): keep braces literal.
    return url.replace("{", "{{").replace("}", "}}")


def check_url(template: str, field: str = FIELD) -> str:
    """Syntax, dialect and driver of a storage URL, and for SQLite a folder that can hold the file;
    nothing is created. Returns the expanded URL."""
    import sqlalchemy

    url = expand(template, field)
    shown = tracking.mask_uri(template)
    try:
        parsed = sqlalchemy.engine.make_url(url.replace("{{", "{").replace("}}", "}"))
    except Exception:  # noqa: BLE001 - SQLAlchemy's parse errors have no common base worth naming
        raise ValueError(f"{field}: {shown!r} is not a database URL (e.g. sqlite:///optuna.db, "
                         "postgresql://user@host:5432/optuna with the password in ${VAR})") from None
    dialect = parsed.get_backend_name()
    if dialect not in DIALECTS:
        raise ValueError(f"{field}: {shown!r}: Optuna's RDB storage takes {', '.join(DIALECTS)} URLs, not {dialect!r}")
    try:
        parsed.get_dialect().import_dbapi()
    except ImportError as e:
        raise ValueError(f"{field}: {shown!r}: the database driver is not installed ({e.name or e}); "
                         f"pip install it next to e2kd") from None
    if dialect == "sqlite":
        path = parsed.database
        if not path or path == ":memory:":
            raise ValueError(f"{field}: {shown!r}: an in-memory SQLite database dies with the sweep; give a file")
        if os.path.isdir(path):
            raise ValueError(f"{field}: {path} is a directory, not a SQLite file")
        if os.path.exists(path):
            if not os.access(path, os.W_OK):
                raise PermissionError(f"{field}: {path} is not writable")
        else:
            tracking.check_writable(field, os.path.dirname(path) or ".")
    return url


def check_reachable(template: str, timeout_s: float = 10.0, field: str = FIELD) -> None:
    """A database server answers (SQLite: nothing to reach)."""
    import sqlalchemy

    url = check_url(template, field)
    if url.startswith("sqlite"):
        return

    def connect() -> None:
        engine = sqlalchemy.create_engine(url.replace("{{", "{").replace("}}", "}"))
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()

    try:
        tracking._call_with_deadline(connect, timeout_s, f"{field} {tracking.mask_uri(template)}")
    except Exception as e:  # noqa: BLE001 - any driver error is the user's to fix
        raise ConnectionError(f"{field}: cannot connect to {tracking.mask_uri(template)}: "
                              f"{tracking.short(str(e), 300)}") from None


class EnvRDBStorage(RDBStorage):
    """Optuna's RDBStorage opened from a URL template: only the template is pickled (Tune saves
    the searcher, and the study with it, in its experiment state), the credentials are read from
    the environment again when it is unpickled."""

    def __init__(self, template: str, **kwargs: Any):
        self.template = template
        super().__init__(expand(template), **kwargs)

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state["url"] = None
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        state = dict(state)
        state["url"] = self._fill_storage_url_template(expand(state["template"]))
        super().__setstate__(state)


def open_storage(template: str) -> EnvRDBStorage:
    url = expand(template)  # a missing variable: its own message
    try:
        if (db := tracking.sqlite_path(url)) is not None:  # SQLite makes the file, not its folder
            os.makedirs(os.path.dirname(db) or ".", exist_ok=True)
        return EnvRDBStorage(template)
    except Exception as e:  # noqa: BLE001 - SQLAlchemy/driver errors: name the field, mask the URL
        raise ConnectionError(f"{FIELD}: cannot open the Optuna storage {tracking.mask_uri(template)}: "
                              f"{tracking.short(str(e), 300)}") from None


def study_name(tune_name: str) -> str:
    """A phase's study is named like its Tune experiment (``<sweep>``, ``<sweep>.kd-arm``)."""
    return tune_name


def study_exists(storage, name: str) -> bool:
    return any(s.study_name == name for s in storage.get_all_studies())


def delete_study(storage, name: str) -> None:
    optuna.delete_study(study_name=name, storage=storage)


# ------------------------------------ keeping it in step with Tune --------------------------


def mark_orphans(study: optuna.Study, known: set[int]) -> list[int]:
    """RUNNING trials of ``study`` whose storage id is not in ``known`` (the trials the restored
    searcher holds) -> FAIL, tagged :data:`ORPHAN_ATTR`. Returns their numbers."""
    storage = study._storage
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        if t._trial_id in known:
            continue
        storage.set_trial_user_attr(t._trial_id, ORPHAN_ATTR, True)
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        out.append(t.number)
    return out


def counts(t) -> bool:
    """Whether a study trial counts for the sweep's bookkeeping (KD baseline, grid slots)."""
    return not t.user_attrs.get(ORPHAN_ATTR)


class StoredOptunaSearch(OptunaSearch):
    """OptunaSearch whose study lives in an RDB storage: on Tune's restore, trials the storage holds
    beyond the restored searcher's checkpoint are marked orphaned (see the module docstring)."""

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        if self._ot_study is not None and self._storage is not None:
            mark_orphans(self._ot_study, {t._trial_id for t in self._ot_trials.values()})


# ------------------------------------ preflight and the dashboard ----------------------------


def preflight(spec, tracking_uri: str | None = None) -> None:
    """Before Ray starts: the study's storage URL is valid, its driver installed, a SQLite file can
    be made, a database server answers — every error one line naming ``search.storage``."""
    template = storage_url(spec, tracking_uri)
    check_url(template)
    if spec.search.storage:
        check_reachable(template)


def serve_dashboard(template: str, host: str, port: int, log=print) -> int:
    """optuna-dashboard for the storage ``template`` on ``host:port`` (blocks until Ctrl-C). The
    URL is handed over in-process, never on a command line (``ps`` would show a password)."""
    import optuna_dashboard

    url = check_url(template, "--optuna-storage")
    db = tracking.sqlite_path(url)
    if db is not None and not os.path.isfile(db):  # read-only: never create an empty storage
        raise FileNotFoundError(f"--optuna-storage: no Optuna storage at {db} (no sweep has run with it yet); pass "
                                "the storage your sweep used (its log line `Optuna study … in …` names it)")
    storage = open_storage(template)
    names = [s.study_name for s in storage.get_all_studies()]
    log(f"[e2kd] optuna-dashboard at http://{host}:{port} (storage {tracking.mask_uri(template)}; studies: "
        f"{', '.join(names) if names else 'none yet'}); Ctrl-C to stop")
    try:
        optuna_dashboard.run_server(storage, host=host, port=port)
    except KeyboardInterrupt:
        return 0
    return 0
