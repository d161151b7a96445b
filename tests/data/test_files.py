"""The files source: conformance, formats, partitions, fsspec URLs, local cache, bad files, faults."""

from __future__ import annotations

import json
import os
import pickle
import threading
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.orc as paorc
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

from kubeai_train import data
from kubeai_train.data import registry
from kubeai_train.data.files import FileSource

from .conformance import ConformanceSpec, DynamicConformance, SourceConformance, ids_of


def table(lo: int, hi: int, *, lists: bool = True) -> pa.Table:
    n = hi - lo
    ids = np.arange(lo, hi, dtype=np.int64)
    cols = {
        "id": ids,
        "f": pa.array([None if i % 7 == 0 else float(i) / 2 for i in ids], pa.float64()),
        "c": pa.array([None if i % 11 == 0 else f"v{i % 13}" for i in ids], pa.string()),
        "w": np.ones(n, dtype=np.float32),
    }
    if lists:
        cols["tags"] = pa.array(
            [[f"t{j}" for j in range(i % 4)] if i % 5 else None for i in ids], pa.list_(pa.string())
        )
    return pa.table(cols)


def write_partitioned(root: Path) -> np.ndarray:
    """Three parquet files in two hive partitions, with uneven row groups (1213 rows)."""
    (root / "ds=20260101").mkdir(parents=True)
    (root / "ds=20260102").mkdir(parents=True)
    pq.write_table(table(0, 700), root / "ds=20260101" / "part-0.parquet", row_group_size=300)
    pq.write_table(table(700, 1212), root / "ds=20260101" / "part-1.parquet", row_group_size=128)
    pq.write_table(table(1212, 1213), root / "ds=20260102" / "part-0.parquet")
    (root / "ds=20260101" / "_SUCCESS").write_text("")
    return np.arange(1213)


@pytest.fixture(scope="module")
def parted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    root = tmp_path_factory.mktemp("parted")
    return root, write_partitioned(root)


class TestFilesConformance(SourceConformance, DynamicConformance):
    @pytest.fixture(scope="class")
    def spec(self, parted: tuple[Path, np.ndarray]) -> ConformanceSpec:
        root, ids = parted
        return ConformanceSpec(source=str(root), ids=ids, options={"hash_buckets": {"c": 1000}})

    def missing_source(self, spec: ConformanceSpec) -> str:
        return str(Path(spec.source) / "no_such_dir")

    def empty_source(self, spec: ConformanceSpec) -> str:
        path = Path(spec.source).parent / "empty_ds"
        path.mkdir(exist_ok=True)
        pq.write_table(table(0, 0), path / "part-0.parquet")
        return str(path)


# -- formats, paths and partitions ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "orc", "csv"])
def test_formats_read_the_same_rows(tmp_path: Path, fmt: str) -> None:
    t1, t2 = table(0, 400, lists=False), table(400, 1000, lists=False)
    for i, t in enumerate((t1, t2)):
        p = tmp_path / f"part-{i}.{fmt}"
        if fmt == "parquet":
            pq.write_table(t, p, row_group_size=150)
        elif fmt == "orc":
            paorc.write_table(t, p, stripe_size=1024, batch_size=64)
        else:
            pacsv.write_csv(t, p)
    ds = data.read(str(tmp_path), batch_size=128, rank=0, world_size=1, hash_buckets={"c": 50})
    if fmt != "csv":
        assert len(ds.splits()) > 2, "row groups / stripes should be separate splits"
    batches = list(ds)
    got = ids_of(batches, "id")
    np.testing.assert_array_equal(got, np.arange(1000))
    f = np.concatenate([b["f"] for b in batches])
    want = np.array([0.0 if i % 7 == 0 else i / 2 for i in range(1000)])
    np.testing.assert_allclose(f, want)
    c = np.concatenate([b["c"] for b in batches])
    assert c.dtype == np.int64 and c.min() >= 0 and c.max() < 50
    # the same string hashes to the same id in every format
    assert c[1] == c[1 + 13] and (c[0::11] == 0).all()


