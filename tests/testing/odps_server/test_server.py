"""The local ODPS server through the real, unmodified pyodps client: metadata, download sessions,
Arrow and record downloads (with compression), signatures, faults, admin endpoint and CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from odps import ODPS, errors
from odps.tunnel import TableTunnel

from kubeai_train.testing.odps_server import Fault, OdpsServer
from kubeai_train.testing.odps_server.auth import AuthFailure, Credentials, check_signature
from kubeai_train.testing.odps_server.wire import encode_records, frame_arrow

pytestmark = pytest.mark.integration

N = 5000


def _table(n: int, offset: int = 0) -> pa.Table:
    ids = np.arange(offset, offset + n, dtype=np.int64)
    return pa.table(
        {
            "id": ids,
            "x": ids * 0.5,
            "i32": (ids % 1000).astype(np.int32),
            "f": (ids % 7).astype(np.float32),
            "flag": ids % 2 == 0,
            "s": pa.array([None if i % 10 == 3 else f"s{i}" for i in ids]),
        }
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("odps")
    plain = root / "proj" / "plain"
    plain.mkdir(parents=True)
    pq.write_table(_table(3000), plain / "part-0.parquet")
    pq.write_table(_table(N - 3000, 3000), plain / "part-1.parquet")
    for ds, hh, n, off in [
        ("20260101", "00", 700, 0),
        ("20260101", "01", 300, 700),
        ("20260102", "00", 500, 1000),
    ]:
        d = root / "proj" / "parted" / f"ds={ds}" / f"hh={hh}"
        d.mkdir(parents=True)
        pq.write_table(_table(n, off), d / "a.parquet")
    return root


@pytest.fixture(scope="module")
def server(root):
    with OdpsServer(root, project="proj", chunk_size=4096, batch_rows=1000) as srv:
        yield srv


@pytest.fixture
def o(server):
    server.clear_faults()
    return ODPS(
        server.credentials.access_id,
        server.credentials.secret,
        project="proj",
        endpoint=server.endpoint,
        tunnel_endpoint=server.tunnel_endpoint,
    )


def _tunnel(o, server) -> TableTunnel:
    return TableTunnel(o, endpoint=server.tunnel_endpoint)


def test_metadata_through_pyodps(o):
    assert o.exist_table("plain") and not o.exist_table("nope")
    t = o.get_table("plain")
    cols = [(c.name, str(c.type).lower()) for c in t.table_schema.simple_columns]
    assert cols == [
        ("id", "bigint"),
        ("x", "double"),
        ("i32", "int"),
        ("f", "float"),
        ("flag", "boolean"),
        ("s", "string"),
    ]
    assert t.record_num == N
    p = o.get_table("parted")
    assert [c.name for c in p.table_schema.partitions] == ["ds", "hh"]
    assert [str(x.partition_spec) for x in p.partitions] == [
        "ds='20260101',hh='00'",
        "ds='20260101',hh='01'",
        "ds='20260102',hh='00'",
    ]
    assert p.exist_partition("ds=20260101,hh=01") and not p.exist_partition("ds=20260101,hh=09")
    assert [str(x.partition_spec) for x in p.partitions.iterate_partitions(spec="ds=20260102")] == [
        "ds='20260102',hh='00'"
    ]
    assert p.get_partition("ds=20260101,hh=00").record_num == 700


def test_download_session_create_poll_and_reuse(o, server):
    tunnel = _tunnel(o, server)
    s = tunnel.create_download_session("plain")
    assert s.count == N and s.status == s.Status.Normal
    again = tunnel.create_download_session("plain", download_id=s.id)
    assert again.id == s.id and again.count == N
    with again.open_arrow_reader(0, N) as r:
        got = r.read()
    expected = pa.concat_tables([_table(3000), _table(N - 3000, 3000)])
    assert got.num_rows == N
    for name in expected.column_names:
        assert got.column(name).to_pylist() == expected.column(name).to_pylist(), name


def test_partition_session_and_column_projection(o, server):
    s = _tunnel(o, server).create_download_session("parted", partition_spec="ds=20260101,hh=01")
    assert s.count == 300
    with s.open_arrow_reader(10, 20, columns=["s", "id"]) as r:
        got = r.read()
    assert got.column_names == ["s", "id"]
    assert got.column("id").to_pylist() == list(range(710, 730))


@pytest.mark.parametrize("algo", ["zlib", "lz4", "zstd"])
def test_compressed_arrow_and_record_downloads(o, server, algo):
    from odps.tunnel.io.stream import CompressOption

    opt = CompressOption(algo.upper())
    s = _tunnel(o, server).create_download_session("plain", compress_option=opt)
    with s.open_arrow_reader(0, N, compress=True) as r:
        assert r.read().column("id").to_pylist() == list(range(N))
    with s.open_record_reader(100, 50, compress=True) as r:
        assert [rec["id"] for rec in r] == list(range(100, 150))


def test_record_reader_values_and_nulls(o, server):
    s = _tunnel(o, server).create_download_session("plain")
    with s.open_record_reader(0, 20) as r:
        recs = [rec.values for rec in r]
    assert len(recs) == 20
    assert recs[3] == [3, 1.5, 3, 3.0, False, None]
    assert recs[4][5] == "s4" and recs[4][4] is True
    with s.open_record_reader(5, 3, columns=["s", "id"]) as r:
        assert [rec.values for rec in r] == [["s5", 5], ["s6", 6], ["s7", 7]]


def test_bad_credentials_are_refused(server):
    bad = ODPS(server.credentials.access_id, "wrong-secret", project="proj", endpoint=server.endpoint)
    with pytest.raises(errors.ODPSError) as ei:
        bad.get_table("plain").reload()
    assert ei.value.status_code == 403 and ei.value.code == "SignatureNotMatch"
    assert "wrong-secret" not in str(ei.value)
    stranger = ODPS("who", "x", project="proj", endpoint=server.endpoint)
    with pytest.raises(errors.NoPermission):
        stranger.get_table("plain").reload()
    assert server.stats.snapshot()["auth_failures"] >= 2


def test_missing_table_and_partition(o, server):
    with pytest.raises(errors.NoSuchObject):
        o.get_table("nope").reload()
    with pytest.raises(errors.NoSuchPartition):
        _tunnel(o, server).create_download_session("parted", partition_spec="ds=20991231,hh=00")


@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "reset", "after_bytes": 9000},
        {"kind": "truncate", "after_bytes": 9000},
        {"kind": "status", "status": 503},
        {"kind": "bad_crc", "chunk": 1},
    ],
    ids=["reset", "truncate", "503", "bad_crc"],
)
def test_pyodps_arrow_reader_recovers_from_faults(o, server, fault):
    s = _tunnel(o, server).create_download_session("plain")
    server.inject(**fault)
    with s.open_arrow_reader(0, N) as r:
        got = r.read().column("id").to_pylist()
    assert got == list(range(N))  # no row lost or duplicated
    assert server.stats.snapshot()["faults_fired"].get(fault["kind"], 0) >= 1
    assert not server.pending_faults()


def test_bad_crc_is_detected_by_pyodps(o, server):
    s = _tunnel(o, server).create_download_session("plain")
    server.inject("bad_crc", count=-1, chunk=0)
    try:
        with pytest.raises(errors.ChecksumError), s.open_arrow_reader(0, N) as r:
            r.read()
        with pytest.raises(errors.ChecksumError), s.open_record_reader(0, 10) as r:
            list(r)
    finally:
        server.clear_faults()


def test_session_expiry(o, server):
    tunnel = _tunnel(o, server)
    s = tunnel.create_download_session("plain")
    assert server.expire_sessions(s.id) == 1
    s.reload()
    assert s.status == s.Status.Expired
    with pytest.raises(errors.ODPSError) as ei, s.open_arrow_reader(0, 10) as r:
        r.read()
    assert ei.value.code == "StatusConflict"


def test_slow_fault_delays(o, server):
    import time

    s = _tunnel(o, server).create_download_session("plain")
    server.inject("slow", delay=0.3)
    t = time.monotonic()
    with s.open_arrow_reader(0, 10) as r:
        assert r.read().num_rows == 10
    assert time.monotonic() - t >= 0.3


def test_admin_endpoint_and_byte_counter(server, o):
    base = server.tunnel_endpoint
    req = urllib.request.Request(
        f"{base}/__admin__/faults",
        data=json.dumps({"kind": "status", "status": 500, "scope": "meta"}).encode(),
    )
    assert json.load(urllib.request.urlopen(req, timeout=10))["pending"] == 1
    with pytest.raises(errors.InternalServerError):
        o.get_table("plain").reload()
    before = json.load(urllib.request.urlopen(f"{base}/__admin__/stats", timeout=10))
    s = _tunnel(o, server).create_download_session("plain")
    with s.open_arrow_reader(0, N) as r:
        r.read()
    after = json.load(urllib.request.urlopen(f"{base}/__admin__/stats", timeout=10))
    assert after["data_bytes"] - before["data_bytes"] > N * 8 * 4
    req = urllib.request.Request(f"{base}/__admin__/expire", data=b"", method="POST")
    assert json.load(urllib.request.urlopen(req, timeout=10))["expired"] >= 1
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(
            urllib.request.Request(f"{base}/__admin__/faults", data=b'{"kind": "nope"}'), timeout=10
        )


def test_fault_validation():
    with pytest.raises(ValueError, match="kind"):
        Fault("explode")
    with pytest.raises(ValueError, match="status"):
        Fault("status", status=200)
    with pytest.raises(ValueError, match="count"):
        Fault("reset", count=0)


def test_wire_formats_unit():
    body = frame_arrow(b"x" * 10, chunk_size=4)
    # header, two full chunks with CRCs, final 2 bytes + whole-stream CRC
    assert len(body) == 4 + 2 * (4 + 4) + 2 + 4
    exact = frame_arrow(b"y" * 8, chunk_size=4)
    assert len(exact) == 4 + 2 * 8 + 4  # an empty final chunk still carries the stream CRC
    rec = encode_records([("a", "bigint"), ("b", "string")], iter([(1, "x"), (None, None)]))
    assert rec and rec[0] == (1 << 3) | 0


def test_signature_check_unit():
    creds = Credentials("id", "sec")
    assert "sec" not in repr(creds)
    with pytest.raises(AuthFailure) as ei:
        check_signature(creds, "GET", "/projects/p", {})
    assert ei.value.status == 401


def test_cli_prints_endpoint_and_env(root):
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubeai_train.testing.odps_server", "--root", str(root), "--project", "proj"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = [proc.stdout.readline() for _ in range(7)]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    text = "".join(lines)
    assert "export ODPS_ENDPOINT=http://127.0.0.1:" in text
    assert "export ODPS_TUNNEL_ENDPOINT=" in text and "export ODPS_PROJECT_NAME=proj" in text
    bad = subprocess.run(
        [sys.executable, "-m", "kubeai_train.testing.odps_server", "--root", str(root / "missing")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "not a directory" in bad.stderr


@pytest.mark.parametrize("compression", ["UNCOMPRESSED", "LZ4_FRAME", "ZSTD"])
def test_storage_api_read_session_through_pyodps(o, server, compression):
    from odps.apis.storage_api import (
        ArrowReader,
        Compression,
        ReadRowsRequest,
        SessionRequest,
        SplitOptions,
        StorageApiClient,
        TableBatchScanRequest,
    )

    client = StorageApiClient(o, o.get_table("parted"), rest_endpoint=server.tunnel_endpoint)
    req = TableBatchScanRequest(
        required_data_columns=["id", "s"],
        required_partitions=["ds=20260101/hh=01", "ds=20260102/hh=00"],
        required_partition_columns=["ds"],
    )
    req.split_options = SplitOptions.get_default_options(SplitOptions.SplitMode.PARALLELISM)
    req.split_options.split_number = 3
    created = client.create_read_session(req)
    assert created.record_count == 800 and created.split_count == 3
    assert [c.name for c in created.data_schema.data_columns] == ["id", "s"]
    polled = client.get_read_session(SessionRequest(created.session_id))
    assert polled.session_id == created.session_id and polled.record_count == 800
    ids, ds = [], set()
    for split in range(created.split_count):
        rr = ReadRowsRequest(created.session_id, split_index=split, compression=Compression[compression])
        reader = ArrowReader(client.read_rows_stream(rr))
        while (batch := reader.read()) is not None:
            assert batch.schema.names == ["id", "s", "ds"]
            ids += batch.column("id").to_pylist()
            ds |= set(batch.column("ds").to_pylist())
    assert ids == list(range(700, 1000)) + list(range(1000, 1500)) and ds == {"20260101", "20260102"}
