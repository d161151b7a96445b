"""The odps:// source through the real pyodps client against the local ODPS server: the shared
conformance suite, one shared download session per partition across 3 ranks x 2 loader workers,
faults (reset, 503, bad CRC, expiry, changed table), credentials, missing table / partition."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubeai_train import data
from kubeai_train.data.odps import (
    SESSIONS_ENV,
    OdpsPermissionError,
    OdpsSource,
    OdpsTableChangedError,
    create_sessions,
    main,
)
from kubeai_train.testing.odps_server import OdpsServer

from .conformance import ConformanceSpec, SourceConformance, ids_of

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# partition -> (rows, first id): uneven sizes
PARTS = {("20260101", "00"): (700, 0), ("20260101", "01"): (333, 700), ("20260102", "00"): (1100, 1033)}
TOTAL = sum(n for n, _ in PARTS.values())


def _rows(n: int, first: int) -> pa.Table:
    ids = np.arange(first, first + n, dtype=np.int64)
    cols = {"id": ids, "label": (ids % 2).astype(np.int64)}
    for i in range(4):
        cols[f"d{i}"] = ids * (i + 1) * 0.25
    return pa.table(cols)


def _write_parted(root: Path, name: str) -> None:
    for (ds, hh), (n, first) in PARTS.items():
        d = root / "proj" / name / f"ds={ds}" / f"hh={hh}"
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(_rows(n, first), d / "part-0.parquet")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("odps-data")
    _write_parted(root, "events")
    _write_parted(root, "scratch")  # tests that rewrite data use this one
    plain = root / "proj" / "plain"
    plain.mkdir(parents=True)
    pq.write_table(_rows(1500, 0).slice(0, 900), plain / "a.parquet")
    pq.write_table(_rows(1500, 0).slice(900), plain / "b.parquet")
    empty = root / "proj" / "empty"
    empty.mkdir(parents=True)
    pq.write_table(_rows(0, 0), empty / "a.parquet")
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


def _all_ids(src: OdpsSource, columns=None) -> list[int]:
    out: list[int] = []
    for split in src.splits():
        for b in src.read(split, columns=columns):
            out.extend(b.column("id").to_pylist())
    return out


# ------------------------------------------------------------------ the shared conformance suite
class TestOdpsConformance(SourceConformance):
    @pytest.fixture(scope="class")
    def spec(self, server) -> ConformanceSpec:
        env = server.env("proj")
        opts = {
            "endpoint": env["ODPS_ENDPOINT"],
            "tunnel_endpoint": env["ODPS_TUNNEL_ENDPOINT"],
            "access_id": env["ALIBABA_CLOUD_ACCESS_KEY_ID"],
            "secret_access_key": env["ALIBABA_CLOUD_ACCESS_KEY_SECRET"],
            "split_rows": 256,
        }
        url = "odps://proj/tables/events"
        # one session per partition for the whole suite, as a launcher would pass it on
        opts["sessions"] = create_sessions(url, **opts)
        return ConformanceSpec(source=url, ids=np.arange(TOTAL), options=opts)

    def missing_source(self, spec: ConformanceSpec) -> str:
        return "odps://proj/tables/no_such_table"

    def empty_source(self, spec: ConformanceSpec) -> str:
        return "odps://proj/tables/empty"


# ------------------------------------------------------------------ reading
@pytest.mark.parametrize("reader", ["fast", "pyodps"])
@pytest.mark.parametrize("compression", [None, "lz4", "zstd", "zlib"])
def test_reads_every_row_once(env, reader, compression):
    src = OdpsSource("odps://proj/tables/events", reader=reader, compression=compression, split_rows=300)
    assert src.partitions() == ["ds=20260101,hh=00", "ds=20260101,hh=01", "ds=20260102,hh=00"]
    assert src.schema().names == ["id", "label", "d0", "d1", "d2", "d3", "ds", "hh"]
    assert _all_ids(src) == list(range(TOTAL))


def test_partial_spec_projection_partition_columns_and_offset(env):
    src = OdpsSource("odps://proj/tables/events/ds=20260101", split_rows=200, parallel=3)
    assert src.partitions() == ["ds=20260101,hh=00", "ds=20260101,hh=01"]
    split = src.splits()[-1]  # hh=01, rows 200..333
    batches = list(src.read(split, columns=["hh", "d1", "id"], offset=5))
    got = pa.Table.from_batches(batches)
    assert got.column_names == ["hh", "d1", "id"]
    assert got.column("id").to_pylist() == list(range(700 + 205, 700 + 333))
    assert set(got.column("hh").to_pylist()) == {"01"}
    np.testing.assert_allclose(got.column("d1").to_numpy(), got.column("id").to_numpy() * 0.5)
    full = OdpsSource("odps://proj/tables/events/ds=20260102/hh=00", split_rows=4000)
    assert len(full.splits()) == 1 and full.splits()[0].num_rows == 1100


def test_parallel_range_readers_keep_order(env):
    src = OdpsSource("odps://proj/tables/plain", split_rows=1500, parallel=4)
    assert _all_ids(src) == list(range(1500))


def test_data_read_non_partitioned(env):
    ds = data.read("odps://proj/tables/plain", batch_size=100, rank=0, world_size=1, split_rows=400)
    got = ids_of(list(ds), "id")
    np.testing.assert_array_equal(got, np.arange(1500))


# ------------------------------------------------------------------ faults
FAULTS = [
    {"kind": "reset", "after_bytes": 5000},
    {"kind": "truncate", "after_bytes": 7000},
    {"kind": "status", "status": 503},
    {"kind": "status", "status": 500},
    {"kind": "bad_crc", "chunk": 2},
]


@pytest.mark.parametrize("reader", ["fast", "pyodps"])
@pytest.mark.parametrize("fault", FAULTS, ids=["reset", "truncate", "503", "500", "bad_crc"])
def test_faults_reopen_at_the_exact_row(env, fault, reader):
    src = OdpsSource("odps://proj/tables/events", split_rows=2000, reader=reader, backoff=0.01)
    src.splits()
    env.inject(count=2, **fault)
    assert _all_ids(src) == list(range(TOTAL))  # no row lost or duplicated
    assert env.stats.snapshot()["faults_fired"][fault["kind"]] >= 2
    assert not env.pending_faults()


def test_persistent_failure_is_read_failed_error_naming_the_table(env):
    src = OdpsSource("odps://proj/tables/events/ds=20260101/hh=01", reopens=2, backoff=0.01)
    split = src.splits()[0]
    env.inject("status", status=503, count=-1)
    try:
        with pytest.raises(data.ReadFailedError, match=r"proj\.events partition ds=20260101,hh=01"):
            list(src.read(split))
    finally:
        env.clear_faults()
    assert not src.is_transient(data.ReadFailedError("x"))


def test_expired_session_is_replaced_and_rows_stay_exact(env):
    src = OdpsSource("odps://proj/tables/events", split_rows=400)
    splits = src.splits()
    old = dict(src.describe()["sessions"])
    created = env.stats.snapshot()["sessions_created"]
    got: list[int] = []
    for i, split in enumerate(splits):
        if i == 2:
            assert env.expire_sessions() >= 3
        for b in src.read(split):
            got.extend(b.column("id").to_pylist())
    assert got == list(range(TOTAL))
    assert env.stats.snapshot()["sessions_created"] > created
    assert src.describe()["sessions"] != old


def test_changed_table_after_expiry_is_a_clear_error(env, root):
    src = OdpsSource("odps://proj/tables/scratch/ds=20260101/hh=01", split_rows=100)
    splits = src.splits()
    list(src.read(splits[0]))
    part = root / "proj" / "scratch" / "ds=20260101" / "hh=01"
    pq.write_table(_rows(50, 5000), part / "part-1.parquet")  # the partition is rewritten
    try:
        env.expire_sessions()
        with pytest.raises(
            OdpsTableChangedError, match=r"proj\.scratch partition ds=20260101,hh=01.*383 rows"
        ):
            list(src.read(splits[1]))
    finally:
        (part / "part-1.parquet").unlink()


# ------------------------------------------------------------------ errors
def test_bad_credentials_are_a_permission_error_without_the_secret(env):
    with pytest.raises(OdpsPermissionError, match=r"proj\.events") as ei:
        OdpsSource("odps://proj/tables/events", secret_access_key="not-the-secret").splits()
    assert "not-the-secret" not in str(ei.value) and isinstance(ei.value, PermissionError)
    with pytest.raises(OdpsPermissionError, match="nobody"):
        OdpsSource("odps://proj/tables/events", access_id="nobody").schema()


def test_missing_table_and_partition_are_named(env):
    with pytest.raises(data.DatasetNotFoundError, match=r"proj\.nope"):
        OdpsSource("odps://proj/tables/nope").splits()
    with pytest.raises(data.DatasetNotFoundError, match=r"proj\.events partition ds=20991231"):
        OdpsSource("odps://proj/tables/events/ds=20991231").splits()
    with pytest.raises(data.DatasetNotFoundError, match=r"proj\.events partition ds=20260101,hh=07"):
        data.read("odps://proj/tables/events/ds=20260101/hh=07", rank=0, world_size=1)


def test_bad_input_is_one_clear_line(env, monkeypatch):
    with pytest.raises(ValueError, match="odps://<project>/tables/<table>"):
        OdpsSource("odps://proj/events")
    with pytest.raises(ValueError, match="compression"):
        OdpsSource("odps://proj/tables/events", compression="snappy")
    with pytest.raises(ValueError, match="leading keys"):
        OdpsSource("odps://proj/tables/events/hh=01").splits()
    with pytest.raises(ValueError, match="not partitioned"):
        OdpsSource("odps://proj/tables/plain/ds=1").splits()
    with pytest.raises(data.ColumnNotFoundError, match="d3"):
        src = OdpsSource("odps://proj/tables/plain")
        list(src.read(src.splits()[0], columns=["zz"]))
    monkeypatch.delenv("ODPS_ENDPOINT")
    with pytest.raises(ValueError, match="ODPS_ENDPOINT"):
        OdpsSource("odps://proj/tables/events")


def test_secret_never_shown_and_source_pickles(env):
    src = OdpsSource("odps://proj/tables/events", split_rows=500)
    splits = src.splits()
    secret = env.credentials.secret
    assert secret not in repr(src) and secret not in json.dumps(src.describe())
    clone = pickle.loads(pickle.dumps(src))
    assert clone.splits() == splits
    assert [b.num_rows for b in clone.read(splits[0])]


# ------------------------------------------------------------------ shared sessions
def test_sessions_from_environment_are_reused(env, monkeypatch, capsys):
    assert main(["sessions", "odps://proj/tables/events"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"export {SESSIONS_ENV}='")
    ids = json.loads(line.split("=", 1)[1].strip("'"))
    assert sorted(ids) == [
        "proj.events/ds=20260101,hh=00",
        "proj.events/ds=20260101,hh=01",
        "proj.events/ds=20260102,hh=00",
    ]
    monkeypatch.setenv(SESSIONS_ENV, json.dumps(ids))
    before = env.stats.snapshot()["sessions_created"]
    src = OdpsSource("odps://proj/tables/events")
    assert _all_ids(src) == list(range(TOTAL))
    assert env.stats.snapshot()["sessions_created"] == before
    assert src.session_ids() == ids


RANK_SCRIPT = textwrap.dedent(
    """
    import json, multiprocessing as mp, sys
    import torch.utils.data as tud
    from kubeai_train import data

    def rank_main(rank, out):
        ds = data.read("odps://proj/tables/events", batch_size=50, rank=rank, world_size=3, shuffle=True,
                       seed=3, split_rows=200)
        loader = tud.DataLoader(ds.to_torch(), batch_size=None, num_workers=2, timeout=60)
        ids = [int(i) for b in loader for i in b["id"].numpy()]
        json.dump(ids, open(out, "w"))

    if __name__ == "__main__":
        # torch is imported once; each rank is a forked process with its own 2 loader workers
        procs = [mp.get_context("fork").Process(target=rank_main, args=(r, f"{sys.argv[1]}/ids{r}.json"))
                 for r in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(150)
        sys.exit(max(abs(p.exitcode if p.exitcode is not None else 99) for p in procs))
    """
)


def test_three_ranks_two_loader_workers_one_session_per_partition(env, tmp_path):
    """3 rank processes x 2 DataLoader workers: every row once, and one download session per
    partition for the whole job (shared through KUBEAI_ODPS_SESSION_DIR)."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    before = env.stats.snapshot()["sessions_created"]
    proc_env = dict(os.environ, KUBEAI_ODPS_SESSION_DIR=str(tmp_path / "sessions"), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], env=proc_env, timeout=180)
    assert done.returncode == 0
    every = [i for r in range(3) for i in json.loads((tmp_path / f"ids{r}.json").read_text())]
    assert len(every) == TOTAL and sorted(every) == list(range(TOTAL))
    assert env.stats.snapshot()["sessions_created"] - before == len(PARTS)


