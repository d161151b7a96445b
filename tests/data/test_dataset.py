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


def test_assignment_that_is_not_one_fails_at_once_in_one_line() -> None:
    src = ArraySource()
    src.splits = None  # type: ignore[assignment]  # nothing may be read before the check
    for bad in ("dynamik", 3, StaticAssignment):
        with pytest.raises(ValueError) as ei:
            data.read(src, rank=0, world_size=1, assignment=bad)
        msg = str(ei.value)
        assert "\n" not in msg and repr(bad) in msg and "'static'" in msg and "Assignment" in msg
    ds = data.read(ArraySource(n=10, split=5), rank=0, world_size=1, assignment="static", batch_size=10)
    assert isinstance(ds.assignment, StaticAssignment) and next(iter(ds))["id"].tolist() == list(range(10))


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


@pytest.mark.parametrize("read_ahead", [0, 2])
def test_prefetch_is_bounded_and_stops_with_the_consumer(read_ahead: int) -> None:
    src = ArraySource(n=100_000, split=1000, chunk=10)
    ds = data.read(src, batch_size=10, prefetch=2, read_ahead=read_ahead, rank=0, world_size=1)
    before = set(threading.enumerate())
    it = iter(ds)
    next(it)
    # the producer fills the queue and blocks: wait for it (however loaded the machine), then
    # check it stays blocked. One batch consumed, 2 queued, one waiting to be put, and at most
    # one record batch read for the next; the read-ahead adds its queue and the record batch
    # it waits to put
    bound = (1 + 2 + 1) * 10 + (read_ahead + 1) * 10 if read_ahead else (1 + 2 + 1) * 10
    deadline = time.monotonic() + 30
    while src.rows_read < bound and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert bound <= src.rows_read <= bound + 10, src.rows_read
    it.close()  # type: ignore[attr-defined]
    # close() joins the producer and its read-ahead: no sleep needed, and threads of other
    # tests do not count
    assert not [t for t in set(threading.enumerate()) - before if t.name.startswith("kubeai-data-")]
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


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("num_epochs", [1, 3])
def test_state_after_the_last_batch_resumes_to_nothing_left(prefetch: int, num_epochs: int) -> None:
    """A state taken after the last batch of the last epoch (a trainer killed before it saw the
    end) resumes to an iteration with nothing left, not to another block of epochs; the next
    iteration then reads the next block, as re-iterating does."""
    kw = {"batch_size": 10, "rank": 0, "world_size": 1, "num_epochs": num_epochs, "prefetch": prefetch}
    ds = data.read(ArraySource(n=95, split=30), **kw)
    states, sizes = [], []
    for b in ds:
        sizes.append(len(b["id"]))
        states.append(ds.state_dict())
    assert sum(sizes) == 95 * num_epochs
    last = states[-1]
    assert last["rows"] == 95 and last["epoch"] == num_epochs - 1
    resumed = data.read(ArraySource(n=95, split=30), **kw)
    resumed.load_state_dict(last)
    assert list(resumed) == []
    assert resumed.epoch == num_epochs and sum(len(b["id"]) for b in resumed) == 95 * num_epochs
    # a state inside the block still resumes to exactly the rest of it
    k = len(states) // 2
    rest = data.read(ArraySource(n=95, split=30), **kw)
    rest.load_state_dict(states[k])
    assert sum(len(b["id"]) for b in rest) == sum(sizes[k + 1 :])


def test_non_transient_errors_propagate_after_good_batches() -> None:
    src = ArraySource(n=100, split=50, chunk=50)
    # read_ahead=0: the failure is injected between two reads, which a read-ahead would have
    # done already (test_read_ahead_errors_* inject it at a row instead)
    ds = data.read(src, batch_size=50, rank=0, world_size=1, prefetch=0, read_ahead=0)
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


# -- memory: bounded by prefetch x batch bytes, not by dataset size --------------------------------

