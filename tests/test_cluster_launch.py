"""`ray up` for real: cluster-local.yaml launched by Ray's own launcher against SSH hosts made on
this machine, a 2-trial sweep run on that cluster, then `ray down`.

The hosts. Each one is a network namespace (``ip netns``, names ``e2l<tag>h<i>``) on a bridge
(``e2l<tag>br``, 10.x.y.1/24; host i at 10.x.y.(10+i), default route via the bridge, so Ray finds
its address as on a LAN) with its own mount and PID namespace (``unshare``): a private home
(bound over the SSH user's home), a private /tmp (Ray's /tmp/ray: sessions, `address="auto"`,
the head's local-provider state), /mnt/{data,models,shared} bound to one directory of this test
(the "NFS" export, mounted beforehand as cluster-local.yaml allows) and its own /proc. PID 1 of a
host is a tiny Python init that reaps orphans and runs ``sshd -D`` on the host's address with a
host key, config and ``authorized_keys`` made by the test. The PID namespace is not decoration:
the cluster file's start commands run ``ray stop``, which stops every Ray process it can see;
inside a host it sees only that host's. The hosts share this machine's filesystem otherwise, so
they run the venv this test runs in (derived from ``sys.executable``).

The launcher. ``ray up -y`` / ``ray exec`` / ``ray down -y`` run here (the root namespace, the
"laptop") with ``HOME`` set to a directory of the test, so ``~/.ray/auth_token`` and
``~/.e2kd-mlflow.env`` are the test's, made the documented way (``ray get-auth-token
--generate``; the umask printf of docs/cluster.md), and ``~`` of this machine is left alone. The
cluster file is cluster-local.yaml rendered by :func:`render` — only what a user edits:

* the lines marked EDIT: ``provider.head_ip``/``worker_ips``, ``auth`` (root and the test's key);
  the NFS server stays ``nfs.REPLACE-ME``, because every host has its shares mounted already and
  the guarded commands then do nothing (that guard is part of what runs);
* ``cluster_name`` made unique per run (the launcher keeps /tmp/ray/cluster-<name>.state/.lock,
  removed afterwards);
* the ``docker`` section removed: this machine has no container runtime (the file's own comment
  says how to run without Docker; the Docker variant stays covered by test_cluster_config.py);
* the ``pip install ... -e .`` setup commands replaced by an import check of the synced project
  (:data:`PIP_STANDIN`). Decided so because the hosts share one venv with every other test on this
  machine: ``pip install -e ~/e2kd`` would repoint that venv's editable install at a host's copy.
  The hosts' ``~/.bashrc`` instead puts ``~/e2kd`` (the copy ``file_mounts`` delivered) first on
  PYTHONPATH, so every e2kd command on the cluster — ``python -m orchestrator.mlflow_auth``,
  ``e2kd capacity``, the sweep — runs the synced files, not this checkout.
  :func:`test_render_changes_only_what_the_launch_test_documents` keeps this list honest.

Everything else — initialization_commands, setup_commands (RAY_AUTH_MODE and the MLflow env file
into ``~/.bashrc``), file_mounts and rsync filters, the head's ``ray start`` with the autoscaler,
``e2kd capacity --publish``, the MLflow basic-auth server start-up script, the workers started by
the head's autoscaler over SSH with ``RAY_HEAD_IP`` — runs as written.

Checks, as a user would make them: every host joined (node count and addresses); the MLflow server
the head's start commands started answers ``/health``, refuses a request without credentials and
holds one parent run with one FINISHED child run per trial; every host's ``~/.ray/auth_token`` is
the launcher's; every host's ``~/e2kd`` holds this checkout's files (and no ``.git``/``.venv``);
after ``ray down -y`` no process of this cluster but MLflow (which ``ray down`` does not stop
without Docker, as docs/cluster.md says), sshd and the init is left in any host's namespaces
(``ip netns pids``, never by process name).

Discrimination, checked once for real: with the head's MLflow start command changed to
``--backend-store-urii`` (a wrong flag; a copy of the file given by E2KD_LAUNCH_CLUSTER_FILE),
``ray up`` still exited 0 — the start-up script only printed the tail of ~/mlflow/server.log,
``Error: No such option '--backend-store-urii'`` — and this test failed at its /health check,
``AssertionError: MLflow at http://10.x.y.10:5000 did not answer`` (4 min 18 s in all).

Needs root (namespaces, mounts), ``ip``, ``unshare``, ``sshd``, ``ssh`` and ``rsync``;
openssh-server and rsync are apt-get installed when missing and running as root (as
test_mlflow_ui_browser.py does for chromium), otherwise the test is skipped with the reason.
``E2KD_LAUNCH_KEEP=1`` keeps the work directory of a failed run.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)  # the venv the hosts run (shared filesystem)
# E2KD_LAUNCH_CLUSTER_FILE: launch a modified copy instead (how the discrimination check below
# was made; the project files synced are still this checkout's).
CLUSTER_FILE = os.environ.get("E2KD_LAUNCH_CLUSTER_FILE") or os.path.join(ROOT, "cluster-local.yaml")
NUM_WORKERS = int(os.environ.get("E2KD_LAUNCH_WORKERS", "1"))  # worker hosts besides the head
NUM_TRIALS, EPOCHS = 2, 2
EXPERIMENT = "e2kd-launch"
SSHD = "/usr/sbin/sshd"
# What stands in for `pip install -e .` on the hosts (see the module docstring): the synced project
# imports from ~/e2kd, i.e. file_mounts delivered it and PYTHONPATH points there.
PIP_STANDIN = ("cd ~/e2kd && python -c \"import orchestrator, trainables, os; "
               "assert orchestrator.__file__.startswith(os.path.expanduser('~/e2kd/')), orchestrator.__file__\"")


# ------------------------------------------------------------------ rendering (fast, tested below)


def render(raw: dict, *, cluster_name: str, head_ip: str, worker_ips: list[str], ssh_user: str,
           ssh_key: str) -> dict:
    """cluster-local.yaml as a user edits it for these hosts (module docstring): EDIT lines,
    a unique cluster name, no Docker, the pip installs replaced by :data:`PIP_STANDIN`."""
    cfg = json.loads(json.dumps(raw))  # deep copy
    cfg["cluster_name"] = cluster_name
    cfg["provider"].update(head_ip=head_ip, worker_ips=list(worker_ips))
    cfg["auth"] = {"ssh_user": ssh_user, "ssh_private_key": ssh_key}
    cfg.pop("docker")
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        cfg[key] = [PIP_STANDIN if "pip install" in c else c for c in cfg[key]]
    return cfg


def test_render_changes_only_what_the_launch_test_documents():
    """The launch test runs cluster-local.yaml except for the documented edits: compare the rendered
    file with the original key by key (an independent walk, not render's own code)."""
    with open(CLUSTER_FILE) as f:
        text = f.read()
    raw = yaml.safe_load(text)
    cfg = render(raw, cluster_name="c", head_ip="10.0.0.10", worker_ips=["10.0.0.11"], ssh_user="u", ssh_key="/k")
    assert set(raw) - set(cfg) == {"docker"} and set(cfg) <= set(raw)
    changed = {k for k in cfg if cfg[k] != raw[k]}
    assert changed <= {"cluster_name", "provider", "auth", "setup_commands", "head_setup_commands"}, changed
    assert {k: v for k, v in cfg["provider"].items() if k not in ("head_ip", "worker_ips")} == \
        {k: v for k, v in raw["provider"].items() if k not in ("head_ip", "worker_ips")}
    # The provider/auth fields replaced are exactly the ones the file marks EDIT.
    for field in ("head_ip", "worker_ips", "ssh_user", "ssh_private_key"):
        assert re.search(rf"^\s*{field}:.*# EDIT", text, re.M), f"{field} is not marked EDIT in cluster-local.yaml"
    # The only commands replaced are the pip installs, one for one, in place.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert len(cfg[key]) == len(raw[key])
        for old, new in zip(raw[key], cfg[key]):
            assert new == old or ("pip install" in old and new == PIP_STANDIN), (key, old)
    assert sum("pip install" in c for k in ("setup_commands", "head_setup_commands") for c in raw[k]) == 2
    # Every other command block runs verbatim, including the NFS guards (shares mounted beforehand).
    for key in ("initialization_commands", "head_start_ray_commands", "worker_start_ray_commands", "file_mounts"):
        assert cfg[key] == raw[key], key


# ------------------------------------------------------------------ prerequisites


def _ssh_tools() -> None:
    """openssh-server and rsync (Ray's on-premise launcher uses ssh + rsync), apt-get installed when
    missing and running as root; otherwise skip with the reason."""
    if os.geteuid() != 0:
        pytest.skip("needs root: SSH hosts are network/mount/PID namespaces (ip netns, unshare)")
    for tool in ("ip", "unshare", "mount"):
        if not shutil.which(tool):
            pytest.skip(f"`{tool}` is not installed")
    missing = [pkg for pkg, path in (("openssh-server", SSHD), ("openssh-client", "ssh"), ("rsync", "rsync"))
               if not (os.path.exists(path) if path.startswith("/") else shutil.which(path))]
    if not missing:
        return
    if not shutil.which("apt-get"):
        pytest.skip(f"{' '.join(missing)} not installed and no apt-get: `apt-get install -y {' '.join(missing)}`")
    # RUNLEVEL=1: the package's maintainer scripts must not start a system sshd on this machine.
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "RUNLEVEL": "1"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:  # stale package lists: update once, then retry
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=600)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0 or not os.path.exists(SSHD) or not shutil.which("rsync"):
        pytest.skip(f"apt-get install {' '.join(missing)} failed (no package mirror reachable?): {r.stderr[-500:]}")


