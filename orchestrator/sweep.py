"""Ray Tune + Optuna over Ray Train students (the Ray 2.60 / Train V2 pattern).

Each Tune trial is a *function trainable* (:func:`trial_driver`) that builds and fits one
``TorchTrainer``; Tune never sees a Trainer object (``Tuner(trainer)`` is gone in Train V2).
Metrics travel worker rank 0 -> Train controller -> Tune through ``TuneReportCallback``; Optuna
(through ``OptunaSearch``, define-by-run for conditional entries) receives them from Tune, and
ASHA stops weak trials on the worker-reported ``epoch`` (``training_iteration`` restarts at 1
after ``Tuner.restore``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import optuna
import ray
import ray.train
import ray.tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from orchestrator import optuna_store, tracking
from orchestrator.cluster import Capacity, cluster_capacity, loopback_node_ip
from orchestrator.spec import DRIVER_RESOURCE_AMOUNT, SweepSpec
from trainables.config import TrainConfig, flatten, with_overrides
from trainables.train_loop import NonFiniteLossError, train_loop_per_worker

BASELINE_ATTR = "kd_baseline"
TAG_NONFINITE = "e2kd.nonfinite"


# ------------------------------------ search space ------------------------------------------


def _suggest(trial: optuna.Trial, key: str, p) -> Any:
    if p.type == "choice":
        return trial.suggest_categorical(key, list(p.values))
    if p.type == "int":
        return trial.suggest_int(key, int(p.low), int(p.high), log=p.log)
    return trial.suggest_float(key, float(p.low), float(p.high), log=p.type == "loguniform" or p.log)


def _active(p, values: dict[str, Any]) -> bool:
    for other, want in (p.when or {}).items():
        allowed = want if isinstance(want, (list, tuple)) else [want]
        if values.get(other) not in allowed:
            return False
    return True


ROLE = "_role"  # config key (ignored by trial_config) naming a KD trial's part in the comparison
ROLE_BASELINE, ROLE_MATCHED, ROLE_TUNED = "baseline", "matched", "tuned"
GRID_ATTR = "e2kd.grid_index"


class SearchSpace:
    """Define-by-run space (a picklable callable: Tune checkpoints the searcher with it).

    The first trial of a study is the KD baseline: ``loss.lam`` is fixed to 0 (not suggested, so
    the sampler's λ distribution keeps its log scale), every other searched field keeps the spec's
    own value, and the trial is marked with a user attribute, so it is the fixed first point of
    every sweep and is recognised again after a resume.

    ``kd_role``: the role the KD trials of this study get (``tuned`` for the KD arm's search, whose
    space has no λ). With ``search.grid`` every other trial takes the next configuration of the
    space not yet in the study (seeded order, stored as a user attribute): none runs twice, which
    a sampler on an all-categorical space cannot promise (Optuna's BruteForceSampler would, but it
    counts the parameter-less baseline trial as a finished search and stops the study)."""

    def __init__(self, spec: SweepSpec, kd_role: str = ROLE_BASELINE):
        self.spec = spec
        self.kd_role = kd_role
        space = spec.search.space
        # Conditional entries are suggested after the entries they depend on.
        self.order = sorted(space, key=lambda k: len(space[k].when or {}))
        self.grid: list[dict[str, Any]] | None = None
        if spec.search.grid:
            import random

            self.grid = spec.search.configurations()
            if kd_role == ROLE_TUNED:  # the KD arm: the baseline (main study) already ran the spec's own setting
                flat = flatten(spec.train)
                self.grid = [c for c in self.grid if any(flat.get(k) != v for k, v in c.items())]
            random.Random(spec.search.seed).shuffle(self.grid)

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        spec, space = self.spec, self.spec.search.space
        # (orphans: trials a dead driver left in the storage, see optuna_store)
        study_trials = [t for t in trial.study.get_trials(deepcopy=False) if optuna_store.counts(t)]
        is_baseline = spec.search.baseline and not any(t.user_attrs.get(BASELINE_ATTR) for t in study_trials)
        kd = spec.train.loss.lam == 0  # the KD arm's study: every trial is KD
        values: dict[str, Any] = {}
        consts: dict[str, Any] = {ROLE: self.kd_role} if kd else {}
        if is_baseline:
            trial.set_user_attr(BASELINE_ATTR, True)
            consts.update({"loss.lam": 0.0, ROLE: ROLE_BASELINE})
            flat = flatten(spec.train)
            for key in self.order:
                if key != "loss.lam":
                    consts[key] = values[key] = flat[key]
            return consts
        if self.grid is not None:
            used = {t.user_attrs.get(GRID_ATTR) for t in study_trials if t.number != trial.number}
            i = next((i for i in range(len(self.grid)) if i not in used), None)
            if i is None:  # spec validation keeps num_trials within the grid; a resumed study may not
                raise RuntimeError(f"search: all {len(self.grid)} configurations of the space have run")
            trial.set_user_attr(GRID_ATTR, i)
            return {**consts, **self.grid[i]}
        for key in self.order:
            if _active(space[key], values):
                values[key] = _suggest(trial, key, space[key])
        return consts


def make_space(spec: SweepSpec, kd_role: str = ROLE_BASELINE) -> SearchSpace:
    return SearchSpace(spec, kd_role)


def trial_config(base: TrainConfig, config: dict[str, Any]) -> TrainConfig:
    """Apply the dotted keys Tune/Optuna chose (and constants) to the spec's TrainConfig. A dict
    value (a grid over joint settings, e.g. ``{"seed": 1, "data.seed": 1}``) applies each of its keys."""
    flat: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            flat.update(v)
        elif not k.startswith("_"):
            flat[k] = v
    overrides = {k: (tuple(v) if isinstance(v, list) else v) for k, v in flat.items()}
    return with_overrides(base, overrides)


# ------------------------------------ the trial driver --------------------------------------


@dataclass(frozen=True)
class DriverContext:
    """Everything a trial driver needs besides the sampled config (passed with tune.with_parameters)."""

    spec: SweepSpec
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    storage_path: str
    start_timeout_s: float = 300.0  # the trial's Train worker group start timeout (see start_timeout_s())
    max_concurrent: int = 1  # trials at once (see concurrency())
    checkpoint_at: tuple[int, ...] = ()  # epochs where the scheduler may stop a trial (asha_rungs())


def nonfinite_cause(e: BaseException) -> NonFiniteLossError | None:
    """The NonFiniteLossError inside a Train failure (controller or worker error), if any."""
    causes = [getattr(e, "controller_failure", None), *getattr(e, "worker_failures", {}).values()]
    return next((c for c in causes if isinstance(c, NonFiniteLossError)), None)


def train_failure_config(spec: SweepSpec) -> ray.train.FailureConfig:
    """Worker errors restart from the last checkpoint up to ``max_failures`` times. Spot
    preemptions (a node drained by the cloud) are counted apart by Ray Train's preemption watcher
    and retried without limit, so they never use up ``max_failures``. Controller errors (a worker
    group that did not start within the start timeout) are retried 3 times."""
    return ray.train.FailureConfig(max_failures=spec.max_failures, controller_failure_limit=3,
                                   max_preemption_failures=-1)


def set_train_env(start_timeout_s: float, poll_s: float) -> None:
    """Ray Train reads its worker-group start timeout and its controller's poll interval from the
    environment of the process that calls ``fit()`` and passes them on to its controller and
    workers (``get_env_vars_to_propagate``), so setting them here reaches every process of the run;
    nothing has to be exported by hand.

    The poll interval paces reports: a worker's ``ray.train.report`` waits until the controller's
    next poll takes it (a queue of one), so with Ray's default of 2 s an epoch shorter than 2 s
    lasts 2 s."""
    from ray.train.v2._internal.constants import HEALTH_CHECK_INTERVAL_S_ENV_VAR, WORKER_GROUP_START_TIMEOUT_S_ENV_VAR

    os.environ[WORKER_GROUP_START_TIMEOUT_S_ENV_VAR] = f"{start_timeout_s:g}"
    os.environ[HEALTH_CHECK_INTERVAL_S_ENV_VAR] = f"{poll_s:g}"


def scaling_config(spec: SweepSpec) -> ray.train.ScalingConfig:
    """One trial's Ray Train workers, from the spec's resources section."""
    r = spec.resources
    worker_res = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.use_gpu else {}), **r.worker_resources}
    return ray.train.ScalingConfig(num_workers=r.workers_per_trial, use_gpu=r.use_gpu,
                                   resources_per_worker=worker_res, placement_strategy=r.placement_strategy)


def trial_driver(config: dict[str, Any], ctx: DriverContext) -> None:
    """Tune function trainable: one TorchTrainer per trial, its metrics forwarded to Tune."""
    from mlflow import MlflowClient

    spec = ctx.spec
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(spec.train, config)
    is_baseline = cfg.loss.lam == 0
    wait = spec.mlflow.retry_s
    run_id = tracking.retry(lambda: tracking.get_or_create_child(
        ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, spec.name, trial_id,
        params=tracking.trial_params(flatten(cfg)),
        tags={"student": cfg.student, "explainer": cfg.loss.explainer, "teacher": cfg.teacher.arch,
              "method": "kd" if is_baseline else "e2kd", "seed": str(cfg.seed),
              **({tracking.TAG_KD_ROLE: config.get(ROLE, ROLE_BASELINE)} if is_baseline else {})}, data=cfg.data),
        "creating the trial's run", wait)
    client = MlflowClient(ctx.tracking_uri)
    earlier = tracking.retry(lambda: client.get_run(run_id).data.tags.get(TAG_NONFINITE), "reading the trial's run", wait)
    if earlier:  # Tune's trial-level retry of a deterministic NaN: fail at once, train nothing
        raise NonFiniteLossError(f"{earlier} (not retried: a non-finite loss is deterministic)")
    name = tracking.train_run_name(spec.name, trial_id)
    outbox = tracking.Outbox(tracking.outbox_uri(ctx.storage_path, name))
    set_train_env(ctx.start_timeout_s, spec.resources.poll_s)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "cpus_per_worker": spec.resources.cpus_per_worker,
                           "submitted_at": time.time(), "checkpoint_at": ctx.checkpoint_at},
        scaling_config=scaling_config(spec),
        run_config=ray.train.RunConfig(
            name=name, storage_path=ctx.storage_path,
            failure_config=train_failure_config(spec),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # The MLflow record is buffered before Tune sees the report: once Tune has it, ASHA may
            # stop the trial at once and the stopping epoch's record would be lost.
            callbacks=[tracking.MlflowEpochCallback(ctx.tracking_uri, run_id, outbox.uri), TuneReportCallback(),
                       tracking.NonFiniteFailFast()],
        ),
    )
    try:
        trainer.fit()  # raises TrainingFailedError after max_failures: Tune marks the trial ERROR
    except ray.train.TrainingFailedError as e:
        cause = nonfinite_cause(e)
        if cause is None:
            raise
        outbox.put(run_id, tags={TAG_NONFINITE: str(cause)[:5000]})
        raise NonFiniteLossError(str(cause)) from None
    finally:
        # What the controller could not send yet (server down, or its sender thread cut off when the
        # controller exited); the sweep's finaliser tries again if this gives up.
        try:
            tracking.retry(lambda: outbox.drain(client), "sending buffered epoch records", wait)
        except Exception:
            pass


# ------------------------------------ running a sweep ---------------------------------------


def concurrency(spec: SweepSpec, capacity: Capacity | None = None) -> int:
    """How many trials fit at once: for each resource a trial holds, what the cluster can have /
    one trial's need (Ray's advice for Tune over Train). Tune does not know about the Train placement groups, so
    without this limit surplus trials would start and wait for workers that never come."""
    r = spec.resources
    if r.max_concurrent_trials:
        return r.max_concurrent_trials
    have = (capacity or cluster_capacity()).resources
    return max(1, min(math.floor(have.get(k, 0.0) / need + 1e-9) for k, need in r.trial_needs().items()))


def check_schedulable(spec: SweepSpec, capacity: Capacity | None = None) -> Capacity:
    """Refuse a trial that can never be scheduled (not even once the autoscaler has started every
    node it may) instead of letting Ray wait forever. Returns the capacity it judged by."""
    cap = capacity or cluster_capacity()
    short = {k: (need, cap.resources.get(k, 0.0)) for k, need in spec.resources.trial_needs().items()
             if cap.resources.get(k, 0.0) + 1e-9 < need}
    if short:
        where = "the autoscaler's node types can provide at most" if cap.autoscaling else "the cluster has"
        raise RuntimeError("resources: one trial needs " + ", ".join(
            f"{need:g} {k} ({where} {have:g})" for k, (need, have) in sorted(short.items()))
            + " (workers_per_trial × cpus_per_worker/gpus_per_worker/worker_resources + driver_cpus)")
    return cap


def start_timeout_s(spec: SweepSpec, capacity: Capacity) -> float:
    """resources.start_timeout_s, or its default: generous where nodes boot on demand."""
    if spec.resources.start_timeout_s is not None:
        return spec.resources.start_timeout_s
    return 1800.0 if capacity.autoscaling else 300.0


def asha_rungs(spec: SweepSpec) -> tuple[int, ...]:
    """The epochs at which ASHA may stop a trial: grace_period × reduction_factor^k below the last
    epoch (one bracket, as build_tuner makes it). Trials checkpoint there whatever their cadence."""
    s, last = spec.search, spec.train.epochs
    if s.scheduler != "asha":
        return ()
    rungs, t = [], min(s.grace_period, last)
    while t < last:
        rungs.append(t)
        t *= s.reduction_factor
    return tuple(rungs)


def overhead_rows(grid) -> list[dict[str, Any]]:
    """Per trial: Tune's wall time and what the trial's reports say it spent it on."""
    rows = []
    for r in grid:
        df = r.metrics_dataframe
        if df is None or df.empty or "train_time_s" not in df:
            continue
        total = lambda k: float(df[k].fillna(0).sum()) if k in df else 0.0  # noqa: E731
        row = {"trial": r.metrics.get("trial_id", "?"), "epochs": int(df["epoch"].max()),
               "wall_s": float(df["time_total_s"].iloc[-1]),
               "startup_s": float(df["startup_s"].dropna().iloc[0]) if "startup_s" in df and df["startup_s"].notna().any()
               else 0.0,
               **{k: total(f"{k}_time_s") for k in ("train", "eval", "checkpoint", "grid", "report")},
               "train_cpu": total("train_cpu_s")}
        for k in ("workers", "import", "teacher", "model", "data"):
            col = f"startup_{k}_s"
            row[f"startup_{k}"] = float(df[col].dropna().iloc[0]) if col in df and df[col].notna().any() else 0.0
        row["other"] = row["wall_s"] - row["startup_s"] - sum(row[k] for k in ("train", "eval", "checkpoint", "grid",
                                                                                "report"))
        rows.append(row)
    return rows


def overhead_table(rows: list[dict[str, Any]], wall_s: float) -> str:
    """Markdown: per trial and in total, where the time went; orchestration efficiency = Σ train / sweep wall."""
    cols = ["wall_s", "startup_s", "train", "eval", "checkpoint", "grid", "report", "other"]
    head = "| trial | epochs | " + " | ".join(c.removesuffix("_s") for c in cols) + " |"
    lines = [head, "|---" * (len(cols) + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['trial']} | {r['epochs']} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |")
    tot = {c: sum(r[c] for r in rows) for c in cols}
    lines.append("| **Σ** | | " + " | ".join(f"{tot[c]:.1f}" for c in cols) + " |")
    start = {k: sum(r[f"startup_{k}"] for r in rows) for k in ("workers", "import", "teacher", "model", "data")}
    eff = tot["train"] / wall_s if wall_s > 0 else float("nan")
    cpu = sum(r.get("train_cpu", 0.0) for r in rows)
    lines += ["", "start-up, Σ over trials (s): " + ", ".join(f"{k} {v:.1f}" for k, v in start.items()),
              f"sweep wall {wall_s:.1f} s; Σ train {tot['train']:.1f} s; orchestration efficiency "
              f"(Σ train / sweep wall) {eff:.2f}",
              # Wall time in training includes waiting for a CPU when trials share one: the CPU seconds
              # of the training processes say how much of the machine the training itself used.
              f"Σ train CPU {cpu:.1f} s (training processes, all threads; rank 0 of each trial)"]
    return "\n".join(lines)


def experiment_path(spec: SweepSpec, storage: str) -> str:
    return f"{storage.rstrip('/')}/{spec.name}"


SAMPLERS = {  # search.sampler -> Optuna sampler (grid/auto-grid: the space function picks, the sampler is never asked)
    "random": lambda s: optuna.samplers.RandomSampler(seed=s.seed),
    "nsga2": lambda s: optuna.samplers.NSGAIISampler(seed=s.seed),
    "tpe": lambda s: optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials),
}


def build_searcher(spec: SweepSpec, kd_role: str = ROLE_BASELINE, storage=None,
                   study_name: str | None = None) -> OptunaSearch:
    """``storage``: an Optuna storage (optuna_store.open_storage) holding the study ``study_name``
    (None: in memory, as in unit tests)."""
    s = spec.search
    sampler = SAMPLERS.get(s.sampler, SAMPLERS["tpe"])(s)
    # metric/mode go to OptunaSearch itself: with a define-by-run space TuneConfig's are not forwarded.
    # Several objectives: lists (Optuna's multi-objective study; TPE and NSGA-II both handle it).
    metric = [o.metric for o in s.objectives] if s.objectives else s.metric
    mode = [o.mode for o in s.objectives] if s.objectives else s.mode
    return optuna_store.StoredOptunaSearch(space=make_space(spec, kd_role), metric=metric, mode=mode, sampler=sampler,
                                           storage=storage, study_name=study_name)


def is_reference_kd(config: dict[str, Any]) -> bool:
    """The KD runs every e²KD result is compared with: the baseline and the matched KD run. (A
    sweep from before roles existed: its KD trial.)"""
    role = config.get(ROLE)
    return role in (ROLE_BASELINE, ROLE_MATCHED) or (role is None and config.get("loss.lam") == 0)


class ReferenceKDASHA(ASHAScheduler):
    """ASHA that never stops the reference KD trial: a KD baseline cut at its first rung would be
    compared with fully trained e²KD students. Its results still enter the rungs (it is a trial
    like the others for the cut-offs)."""

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == self.STOP and is_reference_kd(trial.config) and result.get(self._time_attr, 0) < self._max_t:
            self._num_stopped -= 1
            return self.CONTINUE
        return action


def build_tuner(spec: SweepSpec, ctx: DriverContext, callbacks: list, grid: dict[str, list] | None = None,
                tune_name: str | None = None, kd_role: str = ROLE_BASELINE, storage=None):
    """The Tuner and the trainable it wraps (``Tuner.restore`` needs the same trainable).

    Without ``grid``: Optuna over ``search.space`` (+ ASHA). With ``grid`` (dotted key -> values):
    every combination once, no early stopping — the fixed comparison ``e2kd compare`` runs.
    ``tune_name``: the Tune experiment's name (default: the sweep's; the sweep's later phases
    have their own); ``kd_role``: see :class:`SearchSpace`; ``storage``: the Optuna storage of the
    search's study (named like the Tune experiment)."""
    s = spec.search
    driver_res: dict[str, float] = {"CPU": spec.resources.driver_cpus}
    if spec.resources.driver_resource:
        driver_res[spec.resources.driver_resource] = DRIVER_RESOURCE_AMOUNT
    trainable = ray.tune.with_resources(ray.tune.with_parameters(trial_driver, ctx=ctx), driver_res)
    if grid is None:
        tune_config = ray.tune.TuneConfig(
            search_alg=build_searcher(spec, kd_role, storage, optuna_store.study_name(tune_name or spec.name)),
            num_samples=s.num_trials, max_concurrent_trials=ctx.max_concurrent,
            scheduler=(ReferenceKDASHA(time_attr="epoch", metric=s.metric, mode=s.mode, max_t=spec.train.epochs,
                                     grace_period=min(s.grace_period, spec.train.epochs),
                                     reduction_factor=s.reduction_factor)
                       if s.scheduler == "asha" else FIFOScheduler()))
        param_space = None
    else:
        tune_config = ray.tune.TuneConfig(num_samples=1, max_concurrent_trials=ctx.max_concurrent)
        param_space = {k: ray.tune.grid_search(list(v)) for k, v in grid.items()}
    return ray.tune.Tuner(
        trainable, param_space=param_space, tune_config=tune_config,
        run_config=ray.tune.RunConfig(
            name=tune_name or spec.name, storage_path=ctx.storage_path, callbacks=callbacks,
            failure_config=ray.tune.FailureConfig(max_failures=spec.max_failures),
            verbose=1),
    ), trainable


