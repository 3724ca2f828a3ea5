"""The ``e2kd`` command line.

    e2kd sweep SPEC [--resume] [--address auto] [--tracking-uri URI] [--set key=value ...]
    e2kd train SPEC [--set key=value ...]        one trial on Ray Train, no Tune
    e2kd teacher SPEC                             train the spec's teacher (with a model card)
    e2kd cache SPEC                               frozen teacher logits + explanations (Ray Data)
    e2kd capacity [SPEC] [--publish AUTOSCALER_YAML]   what the cluster can have, trials at once
    e2kd report EXPERIMENT [--sweep NAME]         KD baseline vs best e²KD, plots
    e2kd report EXPERIMENT --trend SWEEP... --by data.shots   the gain against one setting, plot
    e2kd ui [--tracking-uri URI] [--port 5000]    MLflow UI on 127.0.0.1
    e2kd ui --optuna [--optuna-storage URL]       optuna-dashboard on the sweeps' Optuna studies

Every spec problem is reported before Ray starts, as one line naming the file and the field.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time

from orchestrator.spec import SpecError, SweepSpec, load_spec


MAX_MESSAGE = 1000  # characters of one error line


def one_line(msg: str, limit: int = MAX_MESSAGE) -> str:
    """Any text as one masked line of at most ``limit`` characters."""
    from orchestrator.tracking import short

    return short(msg, limit)


def _err(msg: str, code: int = 2) -> int:
    print(f"e2kd: error: {one_line(msg)}", file=sys.stderr)
    return code


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one masked, bounded line (not the usage text and a line)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        _err(f"{self.prog}: {message} (see `{self.prog} -h`)")
        raise SystemExit(2)


def _load(args) -> SweepSpec:
    spec = load_spec(args.spec, args.set or [])
    if "@" in spec.mlflow.tracking_uri:
        from orchestrator import tracking

        bare = tracking.adopt_credentials(spec.mlflow.tracking_uri)  # credentials to the environment
        spec = dataclasses.replace(spec, mlflow=dataclasses.replace(spec.mlflow, tracking_uri=bare))
    return spec


def preflight(spec: SweepSpec, tracking_uri: str | None = None, need_teacher: bool = True,
              address: str | None = None, record: bool = True) -> None:
    """Checks that need no Ray: every path and URI of the spec, data, teacher checkpoint and cache,
    GPUs and CPUs of a local instance, the Ray address, the tracking store (``record``: the
    command writes to MLflow). ``address``: the cluster the command will connect to (None: a
    local Ray instance, unless RAY_ADDRESS is set)."""
    from orchestrator import tracking
    from trainables.data import dataset_info

    t = spec.train
    r = spec.resources
    local = not (address or os.environ.get("RAY_ADDRESS"))
    check_paths(spec, tracking_uri)
    if t.data.root is not None and "://" in t.data.root:  # datasets are read with os/PIL, not pyarrow
        raise ValueError(f"data.root: {tracking.mask_uri(t.data.root)} is a store URI; datasets are read from a local or shared-filesystem "
                         "path (only teacher.path and teacher.cache_dir may be store URIs)")
    if t.data.root is not None and not os.path.exists(t.data.root):
        raise FileNotFoundError(f"data.root: dataset path does not exist: {t.data.root}")
    dataset_info(t.data)  # validates dataset name, root layout and shots
    if r.use_gpu and local:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("resources.use_gpu is true but this machine has no CUDA GPU "
                               "(set resources.use_gpu=false, or submit to a GPU cluster with --address)")
    if local:  # a local instance cannot grow: refuse what can never be scheduled before starting Ray
        have = r.num_cpus if r.num_cpus is not None else (os.cpu_count() or 1)
        if r.cpus_per_trial > have:
            raise RuntimeError(
                f"resources: one trial needs {r.cpus_per_trial:g} CPU (workers_per_trial={r.workers_per_trial} × "
                f"cpus_per_worker={r.cpus_per_worker:g} + driver_cpus={r.driver_cpus:g}) but the local Ray "
                f"instance has {have:g} (resources.num_cpus); lower resources.workers_per_trial or use --address")
        if r.worker_resources:
            raise RuntimeError(f"resources.worker_resources: {sorted(r.worker_resources)} can never be scheduled on a "
                               "local Ray instance (it has no custom resources); submit to a cluster whose node types "
                               "declare them with --address")
        if r.use_gpu:
            import torch

            gpus = torch.cuda.device_count()
            if r.gpus_per_trial > gpus:
                raise RuntimeError(f"resources: one trial needs {r.gpus_per_trial:g} GPU (workers_per_trial × "
                                   f"gpus_per_worker) but this machine has {gpus}")
    from trainables import storage
    from trainables.teacher import teacher_exists

    def probe(field: str, path: str, check):
        # Teacher and cache may be store URIs (s3://…): an unreachable store, missing bucket or
        # refused credentials is reported naming the field, before Ray starts.
        try:
            return check(path)
        except OSError as e:
            raise ConnectionError(f"{field}: cannot read {path}: {e}") from None

    have_teacher = probe("teacher.path", t.teacher.path, teacher_exists)
    # Only a spec that says how to train its teacher gets one trained: a mistyped teacher.path in a
    # cluster spec must not start training a ResNet-34 on ImageNet on the head's CPU.
    if need_teacher and not have_teacher and spec.teacher_training is None:
        raise FileNotFoundError(_no_teacher_message(spec))
    if (t.teacher.mode == "cached" and have_teacher
            and probe("teacher.cache_dir", t.teacher.cache_dir,
                      lambda p: storage.is_file(storage.join(p, "manifest.json")))):
        # A cache made by another teacher, explainer or data selection would only fail inside the
        # Train workers: compare its manifest with this spec now.
        from trainables.data.cache import CacheError, check_expect, read_manifest
        from trainables.teacher import read_card

        try:
            check_expect(t.teacher.cache_dir, read_manifest(t.teacher.cache_dir), {
                "teacher_sha256": read_card(t.teacher.path).sha256, "explainer": t.loss.explainer,
                "fingerprint": dataset_info(t.data).fingerprint})
        except CacheError as e:
            raise CacheError(f"teacher.cache_dir: {e}; rebuild it with `e2kd cache {spec.source} --force`") from None
    if record:
        tracking.check_store(tracking.resolve_tracking_uri(tracking_uri or spec.mlflow.tracking_uri), write=True)
        from orchestrator import optuna_store

        optuna_store.preflight(spec, tracking_uri)  # search.storage: the sweep's Optuna study
    if not local:
        check_address(address or os.environ["RAY_ADDRESS"])


STORE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss", "file")


def check_paths(spec: SweepSpec, tracking_uri: str | None) -> None:
    """Every path and URI a spec holds, before anything runs: what must exist exists and is of the
    right kind (a file, a folder), what will be written can be, URIs have a scheme the storage
    layer reads. Nothing is written."""
    from orchestrator import tracking

    t = spec.train

    def local(field: str, path: str) -> str | None:
        if "://" not in path:
            return path
        scheme = path.split("://", 1)[0].lower()
        if scheme not in STORE_SCHEMES:
            raise ValueError(f"{field}: {tracking.mask_uri(path)}: unsupported URI scheme {scheme[:20]!r} "
                             f"(supported: {', '.join(STORE_SCHEMES)})")
        return path[len("file://"):] if scheme == "file" else None

    tracking.resolve_tracking_uri(tracking_uri or spec.mlflow.tracking_uri)  # a file store is refused
    if t.data.root is not None and "://" not in t.data.root and os.path.exists(t.data.root) \
            and not os.path.isdir(t.data.root):
        raise NotADirectoryError(f"data.root: {t.data.root} is a file, not a dataset folder")
    if t.student_weights is not None:
        if "://" in t.student_weights and not t.student_weights.startswith("file://"):
            raise ValueError(f"student_weights: {tracking.mask_uri(t.student_weights)} is a store URI; weights are "
                             "read from a local or shared-filesystem path")
        p = local("student_weights", t.student_weights)
        if not os.path.isfile(p):
            what = "is a directory, not a weights file" if os.path.isdir(p) else "does not exist"
            raise FileNotFoundError(f"student_weights: {p} {what}")
        if not p.endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise ValueError(f"student_weights: {p}: expected a .pt/.pth/.bin/.safetensors weights file")
    storage = local("storage", spec.storage)
    if storage is not None:
        tracking.check_writable("storage", storage)
    tp = local("teacher.path", t.teacher.path)
    if tp is not None and os.path.isfile(tp) and not tp.endswith(".pt"):
        raise NotADirectoryError(f"teacher.path: {tp} is a file, not a teacher directory (or its teacher.pt)")
    if tp is not None and not os.path.exists(tp):
        tracking.check_writable("teacher.path", tp)
    if t.teacher.mode == "cached":
        cp = local("teacher.cache_dir", t.teacher.cache_dir)
        if cp is not None and os.path.exists(cp) and not os.path.isdir(cp):
            raise NotADirectoryError(f"teacher.cache_dir: {cp} is a file, not a cache folder")
        if cp is not None and not os.path.isfile(os.path.join(cp, "manifest.json")):  # to be built: writable
            tracking.check_writable("teacher.cache_dir", cp)


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """A Ray address must answer within seconds (``ray.init`` waits much longer for a dead one).
    ``auto``/``local`` are left to Ray (they look for a running instance on this machine)."""
    import socket

    from orchestrator import tracking

    a = address.strip()
    if a in ("auto", "local"):
        return
    where = f"--address {tracking.mask_uri(a)[:200]}"
    if a.startswith(("http://", "https://")):
        raise ValueError(f"{where}: that is the dashboard / Jobs API; give the GCS address host:6379 (or auto), "
                         "or submit with `ray job submit`")
    hostport = a[len("ray://"):] if a.startswith("ray://") else a
    if "@" in hostport:
        raise ValueError(f"{where}: credentials do not belong in a Ray address (Ray uses its auth token, "
                         "RAY_AUTH_MODE=token)")
    if "://" in hostport or "/" in hostport:
        raise ValueError(f"{where}: expected host:port, ray://host:port or auto")
    host, sep, port_s = hostport.rpartition(":")
    if not sep or not host or not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
        raise ValueError(f"{where}: expected host:port with a port in 1-65535, ray://host:port or auto")
    host = host.strip("[]")
    try:
        tracking._call_with_deadline(lambda: socket.create_connection((host, int(port_s)), timeout=timeout_s).close(),
                                     timeout_s, "ray-address")
    except (OSError, TimeoutError) as e:
        raise ConnectionError(f"{where}: no Ray cluster answers at {host[:100]}:{port_s} "
                              f"({tracking.short(e, 150)}); start it, or leave --address out for a local "
                              "instance") from None


def check_compare_args(spec: SweepSpec, args) -> None:
    """``e2kd compare --seeds/--lam`` validate like the spec's own seed and loss.lam."""
    import math

    seeds = args.seeds or []
    if not seeds:
        raise ValueError("--seeds: give at least one seed")
    bad = [s for s in seeds if not 0 <= s < 2**32]
    if bad:
        raise ValueError(f"--seeds: {str(bad[0])[:40]} is outside [0, 2**32)")
    if len(set(seeds)) != len(seeds):
        raise ValueError("--seeds: each seed once (a repeated seed reruns the same trial)")
    lams = args.lam or []
    bad = [x for x in lams if not math.isfinite(x) or x < 0]
    if bad:
        raise ValueError(f"--lam: {str(bad[0])[:40]} is not a finite number >= 0")
    if len(set(lams)) != len(lams):
        raise ValueError("--lam: each value once")
    if len(seeds) * max(1, len(lams)) > 1000:
        raise ValueError(f"--seeds × --lam: {len(seeds) * max(1, len(lams))} runs; at most 1000")


