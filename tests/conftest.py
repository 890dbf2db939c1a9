"""Shared fixtures: one real local Ray per test session, started only if a test needs it."""

from __future__ import annotations

import logging
import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests that use the session's Ray run last, so that process-pool tests fork
    # from a driver that has no Ray threads in it.
    items.sort(key=lambda item: item.get_closest_marker("ray") is not None)


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    """Every test runs in its own directory, so ./.cache and ./artifacts stay there."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray with 2 CPUs, shared by every test of the session."""
    ray = pytest.importorskip("ray")
    # The embedded Ray is on loopback and lives only for this session; token auth
    # would only add a warning here, so it is disabled explicitly.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (moto's) on loopback for the whole session; yields its endpoint URL.

    Tests talk to it through s3fs exactly as to AWS or MinIO: nothing is mocked.
    """
    server_module = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    import socket

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket on the session's S3 server, with the standard AWS environment set for it."""
    import uuid

    import fsspec

    for name, value in {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "2",
    }.items():
        monkeypatch.setenv(name, value)
    bucket = f"crystallize-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(bucket)
    return bucket