KD_ARM_PHASE, MATCHED_PHASE = "kd-arm", "kd-matched"


def kd_arm_spec(spec: SweepSpec) -> SweepSpec | None:
    """The KD arm of ``search.kd_arm: tuned``: the e²KD search's space without λ, λ = 0, as many
    trials as the e²KD search has (num_trials - 1), the baseline (run by the main study) being its
    first. A grid is capped at the configurations the baseline has not run."""
    import dataclasses

    from trainables.config import with_overrides

    s = spec.search
    space = {k: v for k, v in s.space.items() if k != "loss.lam"}
    n = s.num_trials - 2
    probe = dataclasses.replace(s, space=space, baseline=False, kd_arm="baseline")
    if probe.grid:
        flat = flatten(spec.train)
        n = min(n, sum(any(flat.get(k) != v for k, v in c.items()) for c in probe.configurations()))
    if n < 1:
        return None
    return dataclasses.replace(spec, search=dataclasses.replace(probe, num_trials=n),
                               train=with_overrides(spec.train, {"loss.lam": 0.0}))


def matched_kd_setting(spec: SweepSpec, results) -> dict[str, Any] | None:
    """The searched non-λ settings of the best e²KD trial that ran every epoch, when no KD trial
    that ran every epoch shares them (None: nothing to add). The report compares the best e²KD
    trial with a KD run of the same student, τ, optimiser and epochs; this is the run that makes it."""
    s = spec.search
    full = [r for r in results if r.metrics and r.metrics.get("epoch") == spec.train.epochs and s.metric in r.metrics
            and r.config]
    e2 = [r for r in full if r.config.get("loss.lam", spec.train.loss.lam) != 0]
    if not e2:
        return None
    best = (max if s.mode == "max" else min)(e2, key=lambda r: r.metrics[s.metric])
    setting = {k: best.config[k] for k in s.space if k != "loss.lam" and k in best.config}
    flat = flatten(spec.train)
    for r in full:
        if r.config.get("loss.lam", spec.train.loss.lam) == 0 and all(
                r.config.get(k, flat.get(k)) == v for k, v in setting.items()):
            return None
    return setting