def _no_teacher_message(spec: SweepSpec) -> str:
    p = spec.train.teacher.path
    return (f"teacher.path: no teacher.pt in {p}, and the spec has no teacher_training section, so none is "
            f"trained; fix teacher.path, import weights with `e2kd teacher {spec.source} --weights FILE`, "
            "or add a teacher_training section")


def ensure_teacher(spec: SweepSpec, force: bool = False):
    """Load the teacher's card; train the teacher only when it is missing (or ``force``) and the
    spec has a teacher_training section. Teacher paths may be store URIs (s3://…)."""
    from trainables.teacher import load_teacher, teacher_exists, train_teacher

    t = spec.train
    if not force and teacher_exists(t.teacher.path):
        card = _load_card(t.teacher.path)
        if card.arch != t.teacher.arch:
            raise ValueError(f"teacher.arch is {t.teacher.arch!r} but {t.teacher.path} holds a {card.arch!r} teacher")
        acc = "n/a" if card.test_accuracy is None else f"{card.test_accuracy:.3f}"
        print(f"[e2kd] teacher: {t.teacher.path} ({card.arch}, test accuracy {acc})")
        return card
    tt = spec.teacher_training
    if tt is None:
        if force:
            raise ValueError(f"teacher_training: `--force` retrains the teacher in {t.teacher.path}, but the spec "
                             f"{spec.source} has no teacher_training section saying how")
        raise FileNotFoundError(_no_teacher_message(spec))
    from orchestrator.locks import writer_lock

    with writer_lock("teacher.path", t.teacher.path):
        if not force and teacher_exists(t.teacher.path):  # another process trained it meanwhile
            return _load_card(t.teacher.path)
        print(f"[e2kd] training teacher {t.teacher.arch} on clean {t.data.name} -> {t.teacher.path}")
        return train_teacher(t.teacher.arch, t.data, t.teacher.path, epochs=tt.epochs, lr=tt.lr,
                             batch_size=tt.batch_size, seed=tt.seed)