_MEMORY_CHILD = r"""
import gc, json, sys
import pyarrow as pa
from kubeai_train import data

def status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)

url, warm_url, kw = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
# imports, thread pools and the allocator's per-thread caches warmed on 64 batches of another
# dataset (RSS settles after about 50), then the peak is reset
warm = iter(data.read(warm_url, rank=0, world_size=1, **kw))
for _ in range(64):
    next(warm)
warm.close()
del warm
gc.collect()
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # resets VmHWM to the current RSS
base = status("VmRSS")
ds = data.read(url, rank=0, world_size=1, **kw)
rows = batch_bytes = 0
for i, b in enumerate(ds):
    rows += len(b["id"])
    if i == 1:
        batch_bytes = sum(a.nbytes for a in b.values())
print(json.dumps({"rows": rows, "growth": status("VmHWM") - base, "batch_bytes": batch_bytes,
                  "arrow_peak": pa.default_memory_pool().max_memory(), "prefetch": ds.options.prefetch,
                  "window": ds.options.window}))
"""


def _memory_of_a_read(url: str, warm_url: str, **kw: object) -> dict:
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, url, warm_url, json.dumps(kw)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_peak_memory_does_not_grow_with_dataset_size(tmp_path) -> None:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rows_per_file, mib = 100_000, 1 << 20
    rng = np.random.default_rng(0)
    proto = pa.table(
        {
            "id": np.arange(rows_per_file),
            **{f"x{i}": rng.random(rows_per_file, dtype=np.float32) for i in range(8)},
            "c": pc.cast(pa.array(rng.zipf(1.3, rows_per_file) % 100_000), pa.string()),
        }
    )
    for name, files in (("warm", 3), ("small", 2), ("big", 20)):  # 300k, 200k and 2M rows
        (tmp_path / name).mkdir()
        for f in range(files):
            t = proto.set_column(0, "id", pa.array(np.arange(f * rows_per_file, (f + 1) * rows_per_file)))
            pq.write_table(t, tmp_path / name / f"part-{f:02d}.parquet", row_group_size=65_536)
    kw = {"batch_size": 4096, "hash_buckets": {"c": 1000}}
    warm = str(tmp_path / "warm")
    small = _memory_of_a_read(str(tmp_path / "small"), warm, **kw)
    big = _memory_of_a_read(str(tmp_path / "big"), warm, **kw)
    shuffled = _memory_of_a_read(str(tmp_path / "big"), warm, shuffle=True, **kw)
    assert (small["rows"], big["rows"], shuffled["rows"]) == (200_000, 2_000_000, 2_000_000)
    data_bytes = big["rows"] * big["batch_bytes"] // 4096  # what holding the dataset would cost
    batches = (big["prefetch"] + 3) * big["batch_bytes"]  # queue + one being put, built, consumed
    window = big["window"] * big["batch_bytes"] // 4096
    print(
        f"\nRSS growth MiB: 200k rows {small['growth'] / mib:.1f}, 2M rows {big['growth'] / mib:.1f}, "
        f"2M shuffled {shuffled['growth'] / mib:.1f}; Arrow peak MiB {small['arrow_peak'] / mib:.1f}, "
        f"{big['arrow_peak'] / mib:.1f}, {shuffled['arrow_peak'] / mib:.1f}; (prefetch + 3) x batch "
        f"{batches / mib:.1f} MiB, window {window / mib:.1f} MiB, dataset {data_bytes / mib:.0f} MiB"
    )
    # 10x the rows, the same memory: Arrow's own peak (exact) and the process's RSS (allocator noise)
    assert big["arrow_peak"] <= small["arrow_peak"] + 2 * mib
    # + the Parquet reader's 1 MiB stream buffer per selected column and a few source batches
    assert big["arrow_peak"] <= batches + proto.num_columns * mib + 2 * mib
    # RSS also carries allocator caches (noisier): a wider margin, still far below the 83 MiB
    # the extra 1.8M rows would take
    assert big["growth"] <= small["growth"] + 16 * mib
    assert big["growth"] <= 40 * mib + batches < data_bytes / 2
    # shuffling costs one window (two while it is permuted)
    assert shuffled["arrow_peak"] <= big["arrow_peak"] + 2.5 * window
    assert shuffled["growth"] <= big["growth"] + 2.5 * window + 16 * mib


# -- read-ahead: same batches, same errors, no thread left behind ---------------------------------


