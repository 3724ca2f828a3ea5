"""A REAL two-node Ray cluster on this machine, a sweep submitted through the Ray Jobs API, each
trial's two Ray Train workers forced onto different nodes, MLflow on a tracking server.

What it builds (and tears down in ``finally``, also on failure):

* Network: when this process may create network namespaces (root with CAP_NET_ADMIN), the second
  node runs in its OWN network namespace (``ip netns``), linked to the head's namespace by a veth
  pair on a private /30 (10.x.y.1 head, 10.x.y.2 worker node). Ray traffic between the nodes then
  really crosses an interface, as between two machines, and nothing can quietly go through
  loopback. Otherwise (no privileges, or ``E2KD_MULTINODE_NETNS=0``) it falls back to two raylets
  on 127.0.0.1, kept apart only by their custom resources ``node_a``/``node_b``. The test prints
  which one it used.
* Ray: ``ray start --head --block`` and ``ray start --address ... --block`` (our own processes, in
  their own sessions, with our own ``--temp-dir``; never a global ``ray stop``), every Ray process
  and client with ``RAY_AUTH_MODE=token`` and a token file of our own (``RAY_AUTH_TOKEN_PATH``;
  ``~/.ray/auth_token`` is left alone).
* MLflow: ``mlflow server`` as cluster.yaml starts it on the head (SQLite backend, proxied
  artifacts), on the head's address (veth address with netns, so trial drivers and Train
  controllers on either node can reach it; 127.0.0.1 otherwise).
* The job: ``<venv>/bin/e2kd sweep <tiny spec> --address auto --tracking-uri http://...
  --set resources.placement_strategy=STRICT_SPREAD`` submitted with ``JobSubmissionClient``.

Checks: the job SUCCEEDS; through the State API (dead actors stay listed) every Ray Train worker
group (one placement group per trial) had its two ``RayTrainWorker`` actors on two different node
ids, one on each node. That check discriminates: with Ray's default PACK the 2×1-CPU bundles would
go together onto the node that still has 2 free CPUs (the trial driver holds 0.25 CPU of the
other), so only the spec's ``resources.placement_strategy: STRICT_SPREAD`` splits them (a control
run with PACK put both workers of each trial on one node). The MLflow server holds exactly one
parent run and exactly one FINISHED child run per trial, with one metric point per epoch.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import defaultdict

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)  # the venv's bin: absolute paths, the cluster has no PATH of ours
JOB_TIMEOUT_S = int(os.environ.get("E2KD_MULTINODE_JOB_TIMEOUT_S", "480"))
NUM_TRIALS = 2
EPOCHS = 2


# ------------------------------------ helpers -----------------------------------------------


def _free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct free TCP ports (all bound at once, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=30)


class Netns:
    """A network namespace joined to this one by a veth pair on a private /30."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.name, self.host_if, self.peer_if = f"e2kd{tag}", f"e2kh{tag}", f"e2kp{tag}"
        used = _sh("ip", "-o", "-4", "addr", "show").stdout
        for _ in range(100):
            a, b = secrets.randbelow(200) + 20, secrets.randbelow(64) * 4
            self.host_ip, self.peer_ip = f"10.{a}.{b}.1", f"10.{a}.{b}.2"
            if f"10.{a}.{b}." not in used:
                break
        self.created = False

    def create(self) -> None:
        _sh("ip", "netns", "add", self.name)
        self.created = True
        _sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if)
        _sh("ip", "link", "set", self.peer_if, "netns", self.name)
        _sh("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _sh("ip", "link", "set", self.host_if, "up")
        for c in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{self.peer_ip}/30", "dev", self.peer_if],
                  ["ip", "link", "set", self.peer_if, "up"]):
            _sh("ip", "netns", "exec", self.name, *c)

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def delete(self) -> None:
        _sh("ip", "link", "del", self.host_if, check=False)  # also removes the peer end
        if self.created:
            _sh("ip", "netns", "del", self.name, check=False)


def _try_netns() -> Netns | None:
    if os.geteuid() != 0 or not shutil.which("ip") or os.environ.get("E2KD_MULTINODE_NETNS") == "0":
        return None
    ns = Netns()
    try:
        ns.create()
        return ns
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError):
        ns.delete()
        return None