def _load_card(path: str):
    """Load and verify a teacher; a broken model card or weights file is one line naming it."""
    from trainables.teacher import load_teacher, teacher_paths

    try:
        _, card = load_teacher(path)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"teacher.path: {e}") from None
    except (KeyError, TypeError, AttributeError, UnicodeDecodeError, RuntimeError) as e:
        raise ValueError(f"teacher.path: the model card {teacher_paths(path)[1]} or its weights are not valid "
                         f"({type(e).__name__}: {e}); rewrite it with `e2kd teacher SPEC --force`") from None
    return card


def ensure_cache(spec: SweepSpec, force: bool = False) -> None:
    t = spec.train
    if t.teacher.mode != "cached":
        return
    from trainables import storage

    if storage.is_file(storage.join(t.teacher.cache_dir, "manifest.json")) and not force:  # local or s3://
        print(f"[e2kd] teacher cache: {t.teacher.cache_dir}")
        return
    from orchestrator.cache_job import build_cache
    from orchestrator.locks import writer_lock

    with writer_lock("teacher.cache_dir", t.teacher.cache_dir):
        if storage.is_file(storage.join(t.teacher.cache_dir, "manifest.json")) and not force:
            print(f"[e2kd] teacher cache: {t.teacher.cache_dir} (built by another process meanwhile)")
            return
        print(f"[e2kd] caching teacher logits + {t.loss.explainer} maps -> {t.teacher.cache_dir}")
        build_cache(t.teacher.path, t.data, t.loss.explainer, t.teacher.cache_dir, use_gpu=spec.resources.use_gpu,
                    max_map_side=t.teacher.cache_map_side, overwrite=force)


