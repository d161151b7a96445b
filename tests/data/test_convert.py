"""Arrow -> numpy conversion: stable hashing, nulls, lists, zero-copy."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubeai_train.data import DataError
from kubeai_train.data.convert import HashMemo, convert, fnv1a64, hash_ids, plan_columns, prehash


def fnv_reference(b: bytes) -> int:
    h = 0xCBF29CE484222325
    for c in b:
        h = ((h ^ c) * 0x100000001B3) & (2**64 - 1)
    return h


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.one_of(st.none(), st.text(max_size=20)), max_size=40),
    st.integers(1, 10**6),
    st.integers(0, 5),
)
def test_hash_ids_match_fnv1a_reference(values, buckets, start):
    arr = pa.array(["pad"] * start + values, pa.string()).slice(start)
    got = hash_ids(arr, buckets, fill=-7)
    want = [-7 if v is None else fnv_reference(v.encode()) % buckets for v in values]
    assert got.tolist() == want
    assert got.dtype == np.int64


def test_known_hash_values_are_stable():
    # fixed values: serving code (or another language) must reproduce these ids
    assert fnv1a64(pa.array(["", "a", "68fd1e64"])).tolist() == [
        0xCBF29CE484222325,
        0xAF63DC4C8601EC8C,
        fnv_reference(b"68fd1e64"),
    ]
    assert hash_ids(pa.array(["68fd1e64"]), 1_000_003).tolist() == [fnv_reference(b"68fd1e64") % 1_000_003]


def test_dictionary_and_large_string_columns_hash_like_strings():
    vals = ["x", "y", None, "x"]
    plain = hash_ids(pa.array(vals), 97)
    np.testing.assert_array_equal(hash_ids(pa.array(vals).dictionary_encode(), 97), plain)
    np.testing.assert_array_equal(hash_ids(pa.array(vals, pa.large_string()), 97), plain)


def test_nulls_become_per_column_defaults():
    rb = pa.record_batch(
        {
            "i": pa.array([1, None, 3], pa.int32()),
            "f": pa.array([None, 2.5, None], pa.float32()),
            "b": pa.array([None, True, False]),
            "s": pa.array(["a", None, "c"]),
            "n": pa.nulls(3),
        }
    )
    out = convert(rb, plan_columns(rb.schema, rb.schema.names, fill_null={"f": -1.0}))
    assert out["i"].tolist() == [1, 0, 3] and out["i"].dtype == np.int32
    assert out["f"].tolist() == [-1.0, 2.5, -1.0] and out["f"].dtype == np.float32
    assert out["b"].tolist() == [False, True, False]
    assert out["s"].tolist() == ["a", "", "c"]
    assert out["n"].tolist() == [0.0, 0.0, 0.0]


def test_lists_become_values_and_offsets():
    arr = pa.array([[1, 2], None, [], [3, None, 5]], pa.list_(pa.int64()))
    rb = pa.record_batch({"l": arr}).slice(1)  # a slice: offsets must restart at 0
    out = convert(rb, plan_columns(rb.schema, ["l"]))
    assert out["l.offsets"].tolist() == [0, 0, 0, 3]
    assert out["l"].tolist() == [3, 0, 5]
    strs = pa.record_batch({"t": pa.array([["a", "b"], ["a"]], pa.list_(pa.string()))})
    out = convert(strs, plan_columns(strs.schema, ["t"], hash_buckets={"t": 10}))
    assert out["t.offsets"].tolist() == [0, 2, 3]
    assert out["t"][0] == out["t"][2] == fnv_reference(b"a") % 10


def test_zero_copy_for_fixed_width_without_nulls():
    arr = pa.array(np.arange(100, dtype=np.int64))
    rb = pa.record_batch({"a": arr}).slice(10, 20)
    out = convert(rb, plan_columns(rb.schema, ["a"]))
    assert out["a"].tolist() == list(range(10, 30))
    assert not out["a"].flags.owndata
    assert np.shares_memory(out["a"], np.frombuffer(arr.buffers()[1], dtype=np.int64))


def test_unsupported_and_bad_options():
    rb = pa.record_batch({"s": pa.array([{"a": 1}]), "i": pa.array([1])})
    with pytest.raises(DataError, match="'s' has type struct"):
        plan_columns(rb.schema, ["s"])
    with pytest.raises(DataError, match="string columns only"):
        plan_columns(rb.schema, ["i"], hash_buckets={"i": 3})
    with pytest.raises(DataError, match=">= 1"):
        plan_columns(rb.schema, ["i"], hash_buckets={"i": 0})
    with pytest.raises(DataError, match="'zz', which does not exist"):
        plan_columns(rb.schema, ["i"], fill_null={"zz": 0})


def test_prehash_matches_convert_and_memo_follows_dictionaries():
    rb = pa.record_batch(
        {
            "s": pa.array(["a", None, "bb", "ccc", ""]),
            "t": pa.array([["x", None], None, [], ["yy"], ["x"]], pa.list_(pa.string())),
            "i": pa.array([1, 2, 3, 4, 5]),
        }
    ).slice(1)
    plans = plan_columns(rb.schema, ["s", "t", "i"], hash_buckets={"s": 1000, "t": 7}, fill_null={"s": -1})
    want = convert(rb, plans)
    pre = prehash(rb, plans, HashMemo())
    assert pre.schema.field("s").type == pa.int64()
    got = convert(pre, plans)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert got["s"].tolist() == [
        -1,
        fnv_reference(b"bb") % 1000,
        fnv_reference(b"ccc") % 1000,
        fnv_reference(b"") % 1000,
    ]
    # dictionary batches: the memo must notice when the dictionary changes between batches
    memo = HashMemo()
    for vals in (["p", "q", None, "p"], ["p", "q", "q"], ["zz", "p"]):
        arr = pa.array(vals).dictionary_encode()
        got_ids = hash_ids(arr, 101, fill=5, memo=memo, key="c")
        assert got_ids.tolist() == [5 if v is None else fnv_reference(v.encode()) % 101 for v in vals]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=12), min_size=1, max_size=30), st.integers(0, 3), st.booleans())
def test_fnv1a64_any_lengths_offsets_and_widths(values, start, large):
    arr = pa.array([b"pad"] * start + values, pa.large_binary() if large else pa.binary()).slice(start)
    assert fnv1a64(arr).tolist() == [fnv_reference(v) for v in values]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.one_of(st.none(), st.just(""), st.binary(min_size=5, max_size=5)), min_size=1, max_size=40),
    st.integers(0, 3),
)
def test_fnv1a64_fixed_width_values_among_nulls_and_empty_ones(values, start):
    # the matrix path: every value 5 bytes long or empty; nulls are filled by the caller
    arr = pa.array([b"pad"] * start + values, pa.binary()).slice(start)
    got = fnv1a64(arr).tolist()
    assert [g for g, v in zip(got, values, strict=True) if v is not None] == [
        fnv_reference(v) for v in values if v is not None
    ]
    assert hash_ids(arr, 977, fill=-3).tolist() == [
        -3 if v is None else fnv_reference(v) % 977 for v in values
    ]


def test_fnv1a64_null_slots_spanning_bytes_do_not_shift_the_others():
    # Arrow allows bytes under a null slot: then the values are not one matrix
    offsets = pa.py_buffer(np.array([0, 2, 5, 7], dtype=np.int32).tobytes())
    data = pa.py_buffer(b"abXYZcd")
    validity = pa.py_buffer(np.packbits([1, 0, 1], bitorder="little").tobytes())
    arr = pa.Array.from_buffers(pa.binary(), 3, [validity, offsets, data], null_count=1)
    assert hash_ids(arr, 1 << 20, fill=0).tolist() == [
        fnv_reference(b"ab") % (1 << 20),
        0,
        fnv_reference(b"cd") % (1 << 20),
    ]


_FILL_TYPES = [
    (pa.int8(), 7),
    (pa.int32(), -2),
    (pa.int64(), 3),
    (pa.uint16(), 9),
    (pa.float32(), -1.5),
    (pa.float64(), float("nan")),
    (pa.bool_(), True),
    (pa.timestamp("ms"), 0),
    (pa.date32(), 0),
    (pa.string(), "missing"),
]


@pytest.mark.parametrize("nulls", [True, False])
@pytest.mark.parametrize("typ, fill", _FILL_TYPES, ids=[str(t) for t, _ in _FILL_TYPES])
def test_fill_paths_give_what_fill_null_gives(typ, fill, nulls):
    """With nulls: the values ``pc.fill_null`` gives (what conversion used before); without:
    the column itself, zero-copy where Arrow allows it."""
    import pyarrow.compute as pc

    rng = np.random.default_rng(0)
    ints = rng.integers(0, 100, 1000)
    values = (
        [f"s{i}" for i in ints]
        if pa.types.is_string(typ)
        else ints.astype(bool if pa.types.is_boolean(typ) else np.int64)
    )
    mask = rng.random(1000) < 0.1 if nulls else None
    arr = pa.array(values, mask=mask)
    arr = (
        (arr.cast(pa.int32()) if pa.types.is_date32(typ) else arr).cast(typ).slice(13, 900)
    )  # a slice: an offset into the buffers
    assert (arr.null_count > 0) == nulls
    rb = pa.record_batch({"x": arr})
    plans = plan_columns(rb.schema, ["x"], fill_null={"x": fill})
    for _ in range(2):  # the fill scalar is made once and reused
        got = convert(rb, plans)["x"]
        want = pc.fill_null(arr, pa.scalar(fill, typ)).to_numpy(zero_copy_only=False)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    if not nulls and not pa.types.is_boolean(typ) and not pa.types.is_string(typ):
        assert not got.flags.owndata  # a view of the Arrow buffer


def test_dictionary_columns_fill_as_their_values():
    arr = pa.array(["a", None, "b", None]).dictionary_encode()
    rb = pa.record_batch({"d": arr})
    assert convert(rb, plan_columns(rb.schema, ["d"], fill_null={"d": "?"}))["d"].tolist() == [
        "a",
        "?",
        "b",
        "?",
    ]