def open_studies(spec: SweepSpec, url: str, resume: bool):
    """The Optuna storage of the sweep's studies. A new sweep refuses a storage that already holds
    a study of its name (its trials, a KD baseline among them, would count as this sweep's)."""
    studies = optuna_store.open_storage(url)
    if not resume:
        for name in (spec.name, f"{spec.name}.{KD_ARM_PHASE}"):
            if optuna_store.study_exists(studies, name):
                raise RuntimeError(
                    f"{optuna_store.FIELD}: {tracking.mask_uri(url)} already holds an Optuna study named {name!r}: "
                    f"pass --resume to continue that sweep, --set name=<new name> to start another, or delete "
                    f"it (optuna delete-study --study-name {name} --storage URL)")
    return studies


def sweep_tags(spec: SweepSpec, study_url: str | None) -> dict[str, str]:
    """Parent-run tags saying where the study is and what it optimised (read by the report)."""
    tags = {}
    if study_url:
        tags[optuna_store.TAG_STORAGE] = tracking.mask_uri(study_url)
    if spec.search.objectives:
        tags[optuna_store.TAG_OBJECTIVES] = ",".join(f"{o.metric}:{o.mode}" for o in spec.search.objectives)
    return tags


def resolve_storage(storage: str) -> str:
    return storage if "://" in storage else os.path.abspath(storage)