@contextlib.contextmanager
def ray_session(spec: SweepSpec, args):
    """What every Ray-running command does first and last: checks that need no Ray, the teacher
    (trained when missing), Ray (connected or started), the teacher cache; Ray shut down after
    if this command started it."""
    from orchestrator.sweep import init_ray

    preflight(spec, args.tracking_uri, address=args.address)
    ensure_teacher(spec)
    started = init_ray(args.address, spec.resources.num_cpus)
    try:
        ensure_cache(spec)
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def cmd_sweep(args) -> int:
    from orchestrator import report
    from orchestrator.sweep import run_sweep

    spec = _load(args)
    with ray_session(spec, args):
        t0 = time.time()
        run_sweep(spec, resume=args.resume, tracking_uri=args.tracking_uri)
        print(f"[e2kd] sweep finished in {time.time() - t0:.0f} s")
    report.print_report(spec.mlflow.experiment, args.tracking_uri or spec.mlflow.tracking_uri, sweep=spec.name,
                        out_dir=os.path.join(os.path.dirname(os.path.abspath(spec.storage)) if "://" not in spec.storage
                                             else ".", "reports", spec.name),
                        # the sweep's own report shows its result even if its matched KD run failed (with a warning)
                        allow_unequal=True)
    return 0


def cmd_compare(args) -> int:
    """KD vs e²KD at the spec's fixed hyperparameters over several seeds (a Tune grid, no search)."""
    import dataclasses

    from orchestrator import report
    from orchestrator.sweep import run_sweep

    spec = _load(args)
    spec = dataclasses.replace(spec, name=args.name or f"{spec.name}-compare")
    check_compare_args(spec, args)
    args.lam = args.lam or sorted({0.0, spec.train.loss.lam})
    # By default the k-shot subset varies with the seed (data.seed = seed): with few shots, which
    # images are drawn moves results as much as the initialisation does, and ± must include it.
    if args.fixed_data and args.data_seeds:
        raise SpecError("--fixed-data and --data-seeds contradict each other: give one")
    data_seeds = None if args.fixed_data else (args.data_seeds or args.seeds)
    if data_seeds is not None and len(data_seeds) != len(args.seeds):
        raise SpecError(f"--data-seeds: give one per --seeds ({len(args.seeds)}), got {len(data_seeds)}")
    if data_seeds is not None and (bad := [d for d in data_seeds if not 0 <= d < 2**32]):
        raise SpecError(f"--data-seeds: {str(bad[0])[:40]} is outside [0, 2**32)")
    grid: dict[str, list] = {"loss.lam": args.lam}
    if data_seeds is None:
        grid["seed"] = args.seeds
    else:
        grid["_seeds"] = [{"seed": s, "data.seed": d} for s, d in zip(args.seeds, data_seeds)]
    with ray_session(spec, args):
        run_sweep(spec, resume=args.resume, tracking_uri=args.tracking_uri, grid=grid)
    report.print_compare(spec.mlflow.experiment, args.tracking_uri or spec.mlflow.tracking_uri, spec.name)
    return 0