class FailingSource(ArraySource):
    """An ArraySource whose reads of the record batch holding row ``fail_at`` raise ``error()``,
    every time (or only the first ``times`` times)."""

    def __init__(self, fail_at: int, error: type[BaseException], times: int | None = None, **kw: int) -> None:
        super().__init__(**kw)
        self.fail_at, self.error, self.times = fail_at, error, times
        self.failures = 0

    def read(
        self, split: Split, columns: Sequence[str] | None = None, offset: int = 0
    ) -> Iterator[pa.RecordBatch]:
        for rb in super().read(split, columns, offset):
            first = int(rb.column(0)[0].as_py()) if "id" in rb.schema.names else -1
            if first <= self.fail_at < first + rb.num_rows and (
                self.times is None or self.failures < self.times
            ):
                self.failures += 1
                raise self.error(f"injected at row {self.fail_at}")
            yield rb


def _kubeai_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("kubeai-data-")]


def _read_until_error(src: Source, **kw: object) -> tuple[list[list[int]], BaseException | None, int]:
    ds = data.read(src, rank=0, world_size=1, backoff=0.0, **kw)
    got: list[list[int]] = []
    err = None
    try:
        for b in ds:
            got.append(b["id"].tolist())
    except Exception as e:
        err = e
    return got, err, ds.state_dict()["rows"]


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize(
    "error, want",
    [(data.CorruptFileError, data.CorruptFileError), (ConnectionError, data.ReadFailedError)],
)
def test_read_ahead_errors_surface_as_the_sync_path_raises_them(prefetch: int, error, want) -> None:
    """A failure in the read-ahead thread (a bad file, or transient errors past the retries)
    reaches the caller as the same error the synchronous path raises, after the same batches,
    with the state at the first row not delivered; no thread is left running."""
    results = []
    for read_ahead in (0, 3):
        src = FailingSource(fail_at=537, error=error, n=1000, split=100, chunk=25)
        results.append(_read_until_error(src, batch_size=40, prefetch=prefetch, read_ahead=read_ahead))
        assert not _kubeai_threads()
    (sync_batches, sync_err, sync_rows), (ra_batches, ra_err, ra_rows) = results
    assert isinstance(sync_err, want) and isinstance(ra_err, want)
    assert type(ra_err) is type(sync_err) and str(ra_err) == str(sync_err)
    if want is data.ReadFailedError:
        assert "rows [525, 600)" in str(ra_err) and isinstance(ra_err.__cause__, ConnectionError)
    # every batch before the failing rows, and the state right after the last one delivered
    assert ra_batches == sync_batches == [list(range(a, a + 40)) for a in range(0, 520, 40)]
    assert ra_rows == sync_rows == 520


@pytest.mark.parametrize("prefetch", [0, 2])
def test_read_ahead_retries_transient_errors_on_its_thread(prefetch: int) -> None:
    src = FailingSource(fail_at=537, error=ConnectionError, times=2, n=1000, split=100, chunk=25)
    batches, err, _ = _read_until_error(src, batch_size=40, prefetch=prefetch, read_ahead=2)
    assert err is None and src.failures == 2
    assert [i for b in batches for i in b] == list(range(1000))


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("how", ["close", "garbage", "exhausted"])
def test_read_ahead_threads_stop_with_the_iteration(prefetch: int, how: str) -> None:
    import gc

    ds = data.read(
        ArraySource(n=100_000, split=1000, chunk=10), batch_size=10, rank=0, world_size=1, prefetch=prefetch
    )
    assert ds.options.read_ahead > 0  # on by default
    it = iter(ds)
    next(it)
    assert _kubeai_threads()
    if how == "close":
        it.close()  # type: ignore[attr-defined]
    elif how == "garbage":
        del it
        gc.collect()
    else:
        for _ in it:
            pass
    assert not _kubeai_threads()


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_read_ahead_reads_the_same_batches_and_states(prefetch: int, shuffle: bool) -> None:
    def run(read_ahead: int) -> tuple[list[list[int]], list[dict]]:
        kw = {"batch_size": 33, "shuffle": shuffle, "shuffle_buffer": 250, "num_epochs": 2}
        ds = data.read(
            ArraySource(n=1000, split=90, chunk=40),
            rank=1,
            world_size=2,
            prefetch=prefetch,
            read_ahead=read_ahead,
            **kw,
        )
        batches, states = [], []
        for b in ds:
            batches.append(b["id"].tolist())
            states.append(ds.state_dict())
        return batches, states

    assert run(0) == run(1) == run(4)


def test_read_ahead_is_validated() -> None:
    with pytest.raises(ValueError, match="read_ahead must be an integer >= 0, got -1"):
        data.read(ArraySource(), rank=0, world_size=1, read_ahead=-1)