def test_format_option_for_files_without_extension(tmp_path: Path) -> None:
    pq.write_table(table(0, 50), tmp_path / "data-00000")
    with pytest.raises(data.DatasetNotFoundError, match="format="):
        data.read(str(tmp_path), rank=0, world_size=1)
    ds = data.read(str(tmp_path), format="parquet", rank=0, world_size=1)
    np.testing.assert_array_equal(ids_of(list(ds), "id"), np.arange(50))


def test_glob_and_file_url(parted: tuple[Path, np.ndarray]) -> None:
    root, _ = parted
    ds = data.read(f"file://{root}/ds=*/part-1.parquet", rank=0, world_size=1, columns=["id", "ds"])
    batches = list(ds)
    np.testing.assert_array_equal(ids_of(batches, "id"), np.arange(700, 1212))
    assert set(np.concatenate([b["ds"] for b in batches])) == {"20260101"}


@pytest.mark.parametrize(
    "flt",
    [
        [("ds", "==", "20260102")],
        {"ds": "20260102"},
        {"ds": ["20260102", "20991231"]},
        [("ds", ">", 20260101)],
        lambda parts: parts["ds"].endswith("2"),
    ],
)
def test_partition_filter(parted: tuple[Path, np.ndarray], flt: object) -> None:
    root, _ = parted
    ds = data.read(str(root), partition_filter=flt, rank=0, world_size=1)
    batches = list(ds)
    np.testing.assert_array_equal(ids_of(batches, "id"), [1212])
    assert batches[0]["ds"].tolist() == ["20260102"]


def test_partition_filter_errors(parted: tuple[Path, np.ndarray]) -> None:
    root, _ = parted
    with pytest.raises(data.DatasetNotFoundError, match="partition_filter"):
        data.read(str(root), partition_filter={"ds": "19990101"}, rank=0, world_size=1)
    with pytest.raises(ValueError, match="'hour' is not a partition"):
        data.read(str(root), partition_filter=[("hour", "==", "1")], rank=0, world_size=1)
    with pytest.raises(ValueError, match="partition_filter entries"):
        data.read(str(root), partition_filter=[("ds", "~", "1")], rank=0, world_size=1)


def test_values_nulls_and_lists(parted: tuple[Path, np.ndarray]) -> None:
    root, _ = parted
    ds = data.read(
        str(root), batch_size=100, rank=0, world_size=1, hash_buckets={"tags": 64}, fill_null={"f": -1.0}
    )
    batches = list(ds)
    b = batches[0]
    assert set(b) == {"id", "f", "c", "w", "tags", "tags.offsets", "ds"}
    assert b["f"][0] == -1.0 and b["f"][1] == 0.5
    assert b["c"].dtype == object and b["c"][0] == "" and b["c"][1] == "v1"
    offs = b["tags.offsets"]
    assert offs[0] == 0 and len(offs) == 101 and offs[-1] == len(b["tags"])
    lengths = np.diff(offs)
    want = [0 if i % 5 == 0 else i % 4 for i in range(100)]
    np.testing.assert_array_equal(lengths, want)
    assert b["tags"].dtype == np.int64 and (b["tags"] < 64).all()
    # offsets restart at 0 in every batch, also in batches cut from the middle of a row group
    for bt in batches:
        assert bt["tags.offsets"][0] == 0 and bt["tags.offsets"][-1] == len(bt["tags"])


def test_fixed_width_columns_are_zero_copy(tmp_path: Path) -> None:
    pq.write_table(table(0, 1000, lists=False), tmp_path / "a.parquet")
    ds = data.read(str(tmp_path), batch_size=100, rank=0, world_size=1, columns=["id", "w"], prefetch=0)
    b = next(iter(ds))
    # a view onto the Arrow buffer: numpy does not own the memory
    assert not b["id"].flags.owndata and not b["w"].flags.owndata