def cmd_train(args) -> int:
    import ray.train
    from mlflow import MlflowClient
    from ray.train.torch import TorchTrainer

    from orchestrator import tracking
    from orchestrator.sweep import (check_schedulable, nonfinite_cause, resolve_storage,
                                    scaling_config, set_train_env, start_timeout_s, train_failure_config)
    from trainables.config import flatten
    from trainables.train_loop import train_loop_per_worker

    spec = _load(args)
    with ray_session(spec, args):
        cap = check_schedulable(spec)
        uri = tracking.resolve_tracking_uri(args.tracking_uri or spec.mlflow.tracking_uri)
        client = MlflowClient(uri)
        exp_id = tracking.ensure_experiment(client, spec.mlflow.experiment, spec.mlflow.artifact_location
                                            or tracking.default_artifact_location(uri))
        cfg = spec.train
        run = client.create_run(exp_id, run_name=f"train-{spec.name}", tags={
            tracking.TAG_SWEEP: spec.name, tracking.TAG_ROLE: "train", "student": cfg.student,
            "explainer": cfg.loss.explainer, "method": "kd" if cfg.loss.lam == 0 else "e2kd",
            "mlflow.source.git.commit": tracking.git_commit()})
        run_id = run.info.run_id
        tracking.log_params(client, run_id, tracking.trial_params(flatten(cfg)))
        storage = resolve_storage(spec.storage)
        # One Train run per invocation, named after its MLflow run: a second `e2kd train` (say with
        # other --set values) starts its own run instead of resuming the previous one's checkpoint.
        name = f"{spec.name}-train-{run_id}"
        outbox = tracking.Outbox(tracking.outbox_uri(storage, name))
        set_train_env(start_timeout_s(spec, cap), spec.resources.poll_s)
        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config={"cfg": cfg, "cpus_per_worker": spec.resources.cpus_per_worker,
                                                     "submitted_at": time.time()},
            scaling_config=scaling_config(spec),
            run_config=ray.train.RunConfig(
                name=name, storage_path=storage, failure_config=train_failure_config(spec),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                # A NaN/Inf loss fails at once instead of being retried max_failures times.
                callbacks=[tracking.MlflowEpochCallback(uri, run_id, outbox.uri), tracking.NonFiniteFailFast()]))

        def close(status: str, **tags: str) -> None:  # the run must not stay RUNNING in the UI
            def send() -> None:
                outbox.drain(client)
                for k, v in tags.items():
                    client.set_tag(run_id, k, v)
                client.set_terminated(run_id, status)
            tracking.retry(send, "closing the run", spec.mlflow.retry_s)

        try:
            result = trainer.fit()
        except BaseException as e:
            cause = nonfinite_cause(e) if isinstance(e, ray.train.TrainingFailedError) else None
            close("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED",
                  **{"e2kd.failure": tracking.mask_uri(str(cause or e))[:5000] or type(e).__name__})
            if cause is not None:
                raise RuntimeError(f"run {run_id} failed: {cause}") from None
            raise
        try:
            if result.checkpoint is None:
                raise FileNotFoundError("training reported no checkpoint")
            tracking.retry(lambda: tracking.log_student(uri, run_id, result.checkpoint), "logging the student",
                           spec.mlflow.retry_s)
        except Exception as e:  # never FINISHED without its model
            close("FAILED", **{"e2kd.model_log_error": tracking.mask_uri(str(e))[:5000]})
            raise RuntimeError(f"run {run_id}: the student could not be logged to MLflow: "
                               f"{tracking.mask_uri(str(e))[:500]}") from None
        close("FINISHED")
        print(f"[e2kd] run {run_id}: " + ", ".join(
            f"{k}={v:.4f}" for k, v in (result.metrics or {}).items() if k.startswith(("val_", "test")) and isinstance(v, float)))
    return 0


def cmd_teacher(args) -> int:
    from trainables.data import dataset_info
    from trainables.teacher import teacher_exists

    spec = _load(args)
    t = spec.train
    check_paths(spec, None)
    if t.data.root is not None and not os.path.exists(t.data.root):
        raise FileNotFoundError(f"data.root: dataset path does not exist: {t.data.root}")
    dataset_info(t.data)
    if args.weights:
        if not os.path.isfile(args.weights):
            what = "is a directory, not a weights file" if os.path.isdir(args.weights) else "does not exist"
            raise FileNotFoundError(f"--weights: {args.weights} {what}")
        if teacher_exists(t.teacher.path) and not args.force:
            raise FileExistsError(f"teacher.path: {t.teacher.path} already holds a teacher; pass --force to replace "
                                  "it with the imported weights")
        return import_teacher(spec, args.weights)
    ensure_teacher(spec, force=args.force)
    return 0


