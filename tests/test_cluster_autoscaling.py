"""A REAL autoscaling Ray cluster on this machine (Ray's fake multi-node provider, slowed down) and
a sweep submitted to it through the Ray Jobs API: issue 11's autoscaling and cold-start checks in
ONE cluster and ONE sweep (one cluster start is the expensive part on CI).

The cluster (built and torn down here, also on failure; only our own processes are ever killed):

* ``ray start --head --block --autoscaling-config=FILE`` with ``RAY_FAKE_CLUSTER=1`` (Ray 2.60 runs
  the v1 autoscaler, ``ray/autoscaler/_private/monitor.py``, for this), our own ``--port``,
  ``--temp-dir`` and token file (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN_PATH``). The head has
  1 CPU and NO ``accel``.
* One worker node type: ``{CPU: 2, accel: 1}``, ``min_workers: 0``, ``max_workers: 2``,
  ``idle_timeout_minutes: 0.2``. ``accel`` stands in for GPUs (``use_gpu=True`` needs CUDA in the
  workers). The provider is :class:`delayed_fake_provider.DelayedFakeMultiNodeProvider`: Ray's fake
  provider, whose node launches wait ``DELAY_S`` (75 s) before the node starts, like a cloud VM
  booting. The fake nodes are ``ray._private.node.Node``s started by the autoscaler process; they
  join our GCS through ``provider.gcs_address`` and share our temp dir, so the teardown finds them.

Right after the head is up the test runs what the cluster files run after ``ray start --head``:
``e2kd capacity SPEC --publish <autoscaler config>`` (Ray 2.60's autoscalers never write the GCS
``ClusterConfig`` record that e2kd and Ray Train V2 read; see orchestrator/cluster.py).

The sweep: a tiny quickstart (2 trials × 1 Train worker, 2 epochs) with
``resources.worker_resources: {accel: 1}``, submitted as ``e2kd sweep ... --address 127.0.0.1:PORT``
WITHOUT ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` anywhere (the product must set it).

Checks:

1. Autoscaling. The sweep is accepted although the head has no ``accel`` (judged by the
   autoscaler's node types: "up to 2 at once" = 2 nodes × 1 accel / 1 accel per trial); the
   autoscaler starts exactly 2 ``accel`` nodes; both trials' worker groups were placed at the same
   time (peak 2 CREATED accel placement groups while polling) and their Train workers ran on two
   different ``accel`` nodes; exactly one FINISHED MLflow child run per trial with every epoch; the
   nodes are terminated once idle. The same cluster refuses at once a spec it can never fit
   (``worker_resources: {accel: 3}`` > 2 nodes × 1 accel): ``e2kd sweep`` exits non-zero with
   "resources: one trial needs 3 accel" and creates no MLflow run.
2. Cold start. The first ``accel`` node appears more than Ray Train's default worker-group start
   timeout (60 s) after the trials' placement groups were requested (asserted: otherwise the test
   would prove nothing), yet the trials run, and Train never raised ``WorkerGroupStartupTimeoutError``
   (searched in the job output and in every Ray log of the session).
   Checked by hand (2026-12-03) that this part FAILS without the product's fix: with
   ``--set resources.start_timeout_s=60`` on the sweep (Train's default, what a sweep got before)
   the TrainController logged "WorkerGroupStartupTimeoutError: The worker group startup timed out
   after 60.0 seconds" (12 lines in the job output, 14 session log files) before the nodes came
   (79 s), and the test failed (the trials then ran on Train's controller retry).

Runtime on this 2-core machine: 3.5-4.5 min under other jobs' load (75 s of it is the simulated
node boot; e2kd's own start-up takes 30-80 s at load average ~9). Tunable with
``E2KD_AUTOSCALING_DELAY_S`` (keep it > 60) and ``E2KD_AUTOSCALING_JOB_TIMEOUT_S``;
``E2KD_AUTOSCALING_KEEP=1`` keeps the temp dir of a failed run.

A fast test at the end checks the refusal on a FIXED cluster (a local instance without ``accel``).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
import yaml

from test_cluster_multinode import EPOCHS, NUM_TRIALS  # the tiny sweep's shape (write_tiny_spec)
from test_cluster_multinode import (Spawner, _free_ports, _kill_leftovers, _kill_tree, _print_job_logs, _stop_job,
                                    _tail, _token_file, _try_client, _wait)
from test_cluster_multinode import _write_spec as write_tiny_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
BIN = os.path.dirname(sys.executable)  # the venv's bin: absolute paths, the cluster has no PATH of ours
DELAY_S = float(os.environ.get("E2KD_AUTOSCALING_DELAY_S", "75"))
JOB_TIMEOUT_S = int(os.environ.get("E2KD_AUTOSCALING_JOB_TIMEOUT_S", "420"))
TRAIN_DEFAULT_START_TIMEOUT_S = 60.0  # ray.train.v2._internal.constants.DEFAULT_WORKER_GROUP_START_TIMEOUT_S
MAX_ACCEL_NODES = 2
TIMEOUT_PATTERNS = ("WorkerGroupStartupTimeoutError", "worker group startup timed out")


def _log(msg: str) -> None:
    print(f"[autoscaling] {msg}", flush=True)


def _autoscaler_config(gcs_port: int) -> dict:
    """The autoscaler config `ray start --autoscaling-config` takes (shape of Ray's
    fake_multi_node/example.yaml, which the pip wheel does not ship; ray-notes §9.1)."""
    cfg = {
        "cluster_name": "e2kd-autoscaling-test",
        "max_workers": MAX_ACCEL_NODES,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.2,
        "provider": {
            "type": "external",
            "module": "delayed_fake_provider.DelayedFakeMultiNodeProvider",
            "launch_delay_s": DELAY_S,
            # The fake nodes join this GCS (the default is port 6379: someone else's, or nobody's).
            "gcs_address": f"127.0.0.1:{gcs_port}",
            # Both nodes of one launch request, after one boot delay (default: one per request).
            "launch_multiple": True,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "accel_node": {"resources": {"CPU": 2, "accel": 1}, "node_config": {},
                           "min_workers": 0, "max_workers": MAX_ACCEL_NODES},
        },
        "head_node_type": "ray.head.default",
        "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }
    return cfg


def _write_spec(work: str, teacher_dir: str, name: str, accel_per_worker: float, experiment: str) -> str:
    """The multinode test's tiny sweep, one worker per trial needing ``accel_per_worker`` accel."""
    return write_tiny_spec(work, teacher_dir, name,
                           resources={"workers_per_trial": 1, "cpus_per_worker": 1, "driver_cpus": 0.25,
                                      "worker_resources": {"accel": accel_per_worker}},
                           mlflow={"tracking_uri": "sqlite:///overridden-by-the-command-line.db",
                                   "experiment": experiment})


