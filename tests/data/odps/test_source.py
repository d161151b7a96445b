"""OdpsSource through the real pyodps client against the local ODPS server: the shared
conformance suite, one shared download session per partition across 3 ranks x 2 loader workers,
faults (reset, 503, bad CRC, expiry, changed table), credentials, missing table / partition, and
``create_sessions`` / ``python -m kubeai_train.data.odps sessions``."""

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

from ..conformance import ConformanceSpec, DynamicConformance, SourceConformance, ids_of
from ._tables import PARTS, TOTAL, all_ids, rows

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]


# ------------------------------------------------------------------ the shared conformance suite
class TestOdpsConformance(SourceConformance, DynamicConformance):
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
    assert all_ids(src) == list(range(TOTAL))


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
    assert all_ids(src) == list(range(1500))


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
    assert all_ids(src) == list(range(TOTAL))  # no row lost or duplicated
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
    pq.write_table(rows(50, 5000), part / "part-1.parquet")  # the partition is rewritten
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
    assert all_ids(src) == list(range(TOTAL))
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


@pytest.mark.parametrize("compression", ["zstd", "lz4"])
def test_compressed_reads_recover_from_faults(env, compression):
    src = OdpsSource("odps://proj/tables/events", split_rows=1000, compression=compression, backoff=0.01)
    src.splits()
    env.inject("bad_crc", chunk=2)
    env.inject("truncate", after_bytes=3000)
    env.inject("reset", after_bytes=100)
    assert all_ids(src) == list(range(TOTAL))
    assert not env.pending_faults()