def test_memory_url_and_local_cache(tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    with fs.open("/cache_test/ds=1/a.parquet", "wb") as fh:
        pq.write_table(table(0, 300), fh, row_group_size=100)
    cache = tmp_path / "cache"
    ds = data.read("memory://cache_test/", cache_dir=str(cache), num_epochs=1, rank=0, world_size=1)
    np.testing.assert_array_equal(ids_of(list(ds), "id"), np.arange(300))
    cached = [p for p in os.listdir(cache) if not p.startswith(".")]
    assert len(cached) == 1 and cached[0].endswith("a.parquet")
    fs.rm("/cache_test/ds=1/a.parquet")  # the remote copy is gone: epoch 1 must come from the cache
    np.testing.assert_array_equal(np.sort(ids_of(list(ds), "id")), np.arange(300))
    assert ds.epoch == 2


def test_storage_options_provider_plugs_in_by_scheme(tmp_path: Path) -> None:
    seen: list[dict] = []

    class OptsFS(MemoryFileSystem):
        protocol = "optsmem"

        @classmethod
        def _strip_protocol(cls, path):  # type: ignore[no-untyped-def]
            return super()._strip_protocol(path.removeprefix("optsmem://"))

        def __init__(self, *args, **kw):
            seen.append(dict(kw))
            super().__init__()

    fsspec.register_implementation("optsmem", OptsFS, clobber=True)
    OptsFS().pipe("/opts/a.parquet", _parquet_bytes(table(0, 10)))

    def provider(url: str, explicit: dict) -> dict:
        return {"endpoint": "from-env", "region": "r1", **explicit}

    registry.register_storage_options("optsmem", provider)
    try:
        ds = data.read("optsmem://opts/", storage_options={"region": "explicit"}, rank=0, world_size=1)
        assert ids_of(list(ds), "id").tolist() == list(range(10))
        assert {"endpoint": "from-env", "region": "explicit"} in seen
    finally:
        registry._storage.pop("optsmem", None)


def test_source_pickles_without_live_handles(parted: tuple[Path, np.ndarray]) -> None:
    root, _ = parted
    src = FileSource(str(root), partition_filter=lambda p: True)
    list(src.read(src.splits()[0], ["id"]))
    clone = pickle.loads(pickle.dumps(src))
    assert clone.splits() == src.splits()
    got = pa.Table.from_batches(list(clone.read(clone.splits()[1], ["id"], offset=5)))
    assert got.column("id").to_pylist() == list(range(305, 600))
    assert json.dumps(src.describe())


# -- bad files -------------------------------------------------------------------------------------


def _parquet_bytes(t: pa.Table, **kw: object) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(t, sink, **kw)
    return sink.getvalue().to_pybytes()


def test_truncated_file_names_the_file(tmp_path: Path) -> None:
    pq.write_table(table(0, 100), tmp_path / "a.parquet")
    raw = _parquet_bytes(table(100, 200))
    (tmp_path / "b.parquet").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(data.CorruptFileError) as ei:
        data.read(str(tmp_path), rank=0, world_size=1)
    assert str(tmp_path / "b.parquet") in str(ei.value) and "\n" not in str(ei.value)


def test_corrupt_row_group_names_file_and_row_group(tmp_path: Path) -> None:
    t = pa.table({"id": np.arange(3000), "x": np.random.default_rng(0).random(3000)})
    raw = bytearray(_parquet_bytes(t, row_group_size=1000, compression="snappy"))
    col = pq.ParquetFile(pa.BufferReader(bytes(raw))).metadata.row_group(1).column(1)
    raw[col.data_page_offset + 40 : col.data_page_offset + 240] = b"\xff" * 200
    path = tmp_path / "bad.parquet"
    path.write_bytes(bytes(raw))
    ds = data.read(str(path), batch_size=500, rank=0, world_size=1)
    got: list[np.ndarray] = []
    with pytest.raises(data.CorruptFileError) as ei:
        for b in ds:
            got.append(b["id"])
    msg = str(ei.value)
    assert str(path) in msg and "row group 1" in msg, msg
    assert ei.value.row_group == 1  # type: ignore[attr-defined]
    # everything before the bad row group was delivered, and the state points right after it
    np.testing.assert_array_equal(np.concatenate(got), np.arange(1000))
    assert ds.state_dict()["rows"] == 1000
    clone = pickle.loads(pickle.dumps(ei.value))
    assert type(clone) is data.CorruptFileError and str(clone) == msg


def test_schema_mismatch_names_both_files_and_column(tmp_path: Path) -> None:
    pq.write_table(table(0, 10), tmp_path / "a.parquet")
    pq.write_table(
        table(10, 20).set_column(0, "id", pa.array([str(i) for i in range(10, 20)])), tmp_path / "b.parquet"
    )
    with pytest.raises(data.SchemaMismatchError) as ei:
        data.read(str(tmp_path), rank=0, world_size=1)
    msg = str(ei.value)
    assert "'id'" in msg and "a.parquet" in msg and "b.parquet" in msg
    assert isinstance(ei.value, ValueError)
    (tmp_path / "b.parquet").unlink()
    pq.write_table(table(10, 20).drop_columns(["w"]), tmp_path / "c.parquet")
    with pytest.raises(data.SchemaMismatchError, match=r"'w' is in .*a\.parquet but not in .*c\.parquet"):
        data.read(str(tmp_path), rank=0, world_size=1)


def test_missing_path() -> None:
    with pytest.raises(data.DatasetNotFoundError, match="no_such_place") as ei:
        data.read("/no_such_place/x.parquet", rank=0, world_size=1)
    assert isinstance(ei.value, FileNotFoundError)


def test_unsupported_options_are_named(parted: tuple[Path, np.ndarray]) -> None:
    root, _ = parted
    with pytest.raises(ValueError, match="bogus"):
        data.read(str(root), bogus=1, rank=0, world_size=1)
    with pytest.raises(ValueError, match="format must be one of"):
        data.read(str(root), format="avro", rank=0, world_size=1)
    with pytest.raises(data.DataError, match="hash_buckets"):
        data.read(str(root), hash_buckets={"id": 10}, rank=0, world_size=1)


def test_unknown_scheme_source_gives_install_hint() -> None:
    registry.register_source(
        "nosuch", "kubeai_train.data.nosuch:Src", "reading nosuch:// needs nosuch: pip install x"
    )
    try:
        with pytest.raises(data.SourceUnavailableError, match="pip install x") as ei:
            data.read("nosuch://a/b", rank=0, world_size=1)
        assert isinstance(ei.value, ImportError)
    finally:
        registry._sources.pop("nosuch", None)


# -- pushdown and faults through a real fsspec filesystem -------------------------------------------


class CountingFS(MemoryFileSystem):
    """In-memory filesystem that counts bytes read and can fail reads (transient faults)."""

    protocol = "countmem"

    @classmethod
    def _strip_protocol(cls, path):  # type: ignore[no-untyped-def]
        return super()._strip_protocol(path.removeprefix("countmem://"))

    bytes_read = 0
    read_calls = 0
    # faults are placed by read count, not by time: after `reads_before_fault` more successful
    # reads, the next `fail_reads` read() calls raise ConnectionError. (Setting a fault "now"
    # from the consumer races the prefetch thread, which may already have read everything.)
    reads_before_fault = 0
    fail_reads = 0
    lock = threading.Lock()

    def _open(self, path, mode="rb", **kw):  # type: ignore[no-untyped-def]
        f = super()._open(path, mode, **kw)
        if "r" not in mode:
            return f
        # MemoryFileSystem hands out the one stored file object for every read open; a fresh
        # one per open keeps positions apart and the counting wrapper from stacking up
        f = MemoryFile(None, path, f.getvalue())
        orig = f.read
        cls = type(self)

        def read(*a):  # type: ignore[no-untyped-def]
            with cls.lock:
                if cls.fail_reads > 0 and cls.reads_before_fault <= 0:
                    cls.fail_reads -= 1
                    raise ConnectionError("connection reset by peer (injected)")
            out = orig(*a)
            with cls.lock:
                cls.bytes_read += len(out)
                cls.read_calls += 1
                cls.reads_before_fault -= 1
            return out

        f.read = read
        return f


fsspec.register_implementation("countmem", CountingFS, clobber=True)


@pytest.fixture
def wide_remote() -> str:
    rng = np.random.default_rng(0)
    cols = {"id": np.arange(20000)}
    cols.update({f"x{i}": rng.random(20000) for i in range(19)})
    CountingFS().pipe(
        "/wide/a.parquet", _parquet_bytes(pa.table(cols), row_group_size=5000, compression="none")
    )
    CountingFS.bytes_read = 0
    CountingFS.read_calls = 0
    CountingFS.fail_reads = 0
    CountingFS.reads_before_fault = 0
    return "countmem://wide/"


def test_projection_fetches_only_selected_column_chunks(wide_remote: str) -> None:
    ds = data.read(wide_remote, columns=["id"], batch_size=4096, rank=0, world_size=1)
    CountingFS.bytes_read = 0
    assert len(ids_of(list(ds), "id")) == 20000
    one = CountingFS.bytes_read
    ds = data.read(wide_remote, batch_size=4096, rank=0, world_size=1)
    CountingFS.bytes_read = 0
    list(ds)
    every = CountingFS.bytes_read
    assert one < every / 10, f"reading 1 of 20 columns fetched {one} of {every} bytes"


def test_remote_row_groups_are_fetched_in_coalesced_ranges(wide_remote: str) -> None:
    cols = ["x0", "x1", "x2", "x3", "x4"]  # adjacent column chunks: one range per row group
    ds = data.read(wide_remote, columns=cols, batch_size=4096, rank=0, world_size=1, prefetch=0)
    CountingFS.bytes_read = CountingFS.read_calls = 0
    assert len(ids_of(list(ds), "x4")) == 20000
    md = pq.ParquetFile(CountingFS().open("/wide/a.parquet")).metadata
    chunks = [md.row_group(g).column(1 + i) for g in range(md.num_row_groups) for i in range(5)]
    assert (
        CountingFS.bytes_read <= sum(c.total_compressed_size for c in chunks) + 64 * 1024
    )  # + one footer read
    # one range per row group (+ one footer read), not one request per column chunk (21)
    assert CountingFS.read_calls <= md.num_row_groups + 1, CountingFS.read_calls


def _reads_of_a_clean_pass(url: str, **kw: object) -> int:
    CountingFS.read_calls = 0
    list(data.read(url, **kw))  # type: ignore[arg-type]
    return CountingFS.read_calls


@pytest.mark.parametrize("prefetch", [0, 4])
def test_transient_errors_are_retried(wide_remote: str, prefetch: int) -> None:
    kw = {"columns": ["id"], "batch_size": 3000, "rank": 0, "world_size": 1, "backoff": 0.01}
    reads = _reads_of_a_clean_pass(wide_remote, **kw)
    # two resets in the middle of the pass, whatever the prefetch thread's timing
    CountingFS.reads_before_fault, CountingFS.fail_reads = reads // 2, 2
    got = list(data.read(wide_remote, prefetch=prefetch, **kw))
    np.testing.assert_array_equal(ids_of(got, "id"), np.arange(20000))
    assert CountingFS.fail_reads == 0, "the injected faults were not hit"


@pytest.mark.parametrize("prefetch", [0, 4])
def test_persistent_errors_raise_and_state_points_at_first_unread_row(
    wide_remote: str, prefetch: int
) -> None:
    kw = {"columns": ["id"], "batch_size": 3000, "rank": 0, "world_size": 1, "backoff": 0.01, "retries": 2}
    kw.update(shuffle=True, shuffle_buffer=7000)
    whole = ids_of(list(data.read(wide_remote, **kw)), "id")
    reads = _reads_of_a_clean_pass(wide_remote, **kw)
    # the store goes down for good half-way through the pass
    CountingFS.reads_before_fault, CountingFS.fail_reads = reads // 2, 10**6
    ds = data.read(wide_remote, prefetch=prefetch, **kw)
    got: list[np.ndarray] = []
    with pytest.raises(data.ReadFailedError) as ei:
        for b in ds:
            got.append(b["id"])
    assert got, "the fault came before the first batch"
    assert "wide/a.parquet" in str(ei.value) and "failed 3 times" in str(ei.value)
    assert isinstance(ei.value, OSError)
    state = json.loads(json.dumps(ds.state_dict()))
    assert state["rows"] == sum(len(g) for g in got)
    CountingFS.fail_reads = 0  # the store is back: a new process resumes from the state
    ds2 = data.read(wide_remote, prefetch=prefetch, **kw)
    ds2.load_state_dict(state)
    got += [b["id"] for b in ds2]
    np.testing.assert_array_equal(np.concatenate(got), whole)


@pytest.mark.parametrize("fmt", ["orc", "csv"])
def test_orc_and_csv_row_ranges_are_exactly_once_and_resumable(tmp_path: Path, fmt: str) -> None:
    for i, (lo, hi) in enumerate(((0, 250), (250, 333))):
        t = table(lo, hi, lists=False)
        p = tmp_path / f"p{i}.{fmt}"
        if fmt == "orc":
            paorc.write_table(t, p, stripe_size=1024, batch_size=64)
        else:
            pacsv.write_csv(t, p, pacsv.WriteOptions(delimiter=";"))
    opts = {"columns": ["id", "c"], "batch_size": 40, "shuffle": True, "seed": 1, "shuffle_buffer": 90}
    if fmt == "csv":
        opts["csv_options"] = {"delimiter": ";"}
    got = []
    for rank in range(3):  # 333 rows over 3 readers cuts stripes / files into row ranges
        got.append(ids_of(list(data.read(str(tmp_path), rank=rank, world_size=3, **opts)), "id"))
    np.testing.assert_array_equal(np.sort(np.concatenate(got)), np.arange(333))
    ds = data.read(str(tmp_path), rank=1, world_size=3, **opts)
    it = iter(ds)
    head = [next(it)["id"], next(it)["id"]]
    it.close()  # type: ignore[attr-defined]
    again = data.read(str(tmp_path), rank=1, world_size=3, **opts)
    again.load_state_dict(ds.state_dict())
    np.testing.assert_array_equal(np.concatenate(head + [b["id"] for b in again]), got[1])


@pytest.mark.parametrize("read_ahead", [0, 2])
@pytest.mark.parametrize("batch_size", [1, 7, 128, 5000])
def test_batches_equal_the_table_across_source_batch_boundaries(
    parted: tuple[Path, np.ndarray], batch_size: int, read_ahead: int
) -> None:
    """Batches are cut from converted source batches (views inside one, a copy across two):
    whatever the batch size, they concatenate to the table itself, nulls filled as
    ``pc.fill_null`` fills them, lists rebased, strings hashed by ``hash_ids``."""
    import pyarrow.compute as pc

    from kubeai_train.data.convert import hash_ids

    root, _ = parted
    kw = {"hash_buckets": {"tags": 64, "c": 1000}, "fill_null": {"f": -1.0}, "read_ahead": read_ahead}
    # small source batches (batch_rows), so that batches straddle them as well as row groups
    ds = data.read(str(root), batch_size=batch_size, rank=0, world_size=1, batch_rows=50, **kw)
    batches = list(ds)
    assert [len(b["id"]) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
    t = pq.read_table(str(root))
    t = t.sort_by("id")  # the files are read in path order, which is id order
    want = {
        "id": t["id"].to_numpy(),
        "f": pc.fill_null(t["f"], -1.0).to_numpy(),
        "w": t["w"].to_numpy(),
        "c": hash_ids(t["c"], 1000),
    }
    for name, values in want.items():
        got = np.concatenate([b[name] for b in batches])
        assert got.dtype == values.dtype, name
        np.testing.assert_array_equal(got, values, err_msg=name)
    tags = t["tags"].combine_chunks()
    lengths = pc.list_value_length(tags).fill_null(0).to_numpy()
    np.testing.assert_array_equal(np.concatenate([np.diff(b["tags.offsets"]) for b in batches]), lengths)
    np.testing.assert_array_equal(
        np.concatenate([b["tags"] for b in batches]), hash_ids(pc.list_flatten(tags), 64)
    )
    for b in batches:
        assert b["tags.offsets"][0] == 0 and b["tags.offsets"][-1] == len(b["tags"])