def _our_processes(marker: str, needle: str) -> list[str]:
    """Command lines of the processes that name our temp dir and ``needle``."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd and needle in cmd:
                found.append(cmd)
    return found


def _grep_timeouts(text: str) -> list[str]:
    return [line.strip()[:300] for line in text.splitlines() if any(p in line for p in TIMEOUT_PATTERNS)]


def _grep_session_logs(temp_dir: str) -> dict[str, list[str]]:
    hits = {}
    for path in glob.glob(os.path.join(temp_dir, "session_*", "logs", "**", "*"), recursive=True):
        if not os.path.isfile(path):
            continue
        try:
            with open(path, errors="replace") as f:
                found = _grep_timeouts(f.read())
        except OSError:
            continue
        if found:
            hits[os.path.relpath(path, temp_dir)] = found[:3]
    return hits


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(os.path.join(BIN, "ray")) or not os.path.isfile(os.path.join(BIN, "e2kd")),
                    reason="needs the venv's ray and e2kd executables")
def test_autoscaling_cluster_cold_start_sweep():
    from mlflow import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    from test_cluster_multinode import _train_teacher

    assert DELAY_S > TRAIN_DEFAULT_START_TIMEOUT_S, "E2KD_AUTOSCALING_DELAY_S must exceed Train's 60 s default"
    t_start = time.time()
    # Short path: Ray's unix sockets live under the temp dir (108-byte limit). The path is also
    # the marker by which the teardown finds every process of this cluster.
    work = tempfile.mkdtemp(prefix="e2kdas-", dir="/tmp")
    temp_dir = os.path.join(work, "t")
    token_path, auth = _token_file(work)
    tracking_uri = f"sqlite:///{work}/mlflow.db"
    experiment = "e2kd-autoscaling"

    # No RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S anywhere: the product has to set it.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MLFLOW_", "AUTOSCALER_")) and k != "PYTHONPATH"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path, RAY_USAGE_STATS_ENABLED="0",
               PYTHONUNBUFFERED="1")

    spawn = Spawner(work, env)
    procs, logs = spawn.procs, spawn.logs
    client = None
    submission_id = None
    failed = False

    try:
        gcs, dash, client_port, *p = _free_ports(9)
        dash_url = f"http://127.0.0.1:{dash}"
        address = f"127.0.0.1:{gcs}"
        as_config = os.path.join(work, "autoscaler.yaml")
        with open(as_config, "w") as f:
            yaml.safe_dump(_autoscaler_config(gcs), f)
        spawn("head", [os.path.join(BIN, "ray"), "start", "--head", "--block", f"--autoscaling-config={as_config}",
                       "--port", str(gcs), "--num-cpus", "1", "--num-gpus", "0",
                       "--object-store-memory", str(150 * 1024**2),
                       "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                       "--ray-client-server-port", str(client_port),
                       "--node-manager-port", str(p[0]), "--object-manager-port", str(p[1]),
                       "--dashboard-agent-listen-port", str(p[2]), "--dashboard-agent-grpc-port", str(p[3]),
                       "--runtime-env-agent-port", str(p[4]), "--metrics-export-port", str(p[5]),
                       "--min-worker-port", "0", "--max-worker-port", "0", "--disable-usage-stats",
                       "--temp-dir", temp_dir],
              RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
              PYTHONPATH=TESTS)  # the autoscaler imports delayed_fake_provider from tests/
        # The teacher trains here while the head starts.
        teacher_dir = _train_teacher(os.path.join(work, "teacher"))
        client = _wait(lambda: _try_client(JobSubmissionClient, dash_url, auth), 180, "Ray dashboard / job API",
                       {"head": procs["head"]}, step=2)
        state = StateApiClient(address=dash_url, headers=auth)

        def nodes():
            return state.list(StateResource.NODES, options=ListApiOptions(detail=True, limit=1000),
                              raise_on_missing_output=False)

        head_nodes = _wait(lambda: [n for n in nodes() if n.state == "ALIVE"], 120, "the head node in the State API",
                           {"head": procs["head"]}, step=2)
        assert len(head_nodes) == 1 and "accel" not in (head_nodes[0].resources_total or {}), head_nodes
        monitor = _our_processes(work, "autoscaler")
        _log(f"head up after {time.time() - t_start:.0f} s, no accel: {head_nodes[0].resources_total}; "
             f"autoscaler: {' '.join(c.split()[2] for c in monitor) or 'not found'}")

        # --- what the cluster files run right after `ray start --head`: the autoscaler's node
        # types recorded in the GCS (Ray 2.60's autoscalers never write that record themselves) --
        name = f"as-{uuid.uuid4().hex[:8]}"
        spec_path = _write_spec(work, teacher_dir, name, 1, experiment)
        t0 = time.time()
        published = subprocess.run([os.path.join(BIN, "e2kd"), "capacity", spec_path, "--publish", as_config,
                                    "--address", address], capture_output=True, text=True, cwd=work,
                                   env={**env, "RAY_ADDRESS": address}, timeout=180)
        _log(f"e2kd capacity --publish (exit {published.returncode}, {time.time() - t0:.0f} s): "
             + " | ".join(line for line in published.stdout.splitlines() if line.startswith("[e2kd]")))
        assert published.returncode == 0, (published.stdout + published.stderr)[-3000:]
        assert "2 trial(s) at once" in published.stdout, published.stdout[-2000:]

        # --- the sweep, through the Jobs API ------------------------------------------------
        entrypoint = f"{os.path.join(BIN, 'e2kd')} sweep {spec_path} --address {address} --tracking-uri {tracking_uri}"
        submission_id = client.submit_job(
            entrypoint=entrypoint, submission_id=f"e2kd-{name}",
            # RAY_ADDRESS for every process of the job: with other Ray instances on this machine
            # "auto" would be ambiguous (see test_cluster_multinode). NOT the start timeout.
            runtime_env={"env_vars": {"RAY_ADDRESS": address, "E2KD_TORCH_THREADS": "1"}})
        t_job = time.time()
        _log(f"job {submission_id} submitted after {time.time() - t_start:.0f} s")

        # --- the refusal, on the same cluster, while the nodes "boot" -----------------------
        # 3 accel for one trial's worker; 2 nodes × 1 accel is the most this cluster can have.
        bad_name = f"as-bad-{uuid.uuid4().hex[:8]}"
        bad_spec = _write_spec(work, teacher_dir, bad_name, 3, experiment)
        t0 = time.time()
        refused = subprocess.run([os.path.join(BIN, "e2kd"), "sweep", bad_spec, "--address", address,
                                  "--tracking-uri", tracking_uri], capture_output=True, text=True, cwd=work,
                                 env={**env, "RAY_ADDRESS": address},
                                 timeout=180)
        refused_s = time.time() - t0
        out = refused.stdout + refused.stderr
        _log(f"unfittable spec (3 accel per trial): exit {refused.returncode} after {refused_s:.0f} s")
        assert refused.returncode != 0, out[-3000:]
        assert re.search(r"resources: one trial needs 3 accel \(the autoscaler's node types can provide at most 2\b",
                         out), out[-3000:]

        # --- watch the cluster while the job runs -------------------------------------------
        accel_nodes: dict[str, float] = {}  # node id -> first seen ALIVE (time)
        t_pg_requested = None  # first time an accel placement group was seen (PENDING or later)
        peak_created = 0
        peak_alive_accel = 0
        terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
        deadline = t_job + JOB_TIMEOUT_S
        status = None
        while time.time() < deadline:
            if procs["head"].poll() is not None:
                raise RuntimeError(f"the head's `ray start` exited with {procs['head'].returncode}")
            now = time.time()
            try:
                ns = nodes()
                pgs = state.list(StateResource.PLACEMENT_GROUPS, options=ListApiOptions(detail=True, limit=1000),
                                 raise_on_missing_output=False)
            except Exception as e:  # the dashboard is slow under load: try again next round
                _log(f"(state API: {type(e).__name__}: {str(e)[:200]})")
                ns, pgs = [], []
            alive_accel = [n for n in ns if n.state == "ALIVE" and "accel" in (n.resources_total or {})]
            for n in alive_accel:
                if n.node_id not in accel_nodes:
                    accel_nodes[n.node_id] = now
                    _log(f"accel node {n.node_id[-6:]} alive {now - t_job:.0f} s after the submission")
            peak_alive_accel = max(peak_alive_accel, len(alive_accel))
            accel_pgs = [g for g in pgs if any("accel" in (b.get("unit_resources") or {}) for b in (g.bundles or []))]
            if accel_pgs and t_pg_requested is None:
                t_pg_requested = now
                _log(f"first worker-group placement group requested {now - t_job:.0f} s after the submission")
            peak_created = max(peak_created, sum(g.state == "CREATED" for g in accel_pgs))
            status = client.get_job_status(submission_id)
            if status in terminal:
                break
            time.sleep(2)
        job_logs = client.get_job_logs(submission_id)
        job_s = time.time() - t_job
        with open(os.path.join(work, "job.log"), "w") as f:
            f.write(job_logs)
        _log(f"job {status} after {job_s:.0f} s")
        for line in job_logs.splitlines():  # the autoscaler's own account ("Adding 2 node(s) ...")
            if "(autoscaler +" in line:
                _log("  " + re.sub(r"\x1b\[[0-9;]*m", "", line).strip())
        assert status == JobStatus.SUCCEEDED, f"job {status}:\n{job_logs[-6000:]}"
        assert "sweep finished" in job_logs, job_logs[-3000:]

        # What was measured, all printed before any assertion on it.
        m = re.search(r"up to (\d+) at once \(([^;]*);", job_logs)
        assert m, f"no concurrency line in the job output:\n{job_logs[-3000:]}"
        _log(f"product: up to {m.group(1)} trials at once ({m.group(2)})")
        job_id = client.get_job_info(submission_id).job_id
        workers = state.list(StateResource.ACTORS, options=ListApiOptions(
            filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000), raise_on_missing_output=False)
        workers = [w for w in workers if not job_id or w.job_id == job_id]
        worker_nodes = {w.node_id for w in workers}
        _log(f"accel nodes started: {len(accel_nodes)}, at most {peak_alive_accel} alive at once; Train workers: "
             f"{len(workers)} on nodes {sorted(n[-6:] for n in worker_nodes)}; accel placement groups CREATED at "
             f"once: {peak_created}")
        assert t_pg_requested is not None and accel_nodes, "no accel placement group / node was ever seen"
        wait_s = min(accel_nodes.values()) - t_pg_requested
        _log(f"cold start: the first accel node came {wait_s:.0f} s after the worker groups were requested "
             f"(Train's default start timeout: {TRAIN_DEFAULT_START_TIMEOUT_S:g} s)")
        in_job = _grep_timeouts(job_logs)
        in_session = _grep_session_logs(temp_dir)
        _log(f"worker-group start timeouts: {len(in_job)} in the job output, {len(in_session)} session log files")

        # --- 1. autoscaling -------------------------------------------------------------------
        assert (int(m.group(1)), m.group(2)) == (2, "autoscaling: node types × max_workers"), m.group(0)
        assert "worker start timeout 1800 s" in job_logs, "the product did not give the autoscaling default"
        assert peak_alive_accel <= MAX_ACCEL_NODES
        assert len(worker_nodes) == NUM_TRIALS and worker_nodes <= set(accel_nodes), (worker_nodes, accel_nodes)
        assert peak_created == NUM_TRIALS, f"the trials' worker groups never held their nodes at once ({peak_created})"

        # --- 2. cold start --------------------------------------------------------------------
        assert wait_s > TRAIN_DEFAULT_START_TIMEOUT_S, (
            f"the nodes came after {wait_s:.0f} s: no cold start to survive (raise E2KD_AUTOSCALING_DELAY_S)")
        assert not in_job and not in_session, f"Train's worker group timed out: {in_job} {in_session}"

        # --- MLflow: one parent, exactly one FINISHED child per trial, every epoch ------------
        ml = MlflowClient(tracking_uri)
        exp = ml.get_experiment_by_name(experiment)
        assert exp is not None
        parents = ml.search_runs([exp.experiment_id], "tags.`e2kd.role` = 'parent'")
        assert [r.data.tags.get("e2kd.sweep") for r in parents] == [name], "the refused sweep left an MLflow run"
        assert parents[0].info.status == "FINISHED"
        children = ml.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
        trial_ids = [c.data.tags["e2kd.trial_id"] for c in children]
        assert len(children) == NUM_TRIALS and len(set(trial_ids)) == NUM_TRIALS, trial_ids
        for c in children:
            assert c.data.tags["e2kd.role"] == "trial"
            assert c.info.status == "FINISHED", (c.info.run_name, c.info.status)
            history = ml.get_metric_history(c.info.run_id, "val_agreement")
            assert [h.step for h in history] == list(range(1, EPOCHS + 1)), [h.step for h in history]
        a, b = children
        assert a.info.start_time < b.info.end_time and b.info.start_time < a.info.end_time  # overlapping runs

        # --- idle nodes are terminated ----------------------------------------------------------
        t0 = time.time()
        _wait(lambda: not [n for n in nodes() if n.state == "ALIVE" and "accel" in (n.resources_total or {})],
              120, "the idle accel nodes to be terminated", {"head": procs["head"]}, step=2)
        _log(f"idle accel nodes terminated {time.time() - t0:.0f} s after the job (idle_timeout_minutes 0.2)")
        _log(f"OK in {time.time() - t_start:.0f} s (job {job_s:.0f} s)")
    except BaseException:
        failed = True
        for n, path in logs.items():
            print(f"----- {n} log (tail) -----\n{_tail(path)}")
        for path in sorted(glob.glob(os.path.join(temp_dir, "session_*", "logs", "monitor.*")))[:4]:
            print(f"----- {os.path.basename(path)} (tail) -----\n{_tail(path, 30)}")
        _print_job_logs(client, submission_id)
        raise
    finally:
        _stop_job(client, submission_id)
        if "head" in procs:
            _kill_tree(procs["head"])  # SIGTERM: `ray start --block` stops the head's processes
        time.sleep(1)
        # The fake worker nodes (raylets, agents, workers) started by the autoscaler: our temp dir
        # is in their command lines.
        leftovers = _kill_leftovers(work)
        if leftovers:
            _log(f"killed {len(leftovers)} leftover processes of this cluster: {leftovers}")
        if failed and os.environ.get("E2KD_AUTOSCALING_KEEP"):
            _log(f"kept {work} (E2KD_AUTOSCALING_KEEP)")
        else:
            shutil.rmtree(work, ignore_errors=True)


# ------------------------------------ fixed cluster (fast) ----------------------------------


def test_fixed_cluster_refuses_a_resource_it_lacks(tmp_path):
    """A fixed cluster (a local instance: no autoscaler) without ``accel`` can never run a trial
    whose worker needs one: refused at once, naming the resource, before anything is created."""
    import ray

    from orchestrator.spec import spec_from_dict
    from orchestrator.sweep import check_schedulable, run_sweep

    with open(os.path.join(ROOT, "sweeps", "quickstart.yaml")) as f:
        d = yaml.safe_load(f)
    d.update(name="fixed-refusal", storage=str(tmp_path / "runs"))
    d["resources"] = {"workers_per_trial": 1, "cpus_per_worker": 1, "driver_cpus": 0.25,
                      "worker_resources": {"accel": 1}}
    d["mlflow"] = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "fixed-refusal"}
    spec = spec_from_dict(d)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(RuntimeError, match=r"resources: one trial needs 1 accel \(the cluster has 0\)"):
            check_schedulable(spec)
        t0 = time.time()
        with pytest.raises(RuntimeError, match=r"one trial needs 1 accel"):
            run_sweep(spec, log=lambda s: None)
        assert time.time() - t0 < 30
    finally:
        ray.shutdown()
    assert not (tmp_path / "mlflow.db").exists(), "a refused sweep created an MLflow store"
    assert not (tmp_path / "runs").exists()