def import_teacher(spec: SweepSpec, weights: str) -> int:
    """Turn existing weights (e.g. torchvision's resnet34 checkpoint, or a B-cos release file) into
    a teacher directory with a model card, without training. The weights are checked against the
    architecture (a mismatch names the file) and are not evaluated here."""
    from trainables.data import dataset_info
    from trainables.models import build_model
    from trainables.teacher import save_teacher

    from orchestrator.locks import writer_lock

    t = spec.train
    num_classes = dataset_info(t.data).num_classes
    model = build_model(t.teacher.arch, num_classes, weights=weights)
    with writer_lock("teacher.path", t.teacher.path):
        card = save_teacher(model, t.teacher.arch, t.data, t.teacher.path,
                            extra={"imported_from": os.path.abspath(weights)})
    print(f"[e2kd] teacher {card.arch} imported from {weights} -> {t.teacher.path} (sha256 {card.sha256[:12]}…)")
    return 0


def cmd_cache(args) -> int:
    spec = _load(args)
    if spec.train.teacher.mode != "cached":
        return _err(f"{args.spec}: teacher.mode is {spec.train.teacher.mode!r}; set teacher.mode=cached and teacher.cache_dir")
    preflight(spec, None, address=args.address, record=False)
    ensure_teacher(spec)
    from orchestrator.sweep import init_ray

    # On a cluster (--address or RAY_ADDRESS) the actors run on its
    # GPU nodes; otherwise a local instance, shut down after.
    started = init_ray(args.address, spec.resources.num_cpus)
    try:
        ensure_cache(spec, force=args.force)
    finally:
        if started:
            import ray

            ray.shutdown()
    return 0


def cmd_capacity(args) -> int:
    """What the connected cluster can have; with --publish, record the autoscaler's node types first."""
    import ray

    from orchestrator import tracking
    from orchestrator.cluster import cluster_capacity, publish_autoscaler_config
    from orchestrator.sweep import concurrency, start_timeout_s

    address = args.address or os.environ.get("RAY_ADDRESS") or "auto"
    check_address(address)
    if args.spec:
        _load(args)  # a bad spec fails before connecting
    if args.publish and not os.path.isfile(args.publish):
        raise FileNotFoundError(f"--publish: {args.publish} is not a file")
    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError) as e:
        raise ConnectionError(f"--address {tracking.mask_uri(address)}: no Ray cluster to connect to "
                              f"({tracking.mask_uri(str(e))})") from None
    try:
        if args.publish:
            publish_autoscaler_config(args.publish)
            print(f"[e2kd] recorded the node types of {args.publish} in the cluster's GCS")
        cap = cluster_capacity()
        how = "autoscaler node types × max_workers" if cap.autoscaling else "nodes up now (no autoscaler record)"
        print(f"[e2kd] the cluster can have ({how}): " + ", ".join(
            f"{k}={v:g}" for k, v in sorted(cap.resources.items())
            if not k.startswith(("node:", "memory", "object_store_memory", "accelerator_type"))))
        if args.spec:
            spec = _load(args)
            print(f"[e2kd] {spec.source}: {concurrency(spec, cap)} trial(s) at once, each "
                  + ", ".join(f"{v:g} {k}" for k, v in sorted(spec.resources.trial_needs().items()))
                  + f"; worker start timeout {start_timeout_s(spec, cap):g} s")
    finally:
        ray.shutdown()
    return 0


def cmd_report(args) -> int:
    from orchestrator import report, tracking

    if args.register is not None:  # before the report prints anything
        from orchestrator.registry import check_model_name

        check_model_name(args.register)
    # Read-only: never creates a store; the plots' folder must be writable.
    tracking.check_store(tracking.resolve_tracking_uri(args.tracking_uri), write=False)
    if args.out:
        tracking.check_writable("--out", args.out)
    if args.trend:
        report.print_trend(args.experiment, args.tracking_uri, args.trend, args.by, tuple(args.metrics), args.out)
    else:
        report.print_report(args.experiment, args.tracking_uri, sweep=args.sweep, out_dir=args.out,
                            allow_unequal=args.allow_unequal)
    if args.register:
        from orchestrator import registry

        registry.register_sweep_best(args.experiment, args.tracking_uri, args.sweep, args.register,
                                     allow_unequal=args.allow_unequal)
    return 0


