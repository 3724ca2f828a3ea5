"""A local Ray instance started by e2kd (``init_ray``: ``e2kd sweep/train/compare/cache`` without
``--address``) listens on loopback only.

``init_ray`` passes ``dashboard_host="127.0.0.1"`` and keeps the node IP on 127.0.0.1
(``loopback_node_ip``: Ray 2.60 would otherwise move it to the reachable address); Ray then binds
the metrics exporters (Prometheus: agent, dashboard, autoscaler) and the processes' gRPC servers
to loopback, and token authentication (Ray's default for local clusters since 2.59) stays on. The test
starts that instance (1 CPU, one task so that a worker process exists), lists the listening TCP
sockets of every process of it (the driver and all its descendants: GCS, raylet, dashboard and
its agents, workers) and expects none on a non-loopback address.
"""
from __future__ import annotations

import ipaddress
import os
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.slow


def _loopback(ip: str) -> bool:
    a = ipaddress.ip_address(ip.split("%")[0])
    # An IPv6 socket bound to ::ffff:127.0.0.1 (how gRPC binds an IPv4 loopback address) is
    # loopback; ipaddress only says so for the IPv4 form.
    return (a.ipv4_mapped or a).is_loopback if a.version == 6 else a.is_loopback


def _descendants(root: int) -> set[int]:
    """``root`` and every process below it, from /proc (no psutil in the project's dependencies)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        out.add(p)
        todo += children.get(p, [])
    return out


def _listening(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket of ``pids`` (/proc/net/tcp{,6})."""
    socks = {}
    for fam in ("tcp", "tcp6"):
        for line in open(f"/proc/net/{fam}").read().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A":  # LISTEN
                continue
            hexip, hexport = f[1].split(":")
            raw = bytes.fromhex(hexip)
            if fam == "tcp":
                ip = str(ipaddress.IPv4Address(raw[::-1]))
            else:
                ip = str(ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))))
            socks[f[9]] = (ip, int(hexport, 16))
    out = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in socks:
                out.append((pid, *socks[target[8:-1]]))
    return out


def test_local_ray_instance_listens_on_loopback_only(monkeypatch):
    import ray

    from orchestrator.sweep import init_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert not ray.is_initialized()
    assert init_ray(None, 1, log=lambda s: None)
    try:
        ray.get(ray.remote(num_cpus=0.1)(lambda: os.getpid()).remote())
        node = ray._private.worker.global_worker.node
        assert node.node_ip_address == "127.0.0.1"
        listening = _listening(_descendants(os.getpid()))
        names = {pid: open(f"/proc/{pid}/comm").read().strip() for pid, _, _ in listening}
        assert len(listening) >= 3, listening  # GCS, raylet, dashboard at least: the listing works
        exposed = sorted({(names[pid], ip, port) for pid, ip, port in listening if not _loopback(ip)})
        assert exposed == [], f"listening on non-loopback addresses: {exposed}"
        assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") is None  # restored: `ray start` still works
        port = node.metrics_export_port
        assert any(p == port and _loopback(ip) for _, ip, p in listening), (port, listening)
    finally:
        ray.shutdown()
