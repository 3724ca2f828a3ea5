"""A local Ray instance started by e2kd (``init_ray``: ``e2kd sweep/train/compare/cache`` without
``--address``) listens on loopback only.

``init_ray`` passes ``dashboard_host="127.0.0.1"`` and ``_node_ip_address="127.0.0.1"``: Ray then
binds the dashboard, the metrics export (Prometheus) and the processes' gRPC servers to the node
IP, and token authentication (Ray's default for local clusters since 2.59) stays on. The test
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
    return ipaddress.ip_address(ip.split("%")[0]).is_loopback


def test_local_ray_instance_listens_on_loopback_only(monkeypatch):
    import psutil
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
        pids = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
        listening = [(c.pid, c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in pids]
        names = {pid: psutil.Process(pid).name() for pid, _, _ in listening}
        assert len(listening) >= 3, listening  # GCS, raylet, dashboard at least: the listing works
        exposed = [(names[pid], ip, port) for pid, ip, port in listening if not _loopback(ip)]
        assert exposed == [], f"listening on non-loopback addresses: {exposed}"
        # The metrics endpoint is on loopback too, and token auth is on for this instance.
        port = node.metrics_export_port
        assert any(p == port and _loopback(ip) for _, ip, p in listening), (port, listening)
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        assert is_token_auth_enabled()
    finally:
        ray.shutdown()