def cmd_ui(args) -> int:
    from orchestrator import tracking

    if args.optuna:
        return cmd_ui_optuna(args)
    args.port = args.port or 5000
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    tracking.check_store(uri, write=False)  # read-only: an absent store is an error, never created
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port: {args.port} is not in 1-65535")
    check_port_free(args.host, args.port)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    art = tracking.default_artifact_location(uri)
    if art:
        cmd += ["--default-artifact-root", art]
    print(f"[e2kd] MLflow UI at http://{args.host}:{args.port} (store {tracking.mask_uri(uri)}); Ctrl-C to stop")
    print_experiment_links(uri, f"http://{args.host}:{args.port}")
    proc = subprocess.Popen(cmd)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait()
        return 0
    if code != 0:
        raise RuntimeError(f"the MLflow UI server on {args.host}:{args.port} exited with code {code} (its output "
                           "is above)")
    return 0


def print_experiment_links(uri: str, base: str) -> None:
    """The links that open each sweep experiment's runs in model-training mode (MLflow 3.17's UI
    opens in GenAI mode); a store that cannot be read here is left to the UI to report."""
    from mlflow import MlflowClient

    from orchestrator import registry

    try:
        for line in registry.experiment_links(MlflowClient(uri), base):
            print(line)
    except Exception:  # noqa: BLE001 - the links are a courtesy; the UI itself still starts
        pass


def cmd_ui_optuna(args) -> int:
    """optuna-dashboard on the sweeps' Optuna storage: --optuna-storage, or the default beside the
    SQLite --tracking-uri (where `e2kd sweep` puts it)."""
    from orchestrator import optuna_store, tracking

    port = args.port or 8080
    if not 1 <= port <= 65535:
        raise ValueError(f"--port: {port} is not in 1-65535")
    url = args.optuna_storage or optuna_store.default_url(".", tracking.resolve_tracking_uri(args.tracking_uri))
    check_port_free(args.host, port)
    return optuna_store.serve_dashboard(url, args.host, port)


