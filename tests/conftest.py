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