def run_sweep(spec: SweepSpec, *, resume: bool = False, tracking_uri: str | None = None,
              log=print, grid: dict[str, list] | None = None) -> ray.tune.ResultGrid:
    """Run (or resume) a sweep on the Ray instance already initialised by the caller.
    ``grid`` replaces the Optuna search by a fixed grid (see :func:`build_tuner`).

    A search runs in up to three phases, each its own Tune experiment under ``storage`` (so each
    resumes on its own) and all children of one MLflow parent: the search (KD baseline + e²KD),
    with ``search.kd_arm: tuned`` the KD arm's search, then — when no KD trial shares the best
    e²KD trial's student/τ/optimiser — one KD run at that setting. Returns the search's ResultGrid."""
    from mlflow import MlflowClient

    cap = check_schedulable(spec)  # before any MLflow run or Tune state: a refused sweep leaves nothing behind
    uri = tracking.resolve_tracking_uri(tracking_uri or spec.mlflow.tracking_uri)
    client = MlflowClient(uri)
    exp_id = tracking.ensure_experiment(client, spec.mlflow.experiment,
                                        spec.mlflow.artifact_location or tracking.default_artifact_location(uri))
    from orchestrator import registry

    log(registry.link_line(uri, exp_id))
    storage = resolve_storage(spec.storage)
    path = experiment_path(spec, storage)
    can_restore = ray.tune.Tuner.can_restore(path)
    if resume and not can_restore:
        log(f"[e2kd] nothing to resume at {path}; starting the sweep")
    phase_paths = [f"{path}.{ph}" for ph in (KD_ARM_PHASE, MATCHED_PHASE)]
    if not resume and (can_restore or any(ray.tune.Tuner.can_restore(p) for p in phase_paths)):
        raise RuntimeError(f"a sweep named {spec.name!r} already exists at {path}: pass --resume to continue it, "
                           f"or --set name=<new name> to start another")
    # The search phases' Optuna studies (a grid has none): a real Optuna storage, named like the phases.
    study_url = optuna_store.storage_url(spec, uri) if grid is None else None
    studies = open_studies(spec, study_url, resume) if study_url else None
    parent = tracking.find_parent(client, exp_id, spec.name) if (resume and can_restore) else None
    if parent is None:
        parent = tracking.create_parent(client, exp_id, spec.name, spec.source, tracking.trial_params(spec.params()),
                                        tags={"e2kd.metric": spec.search.metric, "e2kd.mode": spec.search.mode,
                                              "e2kd.kd_arm": spec.search.kd_arm, **sweep_tags(spec, study_url)})
        registry.try_log_datasets(client, parent, spec.train.data, "the sweep")  # the parent row's Dataset column
    else:
        log(f"[e2kd] resuming sweep {spec.name!r}: MLflow parent run {parent}")
        client.set_terminated(parent, status="RUNNING")
    ctx = DriverContext(spec=spec, tracking_uri=uri, experiment_id=exp_id, parent_run_id=parent, storage_path=storage,
                        start_timeout_s=start_timeout_s(spec, cap), max_concurrent=concurrency(spec, cap),
                        checkpoint_at=asha_rungs(spec) if grid is None else ())
    finalizer = tracking.MlflowTrialFinalizer(uri, exp_id, parent, storage, spec.name, spec.mlflow.retry_s)
    n_trials = math.prod(len(v) for v in grid.values()) if grid else spec.search.num_trials
    log(f"[e2kd] sweep {spec.name!r}: {n_trials} trials × {spec.resources.workers_per_trial} "
        f"Ray Train workers, up to {ctx.max_concurrent} at once "
        f"({'autoscaling: node types × max_workers' if cap.autoscaling else 'current cluster'}; worker start "
        f"timeout {ctx.start_timeout_s:g} s); results in {path}; MLflow {tracking.mask_uri(uri)} "
        f"(experiment {spec.mlflow.experiment!r}, parent run {parent})")
    if study_url:
        log(f"[e2kd] Optuna study {spec.name!r} in {tracking.mask_uri(study_url)}: watch it with "
            f"`e2kd ui --optuna --optuna-storage '{tracking.mask_uri(study_url)}'`")
    t0 = time.time()

    def phase(pspec: SweepSpec, pgrid: dict[str, list] | None, name: str, kd_role: str = ROLE_BASELINE):
        """Fit (or restore and finish) one Tune experiment -> (its ResultGrid, whether the sweep goes on:
        False when it stopped short (Ctrl-C) or MLflow could not be told)."""
        pctx = dataclasses.replace(ctx, spec=pspec, checkpoint_at=asha_rungs(pspec) if pgrid is None else ())
        ppath = f"{storage.rstrip('/')}/{name}"
        restoring = resume and ray.tune.Tuner.can_restore(ppath)
        if pgrid is None and studies is not None and not restoring and optuna_store.study_exists(studies, name):
            # Tune has no record of this phase, so its study is one a driver left before Tune's first
            # save: start both afresh (else its trials, the KD baseline among them, would count).
            optuna_store.delete_study(studies, name)
            log(f"[e2kd] Optuna study {name!r}: Tune never saved this phase; its study starts afresh")
        tuner, trainable = build_tuner(pspec, pctx, [finalizer], pgrid, tune_name=name, kd_role=kd_role,
                                       storage=studies if pgrid is None else None)
        if restoring:
            # Finished trials are restored, not rerun; the searcher (with its Optuna study, including
            # the KD baseline) is unpickled from the experiment state.
            tuner = ray.tune.Tuner.restore(ppath, trainable=trainable, resume_errored=True)
        try:
            res = tuner.fit()
        except KeyboardInterrupt:
            log(f"[e2kd] interrupted: resume with `e2kd sweep {spec.source} --resume`")
            client.set_terminated(parent, status="KILLED")
            raise
        # Child runs the finaliser could not close (MLflow down at the time), also those of an earlier
        # run of a resumed sweep: their trials are over, so finish them now.
        # (Tune's ResultGrid keeps the Trial objects only in a private attribute; its own counters use it.)
        unsent = finalizer.finalize_leftovers(res._experiment_analysis.trials)
        if unsent:
            log(f"[e2kd] MLflow {tracking.mask_uri(uri)} did not answer for {spec.mlflow.retry_s:g} s: {len(unsent)} "
                f"trial run(s) not finalised ({', '.join(unsent)}); their records stay in {storage}; run "
                f"`e2kd sweep {spec.source or 'SPEC'} --resume` when the server is back to send them")
            return res, False
        want = math.prod(len(v) for v in pgrid.values()) if pgrid else pspec.search.num_trials
        finished = res.num_terminated + res.num_errors
        if finished < want and not res.errors:
            # Tune catches the first Ctrl-C itself, saves the experiment and returns early.
            log(f"[e2kd] sweep stopped after {finished}/{want} trials of {name}: resume with "
                f"`e2kd sweep {spec.source or 'SPEC'} --resume`")
            client.set_terminated(parent, status="KILLED")
            return res, False
        return res, True

    main, ok = phase(spec, grid, spec.name)
    if not ok:
        return main
    results = list(main)
    errors = bool(main.errors)
    if grid is None:
        kspec = kd_arm_spec(spec) if spec.search.kd_arm == "tuned" else None
        if kspec is not None:
            log(f"[e2kd] KD arm: {kspec.search.num_trials} more KD trials over {', '.join(kspec.search.space)} "
                "(the e²KD search's budget; the baseline was the first)")
            arm, ok = phase(kspec, None, f"{spec.name}.{KD_ARM_PHASE}", kd_role=ROLE_TUNED)
            if not ok:
                return main
            results += list(arm)
            errors |= bool(arm.errors)
        setting = matched_kd_setting(spec, results)
        if setting is not None:
            log(f"[e2kd] matched KD: the best e²KD trial has {setting}; no KD trial ran it, so one KD run does")
            mgrid = {**{k: [v] for k, v in setting.items()}, "loss.lam": [0.0], ROLE: [ROLE_MATCHED]}
            matched, ok = phase(spec, mgrid, f"{spec.name}.{MATCHED_PHASE}")
            if not ok:
                return main
            results += list(matched)
            errors |= bool(matched.errors)
    log_overhead(client, parent, results, time.time() - t0, log)
    client.set_terminated(parent, status="FINISHED" if not errors else "FAILED")
    return main


