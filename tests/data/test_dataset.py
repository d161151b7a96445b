"""The pipeline with a hand-written Source: options, defaults from the cluster, prefetch bounds,
plug-in sources and assignments, state validation."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pytest

from kubeai_train import data
from kubeai_train.data import registry
from kubeai_train.data.assignment import StaticAssignment
from kubeai_train.data.types import Assignment, ReaderId, Source, Split


class ArraySource(Source):
    """``n`` rows (``id`` = row number) in splits of ``split`` rows, read in record batches of
    ``chunk`` rows; counts the rows it hands out."""

    def __init__(self, url: str = "arr://test", n: int = 1000, split: int = 100, chunk: int = 25) -> None:
        self.url, self.n, self.split, self.chunk = url, n, split, chunk
        self.rows_read = 0
        self.fail: type[BaseException] | None = None

    def schema(self) -> pa.Schema:
        return pa.schema([("id", pa.int64()), ("x", pa.float32())])

    def splits(self) -> Sequence[Split]:
        return [Split("t", a, min(self.n, a + self.split)) for a in range(0, self.n, self.split)]

    def read(
        self, split: Split, columns: Sequence[str] | None = None, offset: int = 0
    ) -> Iterator[pa.RecordBatch]:
        cols = list(columns or self.schema().names)
        for a in range(split.start + offset, split.stop, self.chunk):
            if self.fail is not None:
                raise self.fail("injected")
            z = min(split.stop, a + self.chunk)
            ids = np.arange(a, z, dtype=np.int64)
            self.rows_read += z - a
            arrays = {"id": pa.array(ids), "x": pa.array(ids.astype(np.float32) / 2)}
            yield pa.record_batch([arrays[c] for c in cols], names=cols)


def test_read_options_are_validated() -> None:
    src = ArraySource()
    for kw, msg in [
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"num_epochs": 0}, "num_epochs"),
        ({"prefetch": -1}, "prefetch"),
        ({"columns": "id"}, "list of column names"),
        ({"columns": ["id", "id"]}, "duplicates"),
        ({"rank": 3, "world_size": 3}, r"rank must be in \[0, world_size=3\), got 3"),
        ({"rank": 0, "world_size": 0}, "world_size must be >= 1"),
    ]:
        kw = {"rank": 0, "world_size": 1, **kw}
        with pytest.raises(ValueError, match=msg):
            data.read(src, **kw)
    with pytest.raises(ValueError, match="already constructed"):
        data.read(src, rank=0, world_size=1, format="parquet")


def test_rank_and_world_size_default_to_the_cluster(clean_cluster_env) -> None:
    clean_cluster_env.setenv("WORLD_SIZE", "4")
    clean_cluster_env.setenv("RANK", "3")
    clean_cluster_env.setenv("MASTER_ADDR", "127.0.0.1")
    clean_cluster_env.setenv("MASTER_PORT", "29500")
    ds = data.read(ArraySource(n=10, split=3), batch_size=100)
    assert (ds.reader.rank, ds.reader.world_size) == (3, 4)
    assert next(iter(ds))["id"].tolist() == [8, 9]


def test_plugged_source_and_assignment() -> None:
    registry.register_source("arr", lambda url, **kw: ArraySource(url, **kw))
    try:

        class Reversed(Assignment):
            # a different policy: the pipeline takes any Assignment
            def assign(self, splits, reader, epoch, seed):
                return list(reversed(StaticAssignment().assign(splits, reader, epoch, seed)))

        ds = data.read("arr://x", n=50, split=10, batch_size=20, rank=0, world_size=1, assignment=Reversed())
        got = np.concatenate([b["id"] for b in ds]).tolist()
        assert got == [r for a in (40, 30, 20, 10, 0) for r in range(a, a + 10)]
    finally:
        registry._sources.pop("arr", None)


def test_prefetch_is_bounded_and_stops_with_the_consumer() -> None:
    src = ArraySource(n=100_000, split=1000, chunk=10)
    ds = data.read(src, batch_size=10, prefetch=2, rank=0, world_size=1)
    before = set(threading.enumerate())
    it = iter(ds)
    next(it)
    # the producer fills the queue and blocks: wait for it (however loaded the machine), then
    # check it stays blocked. One batch consumed, 2 queued, one waiting to be put, and at most
    # one record batch read for the next
    deadline = time.monotonic() + 30
    while src.rows_read < (1 + 2 + 1) * 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert (1 + 2 + 1) * 10 <= src.rows_read <= (1 + 2 + 1) * 10 + 10, src.rows_read
    it.close()  # type: ignore[attr-defined]
    # close() joins the producer: no sleep needed, and threads of other tests do not count
    assert not [t for t in set(threading.enumerate()) - before if t.name == "kubeai-data-prefetch"]
    assert ds.state_dict()["rows"] == 10


def test_epochs_set_epoch_and_len() -> None:
    ds = data.read(ArraySource(n=95, split=30), batch_size=10, rank=0, world_size=1, num_epochs=2)
    assert len(ds) == 10 and ds.num_rows == 95
    assert sum(len(b["id"]) for b in ds) == 190
    assert ds.epoch == 2
    ds.set_epoch(7)
    first = next(iter(ds))
    assert ds.epoch == 7 and first["id"].tolist() == list(range(10))
    with pytest.raises(ValueError, match="epoch must be"):
        ds.set_epoch(-1)
    forever = data.read(ArraySource(n=5, split=5), batch_size=4, rank=0, world_size=1, num_epochs=None)
    it = iter(forever)
    sizes = [len(next(it)["id"]) for _ in range(7)]
    assert sizes == [4, 1, 4, 1, 4, 1, 4]


def test_non_transient_errors_propagate_after_good_batches() -> None:
    src = ArraySource(n=100, split=50, chunk=50)
    ds = data.read(src, batch_size=50, rank=0, world_size=1, prefetch=0)
    it = iter(ds)
    assert len(next(it)["id"]) == 50
    src.fail = KeyError
    with pytest.raises(KeyError):
        next(it)
    assert ds.state_dict()["rows"] == 50


def test_state_validation() -> None:
    ds = data.read(ArraySource(), rank=0, world_size=1)
    with pytest.raises(data.StateError, match="not a data state"):
        ds.load_state_dict({"epoch": 0})
    state = ds.state_dict()
    with pytest.raises(data.StateError, match="splits changed"):
        data.read(ArraySource(n=999), rank=0, world_size=1).load_state_dict(state)
    with pytest.raises(data.StateError, match="bad position"):
        ds.load_state_dict({**state, "rows": 10**9})


def test_reader_id_and_split_validation() -> None:
    with pytest.raises(ValueError, match="worker must be in"):
        ReaderId(0, 1, 2, 2)
    with pytest.raises(ValueError, match="stop must be >= start"):
        Split("k", 5, 4)
    s = Split("k", 1, 9, {"path": "p", "row_group": 3})
    assert Split.from_dict(s.to_dict()) == s and Split.from_dict(s.to_dict()).info == s.info


def test_reader_with_no_rows_and_endless_epochs_iterates_nothing() -> None:
    ds = data.read(ArraySource(n=2, split=2), batch_size=4, rank=2, world_size=3, num_epochs=None)
    assert ds.num_rows == 0 and list(ds) == []
    with pytest.raises(ValueError, match="at least one column"):
        data.read(ArraySource(), columns=[], rank=0, world_size=1)