def _sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=timeout)


# ------------------------------------------------------------------ the hosts

# PID 1 of a host: mount the host's private views, run sshd, reap every orphan (daemonised Ray
# processes, nohup'd MLflow) so that `ray stop` and the leftover check see no zombies. When it
# exits, the kernel kills everything else in the host's PID namespace.
HOST_INIT = r"""
import os, subprocess, sys
home, tmp, shared, user_home, *keep = sys.argv[1:]
def mount(*a):
    subprocess.run(["mount", *a], check=True)
for path in keep:                                  # a pyenv Python under the real home, a venv in /tmp
    under_home = os.path.realpath(path).startswith(os.path.realpath(user_home) + os.sep)
    inside = (os.path.join(home, os.path.relpath(path, user_home)) if under_home
              else os.path.join(tmp, os.path.relpath(path, "/tmp")))
    os.makedirs(inside, exist_ok=True)
    mount("--bind", path, inside)
mount("--rbind", home, user_home)
mount("-t", "tmpfs", "e2l-mnt", "/mnt")            # private /mnt: nothing created on the real one
for d in ("data", "models", "shared"):
    os.makedirs("/mnt/" + d)
    mount("--bind", os.path.join(shared, d), "/mnt/" + d)
mount("--rbind", tmp, "/tmp")                      # last: the sources above live under /tmp (r: with the kept venv)
os.makedirs("/run/sshd", exist_ok=True)            # sshd's privilege-separation directory
sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", os.path.join(user_home, ".ssh", "e2l_sshd_config")])
while True:
    try:
        pid, _ = os.wait()
    except ChildProcessError:
        break
    if pid == sshd.pid:
        break
"""