def _http_ok(url: str, headers: dict | None = None, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return r.status == 200
    except Exception:
        return False


def _wait(pred, timeout_s: float, what: str, procs: dict[str, subprocess.Popen], step: float = 1.0):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for name, p in procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}")
        value = pred()
        if value:
            return value
        time.sleep(step)
    raise TimeoutError(f"{what}: not ready after {timeout_s:.0f} s")


def _kill_tree(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM our own process (``ray start --block`` then stops the node's processes), then
    SIGKILL what is left of its own process group (started with start_new_session)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # our session's group only: pgid == our child's pid
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def _kill_leftovers(marker: str) -> list[int]:
    """SIGKILL processes whose command line names our unique temp dir (Ray workers that left our
    process groups). Only ours: the marker is a fresh mkdtemp path."""
    killed = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
            except (ProcessLookupError, PermissionError):
                pass
    return killed


class Spawner:
    """Starts this test's own processes, each in its own session (so its whole process group can be
    killed) with its output in ``<work>/<name>.log``; keeps them by name."""

    def __init__(self, work: str, env: dict[str, str]):
        self.work, self.env = work, env
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, str] = {}

    def __call__(self, name: str, cmd: list[str], **extra_env: str) -> subprocess.Popen:
        self.logs[name] = os.path.join(self.work, f"{name}.log")
        with open(self.logs[name], "w") as out:
            self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                                env={**self.env, **extra_env}, cwd=self.work, start_new_session=True)
        return self.procs[name]


def _token_file(work: str) -> tuple[str, dict[str, str]]:
    """A fresh Ray auth token of this test's own (``~/.ray/auth_token`` is left alone), readable by
    us only: (its path for RAY_AUTH_TOKEN_PATH, the HTTP header for the dashboard APIs)."""
    token = secrets.token_hex(32)
    path = os.path.join(work, "auth_token")
    with open(path, "w") as f:
        f.write(token)
    os.chmod(path, 0o600)
    return path, {"Authorization": f"Bearer {token}"}


def _print_job_logs(client, submission_id: str | None) -> None:
    """On failure: the tail of a submitted job's output, if the job API still answers."""
    if client is not None and submission_id is not None:
        try:
            print(f"----- job {submission_id} logs (tail) -----\n{client.get_job_logs(submission_id)[-8000:]}")
        except Exception as e:
            print(f"(job logs unavailable: {e})")


def _stop_job(client, submission_id: str | None) -> None:
    """Stop a submitted job that is still running (before its cluster is torn down)."""
    if client is not None and submission_id is not None:
        try:
            if client.get_job_status(submission_id) not in ("SUCCEEDED", "FAILED", "STOPPED"):
                client.stop_job(submission_id)
        except Exception:
            pass