def test_crc_combination_matches_a_second_pass():
    import crc32c

    from kubeai_train.data.odps import _crc_shift_tables

    rng = np.random.default_rng(1)
    a, b = rng.bytes(1000), rng.bytes(4096)
    t0, t1, t2, t3 = _crc_shift_tables(len(b))
    ca, cb = crc32c.crc32c(a), crc32c.crc32c(b)
    combined = t0[ca & 255] ^ t1[(ca >> 8) & 255] ^ t2[(ca >> 16) & 255] ^ t3[ca >> 24] ^ cb
    assert combined == crc32c.crc32c(a + b)


@pytest.mark.parametrize("compression", [None, "lz4"])
def test_storage_api_reader(env, compression):
    src = OdpsSource("odps://proj/tables/events", reader="storage", split_rows=300, compression=compression)
    assert _all_ids(src) == list(range(TOTAL))
    split = src.splits()[1]
    got = pa.Table.from_batches(list(src.read(split, columns=["hh", "id"], offset=7)))
    assert got.column_names == ["hh", "id"] and got.column("id").to_pylist() == list(range(307, 600))


def test_storage_api_reader_recovers_from_a_reset_and_an_expired_read_session(env):
    src = OdpsSource("odps://proj/tables/events", reader="storage", split_rows=2000, backoff=0.01)
    splits = src.splits()
    env.inject("reset", after_bytes=3000)
    got = [i for b in src.read(splits[0]) for i in b.column("id").to_pylist()]
    env.expire_sessions()
    got += [i for s in splits[1:] for b in src.read(s) for i in b.column("id").to_pylist()]
    assert got == list(range(TOTAL))