class Hosts:
    """SSH hosts on a bridge, each a network+mount+PID namespace running its own sshd."""

    def __init__(self, work: str, n: int, user_home: str, pubkey: str):
        self.tag = uuid.uuid4().hex[:6]
        self.work, self.n, self.user_home = work, n, user_home
        self.bridge = f"e2l{self.tag}br"
        self.names = [f"e2l{self.tag}h{i}" for i in range(n)]
        used = _sh("ip", "-o", "-4", "addr", "show").stdout
        while True:
            net = f"10.{secrets.randbelow(200) + 20}.{secrets.randbelow(250) + 1}"
            if f"{net}." not in used:
                break
        self.gateway = f"{net}.1"
        self.ips = [f"{net}.{10 + i}" for i in range(n)]
        self.homes = [os.path.join(work, f"h{i}", "home") for i in range(n)]
        self.procs: list[subprocess.Popen] = []
        self.made_links: list[str] = []
        self.made_ns: list[str] = []
        self.shared = os.path.join(work, "nfs")
        for d in ("data", "models", "shared"):
            os.makedirs(os.path.join(self.shared, d))
        self.pubkey = pubkey
        # The private home and /tmp hide the real ones: keep the Python installation visible when
        # it lives there (pyenv in /root on this machine; the venv of a checkout under /tmp), at its
        # own path, read-only in spirit.
        self.keep = sorted({p for p in (sys.base_prefix, sys.prefix)
                            if any(os.path.realpath(p).startswith(os.path.realpath(d) + os.sep)
                                   for d in (user_home, "/tmp"))})

    def _provision(self, i: int) -> None:
        """What an administrator does once per host: a home with the SSH key, sshd's config and
        host key, and a ~/.bashrc that activates the venv (cluster-local.yaml: "a venv activated
        from ~/.bashrc") and stands in for `pip install -e ~/e2kd` (module docstring)."""
        home = self.homes[i]
        ssh = os.path.join(home, ".ssh")
        os.makedirs(ssh)
        os.makedirs(os.path.join(self.work, f"h{i}", "tmp"))
        os.chmod(os.path.join(self.work, f"h{i}", "tmp"), 0o1777)
        with open(os.path.join(ssh, "authorized_keys"), "w") as f:
            f.write(self.pubkey)
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(ssh, "e2l_host_key"))
        u = self.user_home
        with open(os.path.join(ssh, "e2l_sshd_config"), "w") as f:
            f.write(f"ListenAddress {self.ips[i]}\nPort 22\nHostKey {u}/.ssh/e2l_host_key\n"
                    f"AuthorizedKeysFile {u}/.ssh/authorized_keys\nPermitRootLogin prohibit-password\n"
                    "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                    "PidFile none\nMaxStartups 100\nMaxSessions 100\n")
        with open(os.path.join(home, ".bashrc"), "w") as f:
            f.write(f"# e2l test host provisioning\nexport PATH={BIN}:$PATH\n"
                    "export PYTHONPATH=$HOME/e2kd   # stands in for `pip install -e ~/e2kd`\n"
                    "export E2KD_TORCH_THREADS=1   # 3 hosts on 2 shared cores\n")

    def start(self) -> None:
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        self.made_links.append(self.bridge)
        _sh("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for i, ns in enumerate(self.names):
            self._provision(i)
            outer, inner = f"e2l{self.tag}v{i}", f"e2l{self.tag}p{i}"
            _sh("ip", "netns", "add", ns)
            self.made_ns.append(ns)
            _sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            self.made_links.append(outer)
            _sh("ip", "link", "set", inner, "netns", ns)
            _sh("ip", "link", "set", outer, "master", self.bridge)
            _sh("ip", "link", "set", outer, "up")
            for c in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{self.ips[i]}/24", "dev", inner],
                      ["ip", "link", "set", inner, "up"], ["ip", "route", "add", "default", "via", self.gateway]):
                _sh("ip", "netns", "exec", ns, *c)
            log = open(os.path.join(self.work, f"h{i}", "init.log"), "w")
            self.procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, "unshare", "--mount", "--pid", "--fork", "--kill-child",
                 "--mount-proc", "--propagation", "private", sys.executable, "-c", HOST_INIT,
                 self.homes[i], os.path.join(self.work, f"h{i}", "tmp"), self.shared, self.user_home,
                 *self.keep],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            log.close()

    def pids(self, i: int) -> list[int]:
        r = _sh("ip", "netns", "pids", self.names[i], check=False)
        return [int(p) for p in r.stdout.split()]

    def stop(self) -> None:
        """SIGKILL each host's unshare: its --kill-child takes PID 1, and with it every process of
        the host's PID namespace; then remove the links and namespaces this test made."""
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for i, ns in enumerate(self.made_ns):  # anything that setns'd into a host on its own
            for pid in self.pids(i):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for link in self.made_links:
            _sh("ip", "link", "del", link, check=False)
        for ns in self.made_ns:
            _sh("ip", "netns", "del", ns, check=False)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _leftovers(hosts: Hosts, i: int) -> dict[int, str]:
    """Processes in host i's network namespace other than its unshare/init/sshd listener and
    the MLflow server's process tree (``ray down`` does not stop MLflow without Docker)."""
    pids = set(hosts.pids(i))
    base = hosts.procs[i].pid  # `ip netns exec` exec'd unshare: same pid
    allowed = {base} | {p for p in pids if _ppid(p) == base}  # the init
    allowed |= {p for p in pids if _ppid(p) in allowed and "e2l_sshd_config" in _cmdline(p)}  # sshd -D
    roots = {p for p in pids if re.search(r"\bmlflow server\b", _cmdline(p))}
    tree, grew = set(roots), True
    while grew:
        more = {p for p in pids if _ppid(p) in tree} - tree
        tree |= more
        grew = bool(more)
    return {p: _cmdline(p) for p in sorted(pids - allowed - tree)}