def _tail(path: str, n: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


# ------------------------------------ fixtures ----------------------------------------------


def _train_teacher(out: str) -> str:
    from trainables.data import DataConfig
    from trainables.teacher import train_teacher

    train_teacher("small_cnn", DataConfig(name="digits"), out, epochs=1, max_train_samples=256, progress=None)
    return out


def _write_spec(work: str, teacher_dir: str, name: str, resources: dict | None = None,
                mlflow: dict | None = None) -> str:
    """A tiny quickstart sweep (2 trials, 2 epochs, 3 shots) named ``name`` in ``<work>/<name>.yaml``;
    the tracking URI is always given on the command line."""
    with open(os.path.join(ROOT, "sweeps", "quickstart.yaml")) as f:
        d = yaml.safe_load(f)
    d.update(name=name, storage=os.path.join(work, "runs"), epochs=EPOCHS, batch_size=20)
    d["data"].update(shots=3)
    d["teacher"].update(path=teacher_dir)
    d["search"].update(num_trials=NUM_TRIALS, scheduler="none", n_startup_trials=1,
                       space={"loss.lam": {"type": "loguniform", "low": 0.5, "high": 5.0}})
    d["resources"] = resources or {"workers_per_trial": 2, "cpus_per_worker": 1, "driver_cpus": 0.25}
    d["mlflow"] = mlflow or {"tracking_uri": "http://overridden-by-the-command-line:5000", "experiment": "e2kd-multinode"}
    path = os.path.join(work, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(d, f)
    return path


# ------------------------------------ the test ----------------------------------------------


@pytest.mark.skipif(not os.path.isfile(os.path.join(BIN, "ray")) or not os.path.isfile(os.path.join(BIN, "e2kd")),
                    reason="needs the venv's ray and e2kd executables")
def test_two_node_cluster_job_sweep_spreads_workers():
    from mlflow import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    t_start = time.time()
    # Short path: Ray's unix sockets live under the temp dir (108-byte limit).
    work = tempfile.mkdtemp(prefix="e2kdmn-", dir="/tmp")
    token_path, auth = _token_file(work)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "MLFLOW_"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path, RAY_USAGE_STATS_ENABLED="0",
               RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="240", PYTHONUNBUFFERED="1")

    spawn = Spawner(work, env)
    procs, logs = spawn.procs, spawn.logs
    netns = None
    client = None
    submission_id = None
    failed = False

    try:
        netns = _try_netns()
        mode = "netns" if netns else "loopback"
        head_ip = netns.host_ip if netns else "127.0.0.1"
        peer_ip = netns.peer_ip if netns else "127.0.0.1"
        print(f"[multinode] second node: {'own network namespace ' + netns.name if netns else 'loopback raylet'}; "
              f"head {head_ip}, node_b {peer_ip}")

        (gcs, dash, client_port, mlflow_port, *p) = _free_ports(10)
        mlflow_uri = f"http://{head_ip}:{mlflow_port}"
        dash_url = f"http://127.0.0.1:{dash}"

        # MLflow first: it is the slowest to come up here (up to ~60 s on 2 cores). One uvicorn
        # worker instead of cluster.yaml's default 4: this machine has 2 cores.
        spawn("mlflow", [os.path.join(BIN, "mlflow"), "server", "--host", head_ip, "--port", str(mlflow_port),
                         "--workers", "1", "--backend-store-uri", f"sqlite:///{work}/mlflow.db",
                         "--artifacts-destination", os.path.join(work, "mlartifacts")])

        # This machine's hostname resolves to 127.0.0.1, which gloo would advertise to the other
        # node: name each node's interface, as on any multi-homed host.
        gloo_a = {"GLOO_SOCKET_IFNAME": netns.host_if} if netns else {}
        gloo_b = {"GLOO_SOCKET_IFNAME": netns.peer_if} if netns else {}
        common = ["--num-cpus", "2", "--num-gpus", "0", "--object-store-memory", str(150 * 1024**2),
                  "--min-worker-port", "0", "--max-worker-port", "0", "--disable-usage-stats", "--block"]
        spawn("head", [os.path.join(BIN, "ray"), "start", "--head", "--node-ip-address", head_ip,
                       "--port", str(gcs), "--resources", json.dumps({"node_a": 2}),
                       "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                       "--ray-client-server-port", str(client_port),
                       "--node-manager-port", str(p[0]), "--object-manager-port", str(p[1]),
                       "--dashboard-agent-listen-port", str(p[2]), "--dashboard-agent-grpc-port", str(p[3]),
                       "--runtime-env-agent-port", str(p[4]), "--metrics-export-port", str(p[5]),
                       "--temp-dir", os.path.join(work, "h"), *common], **gloo_a)
        # The teacher trains here, while the head and MLflow start (they are mostly waiting on I/O).
        teacher_dir = _train_teacher(os.path.join(work, "teacher"))
        client = _wait(lambda: _try_client(JobSubmissionClient, dash_url, auth), 120, "Ray dashboard / job API",
                       {"head": procs["head"]}, step=2)

        state = StateApiClient(address=dash_url, headers=auth)

        def two_nodes():
            nodes = state.list(StateResource.NODES, options=ListApiOptions(detail=True), raise_on_missing_output=False)
            alive = [n for n in nodes if n.state == "ALIVE"]
            by_res = {r: n for n in alive for r in ("node_a", "node_b") if r in (n.resources_total or {})}
            return by_res if len(alive) == 2 and set(by_res) == {"node_a", "node_b"} else None

        # `ray start` gives a joining raylet a fixed 30 s to register with the GCS; on this 2-core
        # machine under other jobs' load that is sometimes not enough ("The current node timed
        # out during startup"): retry the join, on fresh ports and a fresh temp dir.
        for attempt in range(3):
            q = _free_ports(6)
            spawn("node_b", [*(netns.prefix() if netns else []), os.path.join(BIN, "ray"), "start",
                             "--address", f"{head_ip}:{gcs}", "--node-ip-address", peer_ip,
                             "--resources", json.dumps({"node_b": 2}),
                             "--node-manager-port", str(q[0]), "--object-manager-port", str(q[1]),
                             "--dashboard-agent-listen-port", str(q[2]), "--dashboard-agent-grpc-port", str(q[3]),
                             "--runtime-env-agent-port", str(q[4]), "--metrics-export-port", str(q[5]),
                             "--temp-dir", os.path.join(work, f"b{attempt}"), *common], **gloo_b)
            try:
                nodes = _wait(two_nodes, 120, "two alive Ray nodes", {"head": procs["head"], "node_b": procs["node_b"]},
                              step=2)
                break
            except RuntimeError as e:  # node_b's `ray start` exited
                if "node_b exited" not in str(e) or attempt == 2:
                    raise
                print(f"[multinode] node_b failed to join (attempt {attempt + 1}):\n{_tail(logs['node_b'], 3)}")
                _kill_tree(procs.pop("node_b"))
        node_ids = {r: n.node_id for r, n in nodes.items()}
        assert node_ids["node_a"] != node_ids["node_b"]
        if netns:
            assert (nodes["node_a"].node_ip, nodes["node_b"].node_ip) == (head_ip, peer_ip)
        print(f"[multinode] cluster up after {time.time() - t_start:.0f} s: {node_ids}")

        _wait(lambda: _http_ok(f"{mlflow_uri}/health"), 120, "MLflow /health", {"mlflow": procs["mlflow"]}, step=2)
        print(f"[multinode] MLflow up after {time.time() - t_start:.0f} s")

        name = f"mn-{uuid.uuid4().hex[:8]}"
        spec_path = _write_spec(work, teacher_dir, name)
        entrypoint = (f"{os.path.join(BIN, 'e2kd')} sweep {spec_path} --address auto --tracking-uri {mlflow_uri} "
                      f"--set resources.placement_strategy=STRICT_SPREAD")
        submission_id = client.submit_job(
            entrypoint=entrypoint, submission_id=f"e2kd-{name}",
            # RAY_ADDRESS for every process of the job: Train's PlacementGroupCleaner otherwise
            # resolves "auto" by scanning this machine's processes and fails when other Ray
            # instances run here ("Found multiple active Ray instances").
            runtime_env={"env_vars": {"RAY_ADDRESS": f"{head_ip}:{gcs}", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "240",
                                      "E2KD_TORCH_THREADS": "1"}})
        t_job = time.time()
        terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
        status = _wait(lambda: (s := client.get_job_status(submission_id)) in terminal and s, JOB_TIMEOUT_S,
                       f"job {submission_id}", {"head": procs["head"], "node_b": procs["node_b"],
                                                "mlflow": procs["mlflow"]}, step=3)
        job_logs = client.get_job_logs(submission_id)
        print(f"[multinode] job {status} after {time.time() - t_job:.0f} s")
        assert status == JobStatus.SUCCEEDED, f"job {status}:\n{job_logs[-6000:]}"
        assert "sweep finished" in job_logs, job_logs[-3000:]

        # --- the Train workers of every trial ran on two different nodes ---------------------
        # (PACK would have put both on one node: see the module docstring.)
        job_id = client.get_job_info(submission_id).job_id
        workers = state.list(StateResource.ACTORS, options=ListApiOptions(
            filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000), raise_on_missing_output=False)
        workers = [w for w in workers if not job_id or w.job_id == job_id]
        groups: dict[str, list] = defaultdict(list)
        for w in workers:
            groups[w.placement_group_id].append(w)
        assert len(groups) >= NUM_TRIALS, f"{len(groups)} worker groups for {NUM_TRIALS} trials: {workers}"
        for pg_id, ws in groups.items():
            assert len(ws) == 2, f"placement group {pg_id}: {len(ws)} workers"
            assert {w.node_id for w in ws} == {node_ids["node_a"], node_ids["node_b"]}, (
                f"placement group {pg_id}: workers on {[w.node_id for w in ws]}, nodes {node_ids}")
        # The controller's own account, when its log reaches the job output: two distinct node IPs.
        if netns and "Started training worker group of size 2" in job_logs:
            assert f"ip={head_ip}," in job_logs and f"ip={peer_ip}," in job_logs

        # --- MLflow: one parent, exactly one child run per trial ------------------------------
        ml = MlflowClient(mlflow_uri)
        exp = ml.get_experiment_by_name("e2kd-multinode")
        assert exp is not None
        parents = ml.search_runs([exp.experiment_id], f"tags.`e2kd.sweep` = '{name}' and tags.`e2kd.role` = 'parent'")
        assert len(parents) == 1
        assert parents[0].info.status == "FINISHED"
        children = ml.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
        trial_ids = [c.data.tags["e2kd.trial_id"] for c in children]
        assert len(children) == NUM_TRIALS and len(set(trial_ids)) == NUM_TRIALS, trial_ids
        assert {c.data.tags["method"] for c in children} == {"kd", "e2kd"}
        for c in children:
            assert c.info.status == "FINISHED", (c.info.run_name, c.info.status)
            history = ml.get_metric_history(c.info.run_id, "val_agreement")
            assert [m.step for m in history] == list(range(1, EPOCHS + 1))
        # Each trial's Train run wrote its results to the shared storage, named by its trial id.
        runs_dir = os.listdir(os.path.join(work, "runs"))
        assert {f"{name}-train-{t}" for t in trial_ids} <= set(runs_dir), runs_dir
        print(f"[multinode] {mode}: OK in {time.time() - t_start:.0f} s (job {time.time() - t_job:.0f} s)")
    except BaseException:
        failed = True
        for n, path in logs.items():
            print(f"----- {n} log (tail) -----\n{_tail(path)}")
        _print_job_logs(client, submission_id)
        raise
    finally:
        _stop_job(client, submission_id)
        for p_ in procs.values():  # SIGTERM all first: they shut down in parallel
            if p_.poll() is None:
                p_.send_signal(signal.SIGTERM)
        for n in ("node_b", "head", "mlflow"):
            if n in procs:
                _kill_tree(procs[n])
        time.sleep(1)
        leftovers = _kill_leftovers(work)
        if leftovers:
            print(f"[multinode] killed {len(leftovers)} leftover processes of this cluster: {leftovers}")
        if netns:
            netns.delete()
        if failed and os.environ.get("E2KD_MULTINODE_KEEP"):
            print(f"[multinode] kept {work} (E2KD_MULTINODE_KEEP)")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _try_client(cls, url: str, headers: dict):
    try:
        return cls(url, headers=headers)
    except Exception:
        return None


# ------------------------------------ docs ↔ CLI (fast) -------------------------------------


def test_documented_job_submission_matches_cli():
    """The `ray job submit` / `e2kd sweep` commands in docs/cluster.md use options that exist."""
    import re

    from ray.dashboard.modules.job.cli import submit

    from orchestrator.cli import build_parser

    with open(os.path.join(ROOT, "docs", "cluster.md")) as f:
        text = f.read()
    ray_opts = {o for p in submit.params for o in p.opts}
    sweep_opts = set(build_parser()._subparsers._group_actions[0].choices["sweep"]._option_string_actions)
    # Command lines in the code blocks (``\``-continued lines joined), env assignments allowed first.
    lines = text.splitlines()
    cmds = []
    for i, line in enumerate(lines):
        if re.match(r"\s*(?:[A-Z_]+=\S+\s+)*ray job submit\b", line):
            cmd = line
            while cmd.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd = cmd.rstrip()[:-1] + " " + lines[i]
            cmds.append(cmd.split("ray job submit", 1)[1])
    assert cmds, "docs/cluster.md documents no `ray job submit`"
    entries = 0
    for cmd in cmds:
        submit_part, _, entry = cmd.partition(" -- ")
        for opt in re.findall(r"(?<!\S)(--?[a-z][\w-]*)", submit_part):
            assert opt in ray_opts, f"`ray job submit {opt}` (docs/cluster.md) is not an option: {sorted(ray_opts)}"
        if "e2kd sweep" in entry:
            entries += 1
            for spec in re.findall(r"sweeps/[\w.-]+\.ya?ml", entry):
                assert os.path.isfile(os.path.join(ROOT, spec)), f"docs/cluster.md submits {spec}, which does not exist"
            for opt in re.findall(r"(?<!\S)(--[a-z][\w-]*)", entry.split("#")[0]):
                assert opt in sweep_opts, f"`e2kd sweep {opt}` (docs/cluster.md) is not an option"
    assert entries, "no documented `ray job submit ... -- e2kd sweep ...`"
    # Flags the text recommends in prose exist too.
    for opt in ("--no-wait", "--submission-id", "--runtime-env-json", "--entrypoint-num-cpus", "--working-dir"):
        if opt in text:
            assert opt in ray_opts, opt