def log_overhead(client, parent: str, grid, wall_s: float, log=print) -> None:
    """Print where the sweep's time went and keep it on the parent run (a blip costs the table, not
    the sweep). On a resumed sweep the wall time is this session's, the trials' times all of theirs."""
    rows = overhead_rows(grid)
    if not rows:
        return
    table = overhead_table(rows, wall_s)
    log("[e2kd] where the time went (seconds):\n" + table)
    train = sum(r["train"] for r in rows)
    try:
        client.log_text(parent, table + "\n", "overhead.md")
        for k, v in (("sweep_wall_s", wall_s), ("sweep_train_s", train), ("orchestration_efficiency", train / wall_s)):
            client.log_metric(parent, k, v)
    except Exception as e:
        log(f"[e2kd] could not log the time breakdown to MLflow: {tracking.mask_uri(str(e))[:200]}")


def init_ray(address: str | None, num_cpus: int | None, log=print) -> bool:
    """Connect to a cluster (``--address auto``/RAY_ADDRESS) or start a local instance. Returns
    True when this process started Ray (and should shut it down)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    # Train workers inherit the driver's sys.path only via the runtime env; the project is an
    # installed package, so nothing to ship. Quiet Ray's own progress output.
    if address:
        ray.init(address=address, log_to_driver=True)
        log(f"[e2kd] connected to Ray at {tracking.mask_uri(address)}: {ray.cluster_resources()}")
    else:
        with loopback_node_ip():
            ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", log_to_driver=True)
        log(f"[e2kd] started a local Ray instance: {ray.cluster_resources().get('CPU', 0):g} logical CPUs")
    return True

