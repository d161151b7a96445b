"""Shared test set-up: keep gloo and gRPC on loopback, and never inherit a cluster from the
environment the tests were started in."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
for _name in ("TF_CONFIG", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
    os.environ.pop(_name, None)


@pytest.fixture
def clean_cluster_env(monkeypatch):
    """A process environment with no cluster variables in it."""
    for name in list(os.environ):
        if name in ("TF_CONFIG", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") or name.startswith(
            ("PET_", "LOCAL_", "GROUP_")
        ):
            monkeypatch.delenv(name, raising=False)
    return monkeypatch