def _framed(n_rows: int, chunk: int, corrupt: int | None = None) -> tuple[bytes, pa.Table]:
    from kubeai_train.testing._odps_wire import encode_arrow_batches, frame_arrow

    t = _rows(n_rows, 0)
    return frame_arrow(encode_arrow_batches(t.to_batches(max_chunksize=50)), chunk, corrupt_chunk=corrupt), t


class _SockResponse:
    """What the decoders need of an http.client response: .fp (buffered socket file), .length."""

    chunked = False

    def __init__(self, body: bytes) -> None:
        import socket
        import threading

        a, b = socket.socketpair()
        self._keep = a
        threading.Thread(target=lambda: (a.sendall(body), a.shutdown(socket.SHUT_WR)), daemon=True).start()
        b.settimeout(10)
        self.sock = b
        self.fp = b.makefile("rb")
        self.length = len(body)

    def readinto(self, buf) -> int:
        return self.fp.readinto(buf)


@pytest.mark.parametrize("path", ["scatter", "blocks", "stream"])
@pytest.mark.parametrize("chunk", [64, 1000, 4096])
def test_body_decoders_verify_every_crc(path, chunk):
    from kubeai_train.data.odps import (
        ChecksumMismatch,
        _raw_socket,
        _scatter_batches,
        _stream_batches,
        _zero_copy_batches,
    )

    def decode(body: bytes, length: int | None = None) -> pa.Table:
        schema = _rows(0, 0).schema
        if path == "stream":  # unknown length (compressed / chunked): blocks of any size
            sizes = np.random.default_rng(len(body)).integers(1, 3 * chunk, 10_000)
            cuts = np.minimum(np.cumsum(sizes), len(body))
            blocks = [body[a:b] for a, b in zip([0, *cuts[:-1]], cuts, strict=True) if b > a]
            return pa.Table.from_batches(list(_stream_batches(iter(blocks), schema)), schema=schema)
        resp = _SockResponse(body)
        if path == "scatter":
            assert _raw_socket(resp) is resp.sock
            batches = list(_scatter_batches(resp.sock, resp, length or len(body), schema))
        else:
            batches = list(_zero_copy_batches(resp, length or len(body), schema))
        return pa.Table.from_batches(batches, schema=schema)

    body, table = _framed(777, chunk)
    assert decode(body).equals(table)
    for k in (0, 3):
        with pytest.raises(ChecksumMismatch):
            decode(_framed(777, chunk, corrupt=k)[0])
    with pytest.raises(ChecksumMismatch):
        decode(body[: len(body) // 2], length=len(body))  # truncated: the connection ends early
    # a body whose data is an exact multiple of the chunk size ends with an empty final chunk
    from kubeai_train.testing._odps_wire import encode_arrow_batches, frame_arrow

    data = encode_arrow_batches(table.to_batches(max_chunksize=50))
    exact = frame_arrow(data + b"\0" * (-len(data) % chunk), chunk)
    assert decode(exact).equals(table)


def test_fallback_reader_without_socket_access(env, monkeypatch):
    import kubeai_train.data.odps as odps_mod

    monkeypatch.setattr(odps_mod, "_raw_socket", lambda fp: None)
    src = OdpsSource("odps://proj/tables/events", split_rows=1000, backoff=0.01)
    src.splits()
    env.inject("bad_crc", chunk=1)
    env.inject("truncate", after_bytes=4000)
    assert _all_ids(src) == list(range(TOTAL))


@pytest.mark.parametrize("compression", ["zstd", "lz4"])
def test_compressed_reads_recover_from_faults(env, compression):
    src = OdpsSource("odps://proj/tables/events", split_rows=1000, compression=compression, backoff=0.01)
    src.splits()
    env.inject("bad_crc", chunk=2)
    env.inject("truncate", after_bytes=3000)
    env.inject("reset", after_bytes=100)
    assert _all_ids(src) == list(range(TOTAL))
    assert not env.pending_faults()
