"""OdpsSource(reader="storage"): the Storage API path against the local ODPS server."""

from __future__ import annotations

import pyarrow as pa
import pytest

from kubeai_train.data.odps import OdpsSource

from ._tables import TOTAL, all_ids

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("compression", [None, "lz4"])
def test_storage_api_reader(env, compression):
    src = OdpsSource("odps://proj/tables/events", reader="storage", split_rows=300, compression=compression)
    assert all_ids(src) == list(range(TOTAL))
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