def check_port_free(host: str, port: int) -> None:
    """The UI's address can be bound (else mlflow's server fails after printing a banner)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise ValueError(f"--host {host[:100]}: not an address of this machine ({e})") from None
    fam, _, _, _, addr = infos[0]
    with socket.socket(fam, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(addr)
        except OSError as e:
            raise ConnectionError(f"--host {host[:100]} --port {port}: cannot listen there ({e.strerror or e}); "
                                  "pick another --port") from None


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="e2kd", description="Explanation-enhanced knowledge distillation at cluster scale")
    p.add_argument("--debug", action="store_true", help="on an error, also print the (masked) traceback")
    sub = p.add_subparsers(dest="command", required=True)

    def spec_cmd(name: str, help: str, fn) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("spec", help="sweep spec (YAML), e.g. sweeps/quickstart.yaml")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a spec field by its dotted name, e.g. --set seed=3 --set loss.lam=1")
        sp.set_defaults(fn=fn)
        return sp

    sp = spec_cmd("sweep", "run (or --resume) a Ray Tune + Optuna sweep", cmd_sweep)
    sp.add_argument("--resume", action="store_true", help="continue an interrupted sweep (finished trials are kept)")
    sp.add_argument("--address", help="Ray cluster address (e.g. auto); default: RAY_ADDRESS or a local instance")
    sp.add_argument("--tracking-uri", help="MLflow tracking URI (overrides mlflow.tracking_uri)")
    sp = spec_cmd("compare", "KD vs e²KD over seeds at the spec's hyperparameters (mean ± std table)", cmd_compare)
    sp.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    sp.add_argument("--lam", type=float, nargs="+", default=None,
                    help="λ values to compare (default: 0 and the spec's loss.lam)")
    sp.add_argument("--data-seeds", type=int, nargs="+", default=None,
                    help="data.seed (the k-shot subset) for each --seeds entry (default: the seed itself)")
    sp.add_argument("--fixed-data", action="store_true",
                    help="keep the spec's data.seed for every seed (± then excludes the subset's variance)")
    sp.add_argument("--name", help="sweep name (default: <spec name>-compare)")
    sp.add_argument("--resume", action="store_true")
    sp.add_argument("--address")
    sp.add_argument("--tracking-uri")
    sp = spec_cmd("train", "train one student on Ray Train (no Tune)", cmd_train)
    sp.add_argument("--address")
    sp.add_argument("--tracking-uri")
    sp = spec_cmd("teacher", "train the spec's teacher and write its model card", cmd_teacher)
    sp.add_argument("--force", action="store_true", help="retrain even if the teacher exists")
    sp.add_argument("--weights", help="import these existing weights as the teacher instead of training one")
    sp = spec_cmd("cache", "cache the teacher's logits and explanations (Parquet)", cmd_cache)
    sp.add_argument("--force", action="store_true", help="rebuild even if the cache exists")
    sp.add_argument("--address", help="Ray cluster address (e.g. auto); default: RAY_ADDRESS or a local instance")
    sp = sub.add_parser("capacity", help="what the Ray cluster can have (autoscaler node types × max_workers) "
                                         "and how many trials of SPEC fit at once")
    sp.add_argument("spec", nargs="?", help="sweep spec (optional)")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE")
    sp.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or auto)")
    sp.add_argument("--publish", metavar="AUTOSCALER_YAML",
                    help="first record this autoscaler config's node types in the cluster (the cluster files run "
                         "`e2kd capacity --publish ~/ray_bootstrap_config.yaml` after `ray start --head`)")
    sp.set_defaults(fn=cmd_capacity)
    sp = sub.add_parser("report", help="KD baseline vs best e²KD trial, with plots")
    sp.add_argument("experiment", help="MLflow experiment name")
    sp.add_argument("--sweep", help="sweep name (default: the experiment's latest sweep)")
    sp.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    sp.add_argument("--out", default=None, help="folder for the PNG plots (default reports/<sweep>)")
    sp.add_argument("--allow-unequal", action="store_true",
                    help="show KD vs best e²KD even when they differ beyond λ (student, τ, epochs, …), with a warning")
    sp.add_argument("--trend", nargs="+", metavar="SWEEP",
                    help="compare sweeps (from `e2kd compare`) that differ in one setting: KD vs e²KD against --by")
    sp.add_argument("--by", default="data.shots", help="the setting the --trend sweeps differ in (a run param)")
    sp.add_argument("--metrics", nargs="+", default=["test_acc", "test_agreement"], help="metrics for --trend")
    sp.add_argument("--register", metavar="NAME",
                    help="register the best e²KD student in the MLflow Model Registry as a new version of NAME")
    sp.set_defaults(fn=cmd_report)
    sp = sub.add_parser("ui", help="start the MLflow UI (or, with --optuna, optuna-dashboard) on 127.0.0.1")
    sp.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    sp.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    sp.add_argument("--port", type=int, default=None, help="default 5000 (MLflow), 8080 (--optuna)")
    sp.add_argument("--optuna", action="store_true",
                    help="optuna-dashboard on the sweeps' Optuna studies instead of the MLflow UI")
    sp.add_argument("--optuna-storage", metavar="URL", help="the Optuna storage (default: optuna.db beside the "
                    "SQLite --tracking-uri; ${VAR} is filled from the environment)")
    sp.set_defaults(fn=cmd_ui)
    return p


# What a user can cause (a bad spec, path, URI, server, permission): the message is the story.
# Anything else is a bug or an unanticipated failure: its type is named and --debug asked for.
USER_ERRORS = (SpecError, OSError, ValueError, RuntimeError, LookupError, TimeoutError)


def _masked_excepthook(exc_type, exc, tb) -> None:
    """Uncaught exceptions outside ``main`` (threads, interpreter shutdown) are masked too."""
    import traceback

    from orchestrator.tracking import mask_uri

    sys.stderr.write(mask_uri("".join(traceback.format_exception(exc_type, exc, tb))))


def main(argv: list[str] | None = None) -> int:
    """Every failure ends here: one line ``e2kd: error: ...`` on stderr (masked, at most
    MAX_MESSAGE characters), exit code 2 for what the user can fix, 1 for anything else;
    ``--debug`` (or E2KD_DEBUG=1) prints the masked traceback first."""
    import threading

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("E2KD_DEBUG"))
    sys.excepthook = _masked_excepthook
    threading.excepthook = lambda a: _masked_excepthook(a.exc_type, a.exc_value, a.exc_traceback)
    # credentials a URI moves into the environment last as long as the command (main() is also
    # called in-process, by tests and by users' scripts)
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    try:
        # --debug anywhere on the line (e2kd sweep SPEC --debug), not only before the command
        args = build_parser().parse_args((["--debug"] if debug else []) + [a for a in argv if a != "--debug"])
        if "@" in (getattr(args, "tracking_uri", None) or ""):
            from orchestrator import tracking

            args.tracking_uri = tracking.adopt_credentials(args.tracking_uri)  # credentials to the environment
        return args.fn(args)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("[e2kd] interrupted", file=sys.stderr)
        return 130
    except BaseException as e:  # noqa: BLE001 - the CLI's one error path
        if debug:
            _masked_excepthook(type(e), e, e.__traceback__)
        if isinstance(e, USER_ERRORS) and not isinstance(e, (NotImplementedError, RecursionError)):
            text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
            return _err(text or type(e).__name__)
        return _err(f"{type(e).__name__}: {one_line(str(e), MAX_MESSAGE - 150)} (unexpected; rerun with --debug for "
                    "the traceback)", code=1)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


if __name__ == "__main__":
    sys.exit(main())
