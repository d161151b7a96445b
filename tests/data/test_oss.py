"""oss:// through ossfs (kubeai_train.data.oss) against the local OSS server: the shared source
conformance suite, the projection byte bound, retries on 5xx / resets / cut bodies, credentials."""

from __future__ import annotations

import io
import os
from pathlib import Path

import fsspec
import numpy as np
import ossfs
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubeai_train import data
from kubeai_train.data import oss as data_oss
from kubeai_train.data.registry import storage_options_for
from kubeai_train.testing.oss_server import OSSServer

from .conformance import ConformanceSpec, DynamicConformance, SourceConformance, ids_of
from .test_files import table, write_partitioned

SECRET = "data-secret-never-logged"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with OSSServer(
        tmp_path_factory.mktemp("oss-data"),
        access_key_id="data-id",
        access_key_secret=SECRET,
        buckets=["data"],
    ) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _no_faults(request):
    if "server" not in request.fixturenames:
        yield
        return
    srv = request.getfixturevalue("server")
    srv.clear_faults()
    yield
    srv.clear_faults()


def _fs(server: OSSServer, **kw) -> data_oss.OSSFileSystem:
    return data_oss.OSSFileSystem(skip_instance_cache=True, backoff=0.01, **server.storage_options(), **kw)


def _put(server: OSSServer, key: str, payload: bytes) -> None:
    """Drop an object straight into the server's root (as the offline mode serves files)."""
    path = Path(server.root, "data", *key.split("/"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)


# ------------------------------------------------------------------ configuration (no server)
OSS_VARS = ("OSS_ENDPOINT", "OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN")


def test_storage_options_from_environment_explicit_wins(monkeypatch):
    monkeypatch.setenv("OSS_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("OSS_ACCESS_KEY_ID", "id-env")
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", "secret-env")
    monkeypatch.setenv("OSS_SESSION_TOKEN", "token-env")
    opts = data_oss.storage_options("oss://b/x", {"key": "id-arg", "secret": "secret-arg"})
    assert opts == {
        "endpoint": "http://127.0.0.1:1",
        "key": "id-arg",
        "secret": "secret-arg",
        "token": "token-env",
        "default_cache_type": "none",
    }
    via_registry = storage_options_for("oss://b/x", {"default_cache_type": "readahead"})
    assert via_registry["default_cache_type"] == "readahead" and via_registry["key"] == "id-env"
    assert fsspec.get_filesystem_class("oss") is data_oss.OSSFileSystem  # installed by the provider


def test_missing_endpoint_is_one_clear_error(monkeypatch):
    for name in OSS_VARS:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(data.DataError, match="OSS_ENDPOINT") as e:
        data_oss.storage_options("oss://b/x", {"key": "k", "secret": "do-not-show"})
    assert "do-not-show" not in str(e.value)
    with pytest.raises(ValueError, match="retries"):
        data_oss.OSSFileSystem(endpoint="http://127.0.0.1:1", retries=-1, skip_instance_cache=True)


# ------------------------------------------------------------------ the shared conformance suite
@pytest.fixture(scope="module")
def conformance_data(server):
    root = Path(server.root, "data", "conf")
    return write_partitioned(root)


@pytest.mark.integration
class TestOSSConformance(SourceConformance, DynamicConformance):
    server: OSSServer

    @pytest.fixture(scope="class")
    def spec(self, server, conformance_data) -> ConformanceSpec:
        type(self).server = server
        return ConformanceSpec(
            source="oss://data/conf/",
            ids=conformance_data,
            options={"hash_buckets": {"c": 1000}, "storage_options": server.storage_options()},
        )

    def missing_source(self, spec: ConformanceSpec) -> str:
        return "oss://data/conf/no_such_dir"

    def empty_source(self, spec: ConformanceSpec) -> str:
        buf = io.BytesIO()
        pq.write_table(table(0, 0), buf)
        _put(self.server, "empty_ds/part-0.parquet", buf.getvalue())
        return "oss://data/empty_ds/"


# ------------------------------------------------------------------ projection: bytes fetched
@pytest.fixture(scope="module")
def wide(server):
    """40 float64 columns x 120k rows in 2 row groups (about 38 MB)."""
    rng = np.random.default_rng(0)
    t = pa.table({f"c{i:02d}": rng.random(120_000) for i in range(40)})
    buf = io.BytesIO()
    pq.write_table(t, buf, row_group_size=60_000, compression="none")
    payload = buf.getvalue()
    _put(server, "wide/part-0.parquet", payload)
    md = pq.ParquetFile(io.BytesIO(payload)).metadata
    return payload, md, t


def _projection_budget(md, columns, file_size, ranges):
    chunks = sum(
        md.row_group(rg).column(md.schema.names.index(c)).total_compressed_size
        for rg in range(md.num_row_groups)
        for c in columns
    )
    footer = md.serialized_size + 8
    footer_reads = sum(1 for _, _, end in ranges if end == file_size)
    return chunks, footer, footer_reads


@pytest.mark.integration
def test_projected_read_fetches_only_selected_column_chunks(server, wide, monkeypatch):
    payload, md, t = wide
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    cols = ["c05", "c31"]
    server.reset_stats()
    ds = data.read("oss://data/wide/", columns=cols, batch_size=10_000, rank=0, world_size=1)
    batches = list(ds)
    got = ids_of(batches, "c31")
    np.testing.assert_array_equal(got, t.column("c31").to_numpy())
    stats = server.stats()
    fetched = stats["bytes_by_object"]["data/wide/part-0.parquet"]
    ranges = [r for r in stats["get_ranges"] if r[0] == "data/wide/part-0.parquet"]
    chunks, footer, footer_reads = _projection_budget(md, cols, len(payload), ranges)
    assert footer_reads >= 1
    bound = 1.1 * (chunks + footer_reads * footer)
    assert fetched <= bound, f"fetched {fetched} bytes for {chunks} of column chunks + {footer_reads} footers"
    assert fetched < 0.1 * len(payload)


@pytest.mark.integration
def test_stock_ossfs_readahead_reads_far_more(server, wide):
    """The reason for our settings: the same projection through ossfs's defaults."""
    payload, md, _ = wide
    cols = ["c05", "c31"]
    stock = ossfs.OSSFileSystem(skip_instance_cache=True, **server.storage_options())
    server.reset_stats()
    with stock.open("data/wide/part-0.parquet", "rb") as fh:
        pq.ParquetFile(fh).read(columns=cols)
    stock_bytes = server.stats()["bytes_by_object"]["data/wide/part-0.parquet"]
    server.reset_stats()
    with _fs(server).open("data/wide/part-0.parquet", "rb") as fh:
        ours_table = pq.ParquetFile(fh).read(columns=cols)
    ours = server.stats()["bytes_by_object"]["data/wide/part-0.parquet"]
    chunks, footer, _ = _projection_budget(md, cols, len(payload), [])
    assert ours <= 1.1 * (chunks + footer) + 64 * 1024  # pyarrow's speculative 64 KiB footer read
    assert stock_bytes > 3 * ours
    assert ours_table.num_rows == 120_000


# ------------------------------------------------------------------ exact ranges, writes, listings
@pytest.mark.integration
def test_reads_are_exact_ranges(server):
    payload = os.urandom(300_000)
    _put(server, "exact/blob.bin", payload)
    fs = _fs(server)
    assert fs.cat_file("data/exact/blob.bin", 10, 20) == payload[10:20]  # ossfs alone returns 11 bytes
    assert fs.cat_file("data/exact/blob.bin", -100) == payload[-100:]
    assert fs.cat_file("data/exact/blob.bin", 5, -5) == payload[5:-5]
    assert fs.cat_file("data/exact/blob.bin") == payload
    server.reset_stats()
    with fs.open("data/exact/blob.bin", "rb") as f:
        f.seek(1000)
        assert f.read(500) == payload[1000:1500]
        assert f.tell() == 1500
    assert server.stats()["get_ranges"] == [("data/exact/blob.bin", 1000, 1500)]
    _put(server, "exact/empty.bin", b"")
    assert fs.cat_file("data/exact/empty.bin") == b""


@pytest.mark.integration
def test_files_written_in_several_blocks(server):
    fs = _fs(server)
    parts = [os.urandom(3 << 20) for _ in range(4)]
    with fs.open("data/written/multi.bin", "wb", block_size=5 << 20) as f:
        for p in parts:
            f.write(p)
        assert f.tell() == 12 << 20
    assert fs.cat_file("data/written/multi.bin") == b"".join(parts)


@pytest.mark.integration
def test_find_is_one_fresh_flat_listing(server):
    fs = _fs(server)
    for i in range(250):
        _put(server, f"tree/d{i % 5}/sub/f{i:03d}", b"x")
    server.reset_stats()
    found = fs.find("data/tree")
    assert len(found) == 250 and found == sorted(found)
    assert server.stats()["requests"] == {"ListObjects": 1}  # 1000 a page, no per-directory listing
    _put(server, "tree/d0/sub/late", b"y")  # written behind the cache's back
    fs.invalidate_cache("data/tree")
    assert "data/tree/d0/sub/late" in fs.find("data/tree")
    assert fs.ls("data/tree/d0/sub", detail=False)[-1] == "data/tree/d0/sub/late"
    assert not fs.exists("no-such-bucket/x") and not fs.exists("data/tree/none")


# ------------------------------------------------------------------ faults
@pytest.mark.integration
def test_5xx_are_retried_with_backoff(server):
    payload = os.urandom(50_000)
    _put(server, "faults/a.bin", payload)
    fs = _fs(server)
    rule = server.inject(kind="error", op="GetObject", key="data/faults/a.bin", times=2)
    assert fs.cat_file("data/faults/a.bin", 100, 200) == payload[100:200]
    assert rule.fired == 2
    server.inject(kind="error", op="ListObjects", status=500, code="InternalError", times=4)
    assert fs.find("data/faults") == ["data/faults/a.bin"]  # oss2 retries 2, we retry the rest


@pytest.mark.integration
def test_cut_bodies_resume_at_the_first_missing_byte(server):
    payload = os.urandom(3 << 20)
    _put(server, "faults/big.bin", payload)
    fs = _fs(server)
    server.reset_stats()
    server.inject(kind="truncate", op="GetObject", key="data/faults/big.bin", after_bytes=1_000_000)
    assert fs.cat_file("data/faults/big.bin", 0, 3 << 20) == payload
    ranges = server.stats()["get_ranges"]
    assert ranges == [("data/faults/big.bin", 0, 3 << 20), ("data/faults/big.bin", 1_000_000, 3 << 20)]
    server.inject(kind="reset", op="GetObject", key="data/faults/big.bin", after_bytes=2_000_000)
    with fs.open("data/faults/big.bin", "rb") as f:
        f.seek(500_000)
        assert f.read(2_500_000) == payload[500_000:3_000_000]


@pytest.mark.integration
def test_persistent_failure_is_a_clear_error(server):
    _put(server, "faults/down.bin", b"z" * 100)
    fs = _fs(server, retries=2)
    server.inject(kind="error", op="GetObject", key="data/faults/down.bin", times=None)
    with pytest.raises(OSError, match=r"503 ServiceUnavailable") as e:
        fs.cat_file("data/faults/down.bin")
    assert "down.bin" in str(e.value) and "3 attempts" in str(e.value)
    server.clear_faults()
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        fs.cat_file("data/faults/missing.bin")


@pytest.mark.integration
def test_data_read_survives_resets_and_5xx(server, wide):
    payload, md, t = wide
    server.inject(kind="reset", op="GetObject", key="data/wide/*", after_bytes=200_000, times=2)
    server.inject(kind="error", op="GetObject", key="data/wide/*", times=2)
    ds = data.read(
        "oss://data/wide/",
        columns=["c00", "c39"],
        batch_size=50_000,
        rank=0,
        world_size=1,
        storage_options={**server.storage_options(), "backoff": 0.01},
    )
    got = ids_of(list(ds), "c39")
    np.testing.assert_array_equal(got, t.column("c39").to_numpy())


@pytest.mark.integration
def test_bad_credentials_are_permission_errors_without_the_secret(server, caplog):
    caplog.set_level("DEBUG")
    _put(server, "creds/x.parquet", b"PAR1")
    fs = data_oss.OSSFileSystem(
        endpoint=server.endpoint, key="data-id", secret="wrong-" + SECRET, skip_instance_cache=True
    )
    with pytest.raises(PermissionError, match="SignatureDoesNotMatch") as e:
        fs.cat_file("data/creds/x.parquet")
    with pytest.raises(PermissionError):
        data.read(
            "oss://data/creds/",
            rank=0,
            world_size=1,
            storage_options={"endpoint": server.endpoint, "key": "data-id", "secret": "nope"},
        )
    assert SECRET not in str(e.value) and SECRET not in caplog.text


@pytest.mark.integration
def test_data_read_lists_a_large_prefix_in_pages(server):
    for i in range(1500):
        _put(server, f"many/logs/entry-{i:04d}.json", b"{}")  # listed, not data: skipped by extension
    for i in range(3):
        buf = io.BytesIO()
        pq.write_table(table(i * 100, (i + 1) * 100, lists=False), buf)
        _put(server, f"many/part-{i}.parquet", buf.getvalue())
    server.reset_stats()
    ds = data.read(
        "oss://data/many/", columns=["id"], rank=0, world_size=1, storage_options=server.storage_options()
    )
    np.testing.assert_array_equal(np.sort(ids_of(list(ds), "id")), np.arange(300))
    assert server.stats()["requests"]["ListObjects"] >= 2  # 1503 keys: more than one page
