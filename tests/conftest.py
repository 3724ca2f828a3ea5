"""Fixtures shared by the training, sweep and fault tests."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> str:
    """A small_cnn digits teacher trained for one short epoch (~256 images): enough for tests that
    exercise the loop, the sweep and its faults, not for accuracy claims. Read-only for tests."""
    from trainables.data import DataConfig
    from trainables.teacher import train_teacher

    out = tmp_path_factory.mktemp("teacher")
    train_teacher("small_cnn", DataConfig(name="digits"), out, epochs=1, batch_size=64, max_train_samples=256,
                  progress=None)
    return str(out)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-protocol server (moto's server mode) on 127.0.0.1, one per test session.

    Yields the environment a process needs to reach it the way the ecosystem gives a custom
    endpoint (boto3, the AWS CLI and pyarrow's ``FileSystem.from_uri`` read ``AWS_ENDPOINT_URL``).
    Tests apply it with ``monkeypatch.setenv`` before they start Ray, so every Ray process
    inherits it, and make their own bucket with :func:`make_bucket`."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=2)
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.3)
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def make_bucket(s3_env: dict, name: str) -> str:
    """Create ``name`` on the test server; returns ``s3://name``."""
    import boto3

    boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], region_name=s3_env["AWS_DEFAULT_REGION"],
                 aws_access_key_id=s3_env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=s3_env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture()
def s3_env(s3_server, monkeypatch) -> dict:
    """The S3 server's environment applied to this test's process (and so to the Ray it starts)."""
    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    return s3_server
