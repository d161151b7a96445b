"""Fixtures of the odps:// tests: the tables on disk, one local ODPS server per test module, and
an environment pointing pyodps at it."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kubeai_train.data.odps import SESSIONS_ENV
from kubeai_train.testing.odps_server import OdpsServer

from ._tables import rows, write_parted


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("odps-data")
    write_parted(root, "events")
    write_parted(root, "scratch")  # tests that rewrite data use this one
    plain = root / "proj" / "plain"
    plain.mkdir(parents=True)
    pq.write_table(rows(1500, 0).slice(0, 900), plain / "a.parquet")
    pq.write_table(rows(1500, 0).slice(900), plain / "b.parquet")
    empty = root / "proj" / "empty"
    empty.mkdir(parents=True)
    pq.write_table(rows(0, 0), empty / "a.parquet")
    return root


@pytest.fixture(scope="module")
def server(root):
    with OdpsServer(root, project="proj", chunk_size=2048, batch_rows=128) as srv:
        yield srv


@pytest.fixture
def env(server, monkeypatch):
    server.clear_faults()
    for k, v in server.env("proj").items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv(SESSIONS_ENV, raising=False)
    return server
