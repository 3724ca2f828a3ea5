"""Sweep specs: YAML files validated into typed, frozen dataclasses before any Ray work starts.

A spec's top level holds the run's :class:`~trainables.config.TrainConfig` fields (``student``,
``epochs``, ``data``, ``teacher``, ``loss``, ``optim``, …) plus the sweep-only sections
(``search``, ``resources``, ``mlflow``, ``teacher_training``). Search-space keys and ``--set``
overrides use the same dotted names (``loss.lam``, ``optim.lr``, ``seed``), so a key means the same
thing everywhere. Every error names the file and the field.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml

from trainables.config import TrainConfig, flatten

# ------------------------------------ sweep-only sections -----------------------------------


@dataclass(frozen=True)
class ParamSpec:
    """One search-space entry.

    ``loguniform``/``uniform``: ``low``/``high`` floats; ``int``: integer range (inclusive), ``log``
    optional; ``choice``: ``values``. ``when: {other.key: value | [values]}`` makes the entry
    conditional (define-by-run): it is only sampled when the other parameter took that value.
    """

    type: Literal["loguniform", "uniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] | None = None
    log: bool = False
    when: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.type == "choice":
            if not self.values:
                raise ValueError("a choice entry needs a non-empty 'values' list")
            bad = [v for v in self.values if v is not None and not isinstance(v, (bool, int, float, str))]
            if bad:  # Optuna's suggest_categorical takes None/bool/int/float/str only
                raise ValueError(f"choice 'values' must be numbers, strings, booleans or null, got {show(bad[0])}")
            return
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} entry needs 'low' and 'high'")
        for k in ("low", "high"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or math.isinf(v):
                raise ValueError(f"'{k}' must be a finite number, got {show(v)}")
        if not self.low < self.high:
            raise ValueError(f"'low' ({self.low}) must be < 'high' ({self.high})")
        if self.type == "int":
            for k in ("low", "high"):
                v = getattr(self, k)
                if not float(v).is_integer():
                    raise ValueError(f"an int entry needs integer '{k}', got {show(v)}")
                object.__setattr__(self, k, int(v))
        if (self.type == "loguniform" or self.log) and self.low <= 0:
            raise ValueError(f"a log-scale range needs low > 0, got {self.low}")


@dataclass(frozen=True)
class Objective:
    """One objective of a multi-objective search (``search.objectives``)."""

    metric: str
    mode: Literal["max", "min"] = "max"


@dataclass(frozen=True)
class SearchConfig:
    num_trials: int = 8  # including the KD baseline
    metric: str = "val_agreement"
    mode: Literal["max", "min"] = "max"
    # Multi-objective search (e.g. accuracy vs explanation fidelity): Optuna's sampler is told every
    # objective, `e2kd report` shows the Pareto front. The first objective is the primary one
    # (search.metric/mode become it: the KD-vs-best-e²KD table ranks by it). Needs scheduler: none
    # (ASHA stops trials on one metric).
    objectives: tuple[Objective, ...] = ()
    # auto: "grid" when every entry is a `choice` (each configuration once, in a seeded order: a
    # sampler would repeat some — TPE on a 4×2 grid does), "tpe" otherwise. nsga2: Optuna's
    # NSGA-II (multi-objective, genetic).
    sampler: Literal["auto", "tpe", "random", "grid", "nsga2"] = "auto"
    # The Optuna study's storage (an RDB URL: sqlite:///…, postgresql://…, mysql://…; ${VAR} is
    # filled from the environment, so a password need not be written here). null: SQLite optuna.db
    # beside a SQLite mlflow.db, else inside a local `storage`, else in the working directory.
    storage: str | None = None
    n_startup_trials: int = 10  # TPE: random trials before the model-based ones (Optuna's default)
    seed: int = 0
    space: dict[str, ParamSpec] = field(default_factory=dict)
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = 2  # ASHA: epochs every trial gets before it can be stopped
    reduction_factor: int = 3
    baseline: bool = True  # evaluate plain KD (loss.lam = 0) as the first trial
    # How KD is tuned against e²KD. "baseline": one KD trial at the spec's settings (plus, after the
    # search, one KD run at the best e²KD trial's settings when they differ, so the report always
    # compares like with like). "tuned": KD gets the e²KD search's budget over the same space
    # without λ (its own Optuna search, run after the e²KD one); the report then also shows best KD
    # vs best e²KD at equal budgets.
    kd_arm: Literal["baseline", "tuned"] = "baseline"

    def __post_init__(self) -> None:
        if self.num_trials < 1:
            raise ValueError(f"search.num_trials must be >= 1, got {self.num_trials}")
        if not self.space:
            raise ValueError("search.space is empty: give at least one parameter to search (e.g. loss.lam)")
        if self.grace_period < 1 or self.reduction_factor < 2:
            raise ValueError("search.grace_period must be >= 1 and search.reduction_factor >= 2")
        if self.n_startup_trials < 0:
            raise ValueError(f"search.n_startup_trials must be >= 0, got {self.n_startup_trials}")
        if not 0 <= self.seed < 2**32:  # numpy's seed range (Optuna's samplers)
            raise ValueError(f"search.seed must be in [0, 2**32), got {self.seed}")
        if self.kd_arm == "tuned" and not self.baseline:
            raise ValueError("search.kd_arm: tuned needs search.baseline: true (the KD arm starts at the spec's settings)")
        if self.storage is not None and not self.storage.strip():
            raise ValueError("search.storage must not be empty (null: the default SQLite file)")
        if self.objectives:
            metrics = [o.metric for o in self.objectives]
            if len(metrics) < 2:
                raise ValueError("search.objectives needs at least 2 objectives (one metric: use search.metric/mode)")
            if len(set(metrics)) != len(metrics):
                raise ValueError(f"search.objectives: each metric once, got {', '.join(metrics)}")
            if self.metric not in ("val_agreement", metrics[0]):
                raise ValueError(f"search.metric: {self.metric!r} differs from the first of search.objectives "
                                 f"({metrics[0]!r}), which is the primary metric; drop search.metric")
            if self.scheduler == "asha":
                raise ValueError("search.scheduler: asha stops trials on one metric and cannot rank them on "
                                 f"{len(metrics)} objectives; set scheduler: none with search.objectives")
            object.__setattr__(self, "metric", metrics[0])
            object.__setattr__(self, "mode", self.objectives[0].mode)

    @property
    def grid(self) -> bool:
        """Whether trials enumerate the space instead of sampling it (see ``sampler``)."""
        if self.sampler == "auto":
            return all(p.type == "choice" for p in self.space.values())
        return self.sampler == "grid"

    def configurations(self, keys: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        """Every configuration of an all-`choice` space (entries under ``when`` only where active),
        in a fixed order. ``keys``: enumerate only these entries."""
        keys = tuple(self.space) if keys is None else keys
        order = sorted(keys, key=lambda k: len(self.space[k].when or {}))
        out: list[dict[str, Any]] = [{}]
        for key in order:
            p = self.space[key]
            nxt = []
            for c in out:
                if all(c.get(o) in (w if isinstance(w, (list, tuple)) else [w]) for o, w in (p.when or {}).items()):
                    nxt += [{**c, key: v} for v in p.values]
                else:
                    nxt.append(c)
            out = nxt
        return out


DRIVER_RESOURCE_AMOUNT = 0.01  # of resources.driver_resource per trial driver


@dataclass(frozen=True)
class ResourcesConfig:
    workers_per_trial: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    driver_cpus: float = 0.25  # the Tune function trainable that drives one TorchTrainer
    max_concurrent_trials: int | None = None  # None: derived from the cluster's resources
    num_cpus: int | None = None  # logical CPUs for a local Ray instance (None: Ray's default)
    driver_resource: str | None = None  # custom resource pinning driver fns to safe (non-spot) nodes
    # How one trial's Train workers are placed (ray.train.ScalingConfig.placement_strategy):
    # STRICT_SPREAD puts every worker on a different node.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Custom Ray resources each Train worker needs besides CPU/GPU, e.g. {"accelerator_type:A10G": 0.01}
    # or a node type's own resource: trials then run only on nodes that have it.
    worker_resources: dict[str, float] = field(default_factory=dict)
    # How long a trial's Train worker group may wait for its nodes (Ray Train's
    # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s by default). null: 1800 s where an autoscaler can
    # add nodes (GPU nodes take 10-20 min to boot), 300 s on a fixed cluster or a local instance.
    start_timeout_s: float | None = None
    # How often a trial's Ray Train controller polls its workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S,
    # 2 s by default). Each poll takes one report per worker, so an epoch shorter than this waits.
    poll_s: float = 0.5

    def __post_init__(self) -> None:
        if self.workers_per_trial < 1:
            raise ValueError(f"resources.workers_per_trial must be >= 1, got {self.workers_per_trial}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0 or self.driver_cpus < 0:
            raise ValueError("resources.cpus_per_worker, gpus_per_worker and driver_cpus must be >= 0")
        if not 0 < self.poll_s <= 60:
            raise ValueError(f"resources.poll_s must be in (0, 60] seconds, got {self.poll_s}")
        if self.start_timeout_s is not None and not self.start_timeout_s > 0:
            raise ValueError(f"resources.start_timeout_s must be > 0 seconds (or null), got {self.start_timeout_s}")
        bad = {k: v for k, v in self.worker_resources.items() if k in ("CPU", "GPU") or not v > 0}
        if bad:
            raise ValueError(f"resources.worker_resources: {bad}: custom resources need a value > 0; give CPU and GPU "
                             "with cpus_per_worker / gpus_per_worker")
        for f in ("max_concurrent_trials", "num_cpus"):
            v = getattr(self, f)
            if v is not None and v < 1:
                raise ValueError(f"resources.{f} must be >= 1 (or null), got {show(v)}")

    @property
    def cpus_per_trial(self) -> float:
        """What one trial holds: its Train workers plus the Tune function that drives them."""
        return self.workers_per_trial * self.cpus_per_worker + self.driver_cpus

    @property
    def gpus_per_trial(self) -> float:
        return self.workers_per_trial * self.gpus_per_worker if self.use_gpu else 0.0

    def trial_needs(self) -> dict[str, float]:
        """Every Ray resource one trial holds (its Train workers and its driver), by name."""
        need = {"CPU": self.cpus_per_trial, "GPU": self.gpus_per_trial,
                **{k: self.workers_per_trial * v for k, v in self.worker_resources.items()}}
        if self.driver_resource:
            need[self.driver_resource] = need.get(self.driver_resource, 0.0) + DRIVER_RESOURCE_AMOUNT
        return {k: v for k, v in need.items() if v > 0}


@dataclass(frozen=True)
class MlflowConfig:
    tracking_uri: str = "sqlite:///mlflow.db"  # relative sqlite paths resolve against the working dir
    experiment: str = "e2kd"
    artifact_location: str | None = None  # None: ./mlartifacts next to a sqlite store
    # How long a trial (at its start and end) and the sweep wait for a tracking server that stopped
    # answering. Per-epoch records never wait: they are buffered in the trial's storage and sent
    # when the server is back.
    retry_s: float = 900.0

    def __post_init__(self) -> None:
        if not self.tracking_uri or not self.experiment:
            raise ValueError("mlflow.tracking_uri and mlflow.experiment must not be empty")
        if not self.retry_s >= 0:
            raise ValueError(f"mlflow.retry_s must be >= 0 seconds, got {self.retry_s}")


@dataclass(frozen=True)
class TeacherTrainingConfig:
    """How ``e2kd teacher`` (and a sweep whose teacher is missing) trains the teacher."""

    epochs: int = 15
    lr: float = 2e-3
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"teacher_training.seed must be in [0, 2**32), got {self.seed}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("teacher_training.epochs and batch_size must be >= 1 and teacher_training.lr > 0")


@dataclass(frozen=True)
class SweepSpec:
    name: str
    train: TrainConfig
    storage: str = "runs"  # Ray Tune results: local path or a pyarrow URI (s3://…, gs://…)
    max_failures: int = 1  # trial-level retries (Tune) and worker-level restarts (Train)
    search: SearchConfig = field(default_factory=SearchConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    # How to train a missing teacher. None (the section absent, as in the cluster specs): a missing
    # teacher is an error, never trained on the head's CPU by accident.
    teacher_training: TeacherTrainingConfig | None = None
    source: str = ""  # the file the spec came from (not a YAML key)

    def __post_init__(self) -> None:
        # The name becomes a directory under ``storage`` and an MLflow filter value: no path
        # separators, no quotes.
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"name {show(self.name)} must be 1-100 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
        if not self.storage:
            raise ValueError("storage must not be empty")
        if self.max_failures < -1:
            raise ValueError(f"max_failures must be >= -1 (-1: retry forever), got {self.max_failures}")

    def params(self) -> dict[str, Any]:
        """Flat dotted-key view of the trial configuration (for MLflow params)."""
        return flatten(self.train)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class SpecError(ValueError):
    """A spec problem, with the file and the dotted field in the message."""


# What the loader accepts: a spec is a few KB of YAML. Beyond these a file is refused before it
# is converted, so neither memory nor an error message can grow with what an attacker wrote.
MAX_SPEC_BYTES = 1 << 20  # the file
MAX_DEPTH = 20  # nested mappings/lists
MAX_NODES = 20_000  # values after alias expansion (a "billion laughs" file is ~1 KB of YAML)
MAX_SHOW = 120  # characters of a bad value echoed in a message
MAX_OVERRIDE = 10_000  # characters of one --set key=value

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxdict, _repr.maxlist, _repr.maxtuple = 2, 4, 4, 4
_repr.maxstring, _repr.maxother, _repr.maxlong = 60, 60, 40


def show(value: Any, limit: int = MAX_SHOW) -> str:
    """A bounded repr of a user-supplied value for an error message (never the whole value)."""
    try:
        text = _repr.repr(value)
    except Exception:  # noqa: BLE001 - a repr must never be the error
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 1] + "…"


class _SpecLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys (YAML says they are an error; PyYAML keeps
    the last one silently, which would turn ``loss: {lam: 1, lam: 0}`` into a KD run) and
    bounds nesting depth."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:  # the keys as written: a merge (<<) may be overridden
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                try:
                    key = self.construct_object(key_node, deep=True)
                    hash(key)
                except (TypeError, yaml.constructor.ConstructorError):
                    continue  # an unhashable key: SafeLoader's own error follows
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {show(key)} (first at line {seen[key].line + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def safe_load(text: str, name: str = "<string>") -> Any:
    """Parse spec YAML (a file or a ``--set`` value): safe tags only, no duplicate keys, bounded
    size, depth and alias expansion. Raises yaml.YAMLError / ValueError / RecursionError."""
    if len(text) > MAX_SPEC_BYTES:
        raise ValueError(f"{len(text)} characters, more than the {MAX_SPEC_BYTES} a spec may have")
    loader = _SpecLoader(text)
    loader.name = name  # marks ("in <file>, line 3") name the file, as yaml.safe_load(open(f)) did
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        _check_node(root)
        return loader.construct_document(root)
    finally:
        loader.dispose()


def _check_node(root) -> None:
    """Depth and expanded size of a composed YAML graph (aliases count every time they are used),
    checked before anything is constructed."""
    budget = MAX_NODES
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        budget -= 1
        if budget < 0:
            raise ValueError(f"more than {MAX_NODES} values once aliases are expanded")
        if depth > MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels (line {node.start_mark.line + 1})")
        if isinstance(node, yaml.SequenceNode):
            stack.extend((n, depth + 1) for n in node.value)
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                stack.extend(((k, depth + 1), (v, depth + 1)))


_SWEEP_SECTIONS = {"name", "storage", "max_failures", "search", "resources", "mlflow", "teacher_training"}
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


# ------------------------------------ typed conversion --------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _message(e: Exception) -> str:
    """The text of a validation error (a KeyError's str() is the repr of its message)."""
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def _in_section(where: str, msg: str) -> str:
    """A section's own validation message, prefixed with the section unless it already names a
    field in it (``loss.lam must be >= 0``, not ``loss: loss.lam must be >= 0``)."""
    if not where:  # top-level checks name their field themselves
        return msg
    return msg if msg.startswith(f"{where}.") or msg.startswith(f"{where}:") else f"{where}: {msg}"


def convert(tp: Any, value: Any, where: str) -> Any:
    """Convert YAML data to ``tp`` (dataclass, Literal, Optional, tuple, dict, scalar), raising
    SpecError naming ``where`` on any mismatch."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return convert(a, value, where)
            except SpecError as e:
                errors.append(str(e))
        raise SpecError(errors[0] if len(errors) == 1 else f"{where}: {show(value)} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise SpecError(f"{where}: {show(value)} is not one of {', '.join(map(repr, typing.get_args(tp)))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SpecError(f"{where}: expected a mapping, got {type(value).__name__} {show(value)}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp) if f.init}
        unknown = sorted(set(value) - names, key=str)
        if unknown:
            raise SpecError(f"{where + '.' if where else ''}{show(unknown[0]) if not isinstance(unknown[0], str) or len(unknown[0]) > 60 else unknown[0]}: unknown field; known fields here: "
                            f"{', '.join(sorted(names))}")
        kwargs = {k: convert(hints[k], v, f"{where + '.' if where else ''}{k}") for k, v in value.items()}
        try:
            return tp(**kwargs)
        except SpecError:
            raise
        except (ValueError, TypeError, KeyError) as e:
            raise SpecError(_in_section(where, _message(e))) from None
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"{where}: expected a list, got {show(value)}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise SpecError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args or [Any] * len(value), value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{where}: expected a mapping, got {show(value)}")
        _, vt = typing.get_args(tp)
        return {str(k): convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{where}: expected true/false, got {show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{where}: expected an integer, got {show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "1e-3" as a string; accept numeric strings, reject the rest.
            try:
                value = float(value) if isinstance(value, str) else value
            except ValueError:
                pass
            if not isinstance(value, float):
                raise SpecError(f"{where}: expected a number, got {show(value)}")
        value = float(value)
        if math.isnan(value) or math.isinf(value):
            raise SpecError(f"{where}: must be a finite number, got {value}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise SpecError(f"{where}: expected a string, got {show(value)}")
        return value
    raise SpecError(f"{where}: unsupported type {tp}")


# ------------------------------------ loading -----------------------------------------------


def parse_override(text: str) -> tuple[str, Any]:
    """``dotted.key=value`` with the value parsed as YAML (``3``, ``1e-3``, ``[a, b]``, ``null``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {show(text)}: expected dotted.key=value")
    if len(text) > MAX_OVERRIDE:
        raise SpecError(f"--set {show(text)}: {len(text)} characters, more than the {MAX_OVERRIDE} an override may have")
    try:
        value = safe_load(raw, "<--set value>")
    except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: e.g. the date 2024-02-30
        raise SpecError(f"--set {show(text)}: value is not valid YAML: {_bounded(e)}") from None
    return key.strip(), value


def _bounded(e: BaseException, limit: int = 300) -> str:
    """An exception's text on one line, at most ``limit`` characters. A YAML error is told by its
    problem and line/column (not PyYAML's text, which repeats the file name and quotes the input)."""
    if isinstance(e, yaml.MarkedYAMLError):
        where = lambda m: f"line {m.line + 1}, column {m.column + 1}" if m is not None else ""  # noqa: E731
        text = f"{e.problem or 'error'} at {where(e.problem_mark)}" if e.problem_mark else str(e.problem or e)
        if e.context:
            text += f" ({e.context}{' at ' + where(e.context_mark) if e.context_mark else ''})"
        e = text
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = data
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise SpecError(f"--set {show(key)}: {show(p)} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def _resolve_paths(train: dict, base: str) -> None:
    """Relative local paths become absolute (workers do not share the driver's working dir)."""
    def absolute(p: Any) -> Any:
        return p if not isinstance(p, str) or "://" in p or os.path.isabs(p) else os.path.normpath(os.path.join(base, p))

    for section, key in (("teacher", "path"), ("teacher", "cache_dir"), ("data", "root")):
        if isinstance(train.get(section), dict) and train[section].get(key):
            train[section][key] = absolute(train[section][key])
    if train.get("student_weights"):
        train["student_weights"] = absolute(train["student_weights"])


def load_spec(path: str, overrides: list[str] | tuple[str, ...] = ()) -> SweepSpec:
    """Read, override, validate. Raises SpecError('<file>: <field>: <problem>')."""
    if os.path.isdir(path):
        raise SpecError(f"{path}: is a directory, not a spec file")
    if not os.path.isfile(path):
        raise SpecError(f"spec file not found: {path}")
    if os.path.getsize(path) > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: {os.path.getsize(path)} bytes, more than the {MAX_SPEC_BYTES} a spec may have")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_SPEC_BYTES + 1)
        data = safe_load(text, path)
    except (OSError, UnicodeDecodeError) as e:  # before ValueError: UnicodeDecodeError is one
        raise SpecError(f"{path}: cannot read the spec: {_bounded(e)}") from None
    except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: e.g. the date 2024-02-30
        raise SpecError(f"{path}: not valid YAML: {_bounded(e)}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: the spec must be a mapping of fields, got {type(data).__name__}")
    try:
        for o in overrides:
            key, value = parse_override(o)
            _set_dotted(data, key, value)
        return spec_from_dict(data, source=os.path.abspath(path), base=os.getcwd())
    except SpecError as e:
        raise SpecError(f"{path}: {_bounded(e, 1000)}") from None


def _crop_scale_preset(train: dict) -> None:
    """A spec that gives no ``data.crop_scale`` gets its dataset's preset (the paper code's:
    ImageNet/VOC 0.08-1, Waterbirds 0.7-1), not the field default meant for digits."""
    from trainables.data.base import DATASETS

    d = train.get("data")
    if isinstance(d, dict) and "crop_scale" not in d and isinstance(d.get("name"), str) and d["name"] in DATASETS:
        train["data"] = {**d, "crop_scale": list(DATASETS[d["name"]].default_crop_scale)}


def spec_from_dict(data: dict, source: str = "", base: str | None = None) -> SweepSpec:
    data = dict(data)
    unknown = sorted(set(data) - _SWEEP_SECTIONS - _TRAIN_FIELDS, key=str)
    if unknown:
        raise SpecError(f"{unknown[0] if isinstance(unknown[0], str) and len(unknown[0]) <= 60 else show(unknown[0])}: "
                        "unknown field; known top-level fields: "
                        f"{', '.join(sorted(_SWEEP_SECTIONS | _TRAIN_FIELDS))}")
    if "name" not in data:
        raise SpecError("name: missing (every sweep needs a name; it names the Ray experiment and MLflow parent run)")
    train = {k: data.pop(k) for k in list(data) if k in _TRAIN_FIELDS}
    if base is not None:
        _resolve_paths(train, base)
    _crop_scale_preset(train)
    # The trial fields sit at the top level of the YAML: convert them there, so messages name
    # ``optim.lr``, not ``train.optim.lr``.
    train_cfg = convert(TrainConfig, train, "")
    data["train"] = {}
    spec: SweepSpec = convert(SweepSpec, data, "")
    spec = dataclasses.replace(spec, train=train_cfg, source=source)
    check_search_space(spec)
    check_layout(spec)
    return spec


def check_layout(spec: SweepSpec) -> None:
    """How one trial's batch is laid out over its workers must keep the recipe."""
    r, t = spec.resources, spec.train
    if t.batch_size % r.workers_per_trial:
        raise SpecError(f"batch_size: {t.batch_size} does not split evenly over resources.workers_per_trial="
                        f"{r.workers_per_trial} workers (the global batch would change)")
    if t.sync_bn is True and r.workers_per_trial > 1 and not r.use_gpu:
        raise SpecError("sync_bn: true needs resources.use_gpu: true (PyTorch's SyncBatchNorm runs on GPUs only); "
                        "use sync_bn: auto, or workers_per_trial: 1")


def check_search_space(spec: SweepSpec) -> None:
    """Every search key must be a TrainConfig field, and every value it can take must validate."""
    from trainables.config import with_overrides

    keys = set(flatten(spec.train))
    for key, p in spec.search.space.items():
        where = f"search.space.{key}"
        if key not in keys:
            raise SpecError(f"{where}: not a trial field; searchable fields: {', '.join(sorted(keys))}")
        candidates = list(p.values) if p.type == "choice" else [p.low, p.high]
        if p.type == "int":
            candidates = [int(p.low), int(p.high)]
        for v in candidates:
            try:
                with_overrides(spec.train, {key: v})
            except (ValueError, TypeError, KeyError) as e:
                raise SpecError(f"{where}: value {show(v)} is invalid: {_message(e)}") from None
        for cond in (p.when or {}):
            if cond == key:
                raise SpecError(f"{where}.when: an entry cannot depend on itself")
            if cond not in spec.search.space:
                raise SpecError(f"{where}.when: {show(cond)} is not a search-space key")
    s = spec.search
    if s.grid:
        if not_choice := [k for k, p in s.space.items() if p.type != "choice"]:
            raise SpecError(f"search.sampler: grid enumerates `choice` entries only; {', '.join(not_choice)} "
                            "is a range (use sampler: tpe or random, or list its values)")
        n = len(s.configurations())
        budget = s.num_trials - (1 if s.baseline else 0)
        if budget > n:
            raise SpecError(f"search.num_trials: {s.num_trials} trials{' (1 KD baseline + ' + str(budget) + ' e²KD)' if s.baseline else ''} "
                            f"but the all-`choice` space has {n} configurations, each run once; set num_trials <= "
                            f"{n + (1 if s.baseline else 0)}")
    if s.kd_arm == "tuned":
        if "loss.lam" not in s.space:
            raise SpecError("search.kd_arm: tuned compares tuned KD with tuned e²KD: search.space needs loss.lam")
        if len(s.space) < 2:
            raise SpecError("search.kd_arm: tuned needs a searched field besides loss.lam (the KD arm searches the "
                            "space without λ); with λ alone, kd_arm: baseline is the fair comparison")
        if any("loss.lam" in (p.when or {}) for p in s.space.values()):
            raise SpecError("search.kd_arm: tuned: no entry may depend on loss.lam (the KD arm has no λ)")
    from trainables.data.base import family

    # The family's declared splits: no disk access, so cluster specs validate on a laptop.
    try:
        fam = family(spec.train.data)
    except (ValueError, KeyError) as e:
        raise SpecError(_in_section("data", str(e))) from None
    try:
        splits = spec.train.eval_splits or fam.available_eval_splits(spec.train.data)
    except OSError:  # data not on this machine (a cluster spec): the family's declared splits
        splits = fam.eval_splits
    except ValueError as e:  # e.g. voc without data.root
        raise SpecError(_in_section("data", str(e))) from None
    if spec.search.objectives:
        for i, o in enumerate(spec.search.objectives):
            _check_metric(spec, fam, splits, o.metric, f"search.objectives[{i}].metric")
    else:
        _check_metric(spec, fam, splits, spec.search.metric, "search.metric")


def _check_metric(spec: SweepSpec, fam, splits, metric: str, where: str) -> None:
    """``metric`` is one a trial reports in every epoch (what Tune and Optuna are told)."""
    if not any(metric.startswith(f"{s}_") for s in (*splits, "train")):
        raise SpecError(f"{where}: {show(metric)} is not reported; metrics are <split>_<name> "
                        f"with split in {', '.join(splits)} (e.g. val_agreement, val_acc)")
    # Tune needs the metric in every epoch's report: only the selection split is (eval.val_every).
    select = "val" if "val" in splits else splits[0]
    split = next(s for s in sorted((*splits, "train"), key=len, reverse=True) if metric.startswith(f"{s}_"))
    if split not in (select, "train"):
        raise SpecError(f"{where}: {show(metric)} is measured on {split!r}, which is evaluated at the "
                        f"end only (eval.test_every); search on {select!r} (e.g. {select}_agreement), and read "
                        f"{split} in the report")
    names = reported_metrics(fam, split)
    if metric not in names:
        raise SpecError(f"{where}: {show(metric)} is not reported on {split!r} for "
                        f"{spec.train.data.name}; reported: {', '.join(sorted(names))}")


def reported_metrics(fam, split: str) -> set[str]:
    """The metric names a trial reports for ``split`` (``train`` or an evaluation split) of a
    dataset family: the training losses, or what :class:`trainables.metrics.MetricSet` computes."""
    if split == "train":
        return {f"train_{k}" for k in ("loss", "kd", "exp", "ce")}
    from trainables.metrics import MetricSet

    ms = MetricSet.build(exp_sim=True, num_groups=len(fam.group_names) if fam.has_groups else 0,
                         multilabel_classes=2 if fam.multilabel else 0, localisation=fam.has_boxes)
    return {f"{split}_{k}" for k in ms.compute()}