# ------------------------------------------------------------------ launcher helpers


class Launcher:
    """`ray up/exec/down` with this test's HOME and environment, output kept in <work>/launcher.log."""

    def __init__(self, work: str, home: str, config: str):
        self.config, self.log = config, os.path.join(work, "launcher.log")
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("RAY_", "MLFLOW_", "PYTHONPATH", "VIRTUAL_ENV"))}
        self.env.update(HOME=home, RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}:{os.environ.get('PATH', '')}")

    def __call__(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        t = time.time()
        r = subprocess.run([os.path.join(BIN, "ray"), *args], capture_output=True, text=True, env=self.env,
                           cwd=ROOT, timeout=timeout)
        with open(self.log, "a") as f:
            f.write(f"\n===== ray {' '.join(args)}  (rc {r.returncode}, {time.time() - t:.0f} s)\n"
                    f"{r.stdout}\n----- stderr\n{r.stderr}\n")
        return r

    def exec(self, cmd: str, timeout: float) -> str:
        r = self("exec", self.config, cmd, timeout=timeout)
        assert r.returncode == 0, f"ray exec {cmd!r} failed (rc {r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}"
        return r.stdout + r.stderr


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception:
        return None


def _write_spec(path: str, teacher_dir: str, name: str) -> None:
    """The quickstart, tiny: 2 trials × 2 epochs, 3 shots, on the cluster's shared paths, the
    Tune drivers on the head (TRAIN_DRIVER_RESOURCE, as in the cluster specs in sweeps/)."""
    with open(os.path.join(ROOT, "sweeps", "quickstart.yaml")) as f:
        d = yaml.safe_load(f)
    d.update(name=name, storage="/mnt/shared/ray-results", epochs=EPOCHS, batch_size=20)
    d["data"].update(shots=3)
    d["teacher"].update(path=teacher_dir)
    d["search"].update(num_trials=NUM_TRIALS, scheduler="none", n_startup_trials=1,
                       space={"loss.lam": {"type": "loguniform", "low": 0.5, "high": 5.0}})
    d["resources"] = {"workers_per_trial": 1, "cpus_per_worker": 1, "driver_cpus": 0.25,
                      "driver_resource": "TRAIN_DRIVER_RESOURCE"}
    d["mlflow"] = {"tracking_uri": "http://overridden-by-the-command-line:5000", "experiment": EXPERIMENT}
    with open(path, "w") as f:
        yaml.safe_dump(d, f)


NODES_PY = """
import json, time, ray
ray.init(address="auto", logging_level="ERROR")
deadline = time.time() + {timeout}
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= {want} or time.time() > deadline:
        break
    time.sleep(2)
print("E2L_NODES " + json.dumps(sorted(n["NodeManagerAddress"] for n in alive)))
"""


# ------------------------------------------------------------------ the test


def test_ray_up_cluster_local_runs_a_sweep_and_ray_down_cleans_up(teacher_dir, monkeypatch):
    _ssh_tools()
    import getpass

    from mlflow import MlflowClient

    t0 = time.time()
    work = tempfile.mkdtemp(prefix="e2l-", dir="/tmp")
    user = getpass.getuser()
    user_home = os.path.expanduser(f"~{user}")
    home = os.path.join(work, "launcher")
    os.makedirs(os.path.join(home, ".ssh"))
    key = os.path.join(home, ".ssh", "id_ed25519")
    _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "e2l-launch-test", "-f", key)
    with open(key + ".pub") as f:
        pubkey = f.read()
    cluster_name = f"e2l-{uuid.uuid4().hex[:8]}"
    hosts = Hosts(work, 1 + NUM_WORKERS, user_home, pubkey)
    config = os.path.join(work, "cluster.yaml")
    ray = Launcher(work, home, config)
    launched, failed = False, False
    try:
        hosts.start()
        # The documented prerequisites (docs/cluster.md, section 1), in the launcher's HOME.
        r = ray("get-auth-token", "--generate", timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        with open(os.path.join(home, ".ray", "auth_token")) as f:
            token = f.read().strip()
        password = secrets.token_urlsafe(24)
        fd = os.open(os.path.join(home, ".e2kd-mlflow.env"), os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"MLFLOW_TRACKING_USERNAME=e2kd\nMLFLOW_TRACKING_PASSWORD={password}\n")
        with open(CLUSTER_FILE) as f:
            cfg = render(yaml.safe_load(f), cluster_name=cluster_name, head_ip=hosts.ips[0],
                         worker_ips=hosts.ips[1:], ssh_user=user, ssh_key=key)
        with open(config, "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        teacher = os.path.join(hosts.shared, "models", "teacher")
        shutil.copytree(teacher_dir, teacher)
        _write_spec(os.path.join(hosts.shared, "shared", "spec.yaml"), "/mnt/models/teacher", cluster_name)

        # --- ray up --------------------------------------------------------------------------
        launched = True
        t_up = time.time()
        r = ray("up", "-y", "--no-config-cache", config, timeout=600)
        assert r.returncode == 0, f"ray up failed (rc {r.returncode}):\n{(r.stdout + r.stderr)[-6000:]}"
        up_out = r.stdout + r.stderr
        print(f"[launch] ray up: {time.time() - t_up:.0f} s")

        # --- every host joined (the workers are started by the head's autoscaler, over SSH) ---
        out = ray.exec(f"python -c '{NODES_PY.format(timeout=240, want=len(hosts.ips))}'", timeout=330)
        nodes = json.loads(re.search(r"E2L_NODES (\[.*\])", out).group(1))
        assert sorted(nodes) == sorted(hosts.ips), f"alive Ray nodes {nodes}, hosts {hosts.ips}"
        print(f"[launch] {len(nodes)} nodes alive after {time.time() - t0:.0f} s")

        # --- MLflow, as the head's start commands left it -------------------------------------
        out = ray.exec("cat ~/mlflow/tracking_uri", timeout=60)
        uri = re.search(r"http://[0-9.]+:5000", out).group(0)
        assert uri == f"http://{hosts.ips[0]}:5000", (uri, "MLflow is not on the head's address")
        # `ray up` waited for /health already; a loaded machine may still be restarting a uvicorn
        # worker (uvicorn replaces workers that miss its health ping), hence a short grace.
        deadline = time.time() + 30
        while (health := _http_status(f"{uri}/health")) != 200 and time.time() < deadline:
            time.sleep(1)
        assert health == 200, f"MLflow at {uri} did not answer; ray up said:\n{up_out[-3000:]}"
        assert _http_status(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1") == 401  # basic-auth app

        # --- what file_mounts delivered, on every host ---------------------------------------
        for i, h in enumerate(hosts.homes):
            with open(os.path.join(h, ".ray", "auth_token")) as f:
                assert f.read().strip() == token, f"host {hosts.ips[i]}: ~/.ray/auth_token is not the launcher's"
            assert oct(os.stat(os.path.join(h, ".e2kd-mlflow.env")).st_mode & 0o777) == "0o600"
            for rel in ("orchestrator/cli.py", "trainables/train_loop.py", "constraints.txt", "cluster-local.yaml"):
                with open(os.path.join(ROOT, rel), "rb") as a, open(os.path.join(h, "e2kd", rel), "rb") as b:
                    assert a.read() == b.read(), f"host {hosts.ips[i]}: ~/e2kd/{rel} differs from the checkout"
            for excluded in (".git", ".venv"):
                assert not os.path.exists(os.path.join(h, "e2kd", excluded)), f"{excluded} was synced to {hosts.ips[i]}"

        # --- the sweep, on the head, as a user attached to it --------------------------------
        t_sweep = time.time()
        out = ray.exec(f"cd ~/e2kd && e2kd sweep /mnt/shared/spec.yaml --address auto --tracking-uri {uri}",
                       timeout=600)
        print(f"[launch] sweep: {time.time() - t_sweep:.0f} s")
        assert "sweep finished" in out, out[-4000:]
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "e2kd")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        ml = MlflowClient(uri)
        exp = ml.get_experiment_by_name(EXPERIMENT)
        assert exp is not None
        (parent,) = ml.search_runs([exp.experiment_id], f"tags.`e2kd.sweep` = '{cluster_name}' and "
                                                         "tags.`e2kd.role` = 'parent'")
        assert parent.info.status == "FINISHED"
        children = ml.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        trial_ids = [c.data.tags["e2kd.trial_id"] for c in children]
        assert len(children) == NUM_TRIALS and len(set(trial_ids)) == NUM_TRIALS, trial_ids
        for c in children:
            assert c.info.status == "FINISHED", (c.info.run_name, c.info.status)
            assert [m.step for m in ml.get_metric_history(c.info.run_id, "val_agreement")] == \
                list(range(1, EPOCHS + 1))
        results = os.listdir(os.path.join(hosts.shared, "shared", "ray-results"))
        assert {f"{cluster_name}-train-{t}" for t in trial_ids} <= set(results), results

        # --- ray down: no Ray process of this cluster left, on any host ----------------------
        t_down = time.time()
        r = ray("down", "-y", config, timeout=300)
        launched = False
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        # A worker's raylet exits ~60 s after the head is gone (Ray's GCS reconnect timeout); the
        # worker start commands' watchdog then stops its agents and log monitor.
        deadline = time.time() + 150
        left = {}
        while time.time() < deadline:
            left = {hosts.ips[i]: lo for i in range(len(hosts.ips)) if (lo := _leftovers(hosts, i))}
            if not left:
                break
            time.sleep(2)
        assert not left, f"after `ray down`, processes of this cluster are left: {left}"
        print(f"[launch] ray down: clean after {time.time() - t_down:.0f} s; total {time.time() - t0:.0f} s")
    except BaseException:
        failed = True
        for path in [ray.log] + [os.path.join(work, f"h{i}", "init.log") for i in range(len(hosts.ips))]:
            try:
                with open(path, errors="replace") as f:
                    print(f"----- {path} (tail) -----\n{f.read()[-6000:]}")
            except OSError:
                pass
        for h in hosts.homes:
            for log in ("mlflow/server.log",):
                p = os.path.join(h, log)
                if os.path.exists(p):
                    with open(p, errors="replace") as f:
                        print(f"----- {p} (tail) -----\n{f.read()[-3000:]}")
        raise
    finally:
        if launched:
            try:
                ray("down", "-y", config, timeout=180)
            except subprocess.TimeoutExpired:
                pass
        hosts.stop()
        for suffix in ("state", "lock"):
            try:
                os.remove(f"/tmp/ray/cluster-{cluster_name}.{suffix}")
            except OSError:
                pass
        # The launcher's config caches (/tmp/ray-config-<hash>, written by `ray exec`/`ray down`)
        # and bootstrap files name this run's unique cluster: remove those.
        for path in glob.glob(os.path.join(tempfile.gettempdir(), "ray-config-*")) + \
                glob.glob(os.path.join(tempfile.gettempdir(), "ray-bootstrap-*")):
            try:
                with open(path, errors="replace") as f:
                    if cluster_name in f.read():
                        os.remove(path)
            except OSError:
                pass
        control = "/tmp/ray_ssh_{}/{}".format(hashlib.sha256(user.encode()).hexdigest()[:10],
                                              hashlib.sha256(cluster_name.encode()).hexdigest()[:10])
        shutil.rmtree(control, ignore_errors=True)
        if failed and os.environ.get("E2KD_LAUNCH_KEEP"):
            print(f"[launch] kept {work} (E2KD_LAUNCH_KEEP)")
        else:
            shutil.rmtree(work, ignore_errors=True)
