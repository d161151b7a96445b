"""Arrow batches -> dicts of numpy arrays, with no Python work per row.

Per column, by Arrow type:

* fixed-width numbers / booleans / temporals: ``numpy`` arrays of the same type. Without nulls
  this is zero-copy from the Arrow buffer (booleans are bit-packed in Arrow, so they copy).
  Nulls become the column's ``fill_null`` value (default 0 / 0.0 / False).
* strings / binary: with ``hash_buckets={"C1": n}`` an ``int64`` id in ``[0, n)`` equal to
  ``FNV-1a-64(utf-8 bytes) % n`` (a fixed, documented hash, so serving code can reproduce it);
  the hash runs vectorised over the Arrow offsets and data buffers (numpy, byte position by
  byte position), never per row in Python; a dictionary-encoded column hashes its dictionary
  once (remembered across the batches of a row group) and takes ids by index. The pipeline
  hashes each source record batch once (:func:`prehash`), before re-batching and shuffling.
  Null -> ``fill_null`` (default 0). Without hashing: a numpy object array of ``str``
  (nulls -> ``""``), slow: hash them.
* lists: two arrays, ``name`` (the flat values, converted as above, nulls inside -> fill) and
  ``name + ".offsets"`` (``int64``, ``batch rows + 1`` entries starting at 0; a null list is an
  empty one), ready for ``torch.nn.EmbeddingBag(..., include_last_offset=True)`` and
  ``tf.RaggedTensor.from_row_splits``.

Anything else (structs, maps) is rejected when the dataset is opened, naming the column.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kubeai_train.data.types import DataError

__all__ = [
    "OFFSETS_SUFFIX",
    "ColumnPlan",
    "HashMemo",
    "convert",
    "fnv1a64",
    "hash_ids",
    "plan_columns",
    "prehash",
]

OFFSETS_SUFFIX = ".offsets"
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


@dataclass(frozen=True)
class ColumnPlan:
    """How one column becomes numpy arrays (decided once, from the schema)."""

    name: str
    kind: str  # "fixed" | "string" | "hash" | "list"
    dtype: np.dtype[Any]  # of the (flat values) output
    fill: Any
    buckets: int | None = None

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.name, self.name + OFFSETS_SUFFIX) if self.kind.startswith("list") else (self.name,)


def _leaf_plan(
    name: str, typ: pa.DataType, buckets: int | None, fill: Any, in_list: bool
) -> tuple[str, np.dtype[Any], Any]:
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    if (
        pa.types.is_string(typ)
        or pa.types.is_large_string(typ)
        or pa.types.is_binary(typ)
        or pa.types.is_large_binary(typ)
    ):
        if buckets is not None:
            return "hash", np.dtype(np.int64), 0 if fill is None else int(fill)
        return "string", np.dtype(object), "" if fill is None else fill
    if buckets is not None:
        raise DataError(
            f"hash_buckets given for column {name!r} of type {typ}; hashing applies to string columns only"
        )
    if pa.types.is_boolean(typ):
        return "fixed", np.dtype(bool), False if fill is None else bool(fill)
    if pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_temporal(typ):
        dtype = np.dtype(typ.to_pandas_dtype())
        if fill is None:
            fill = 0
        return "fixed", dtype, fill
    if pa.types.is_null(typ):
        return "fixed", np.dtype(np.float32), 0 if fill is None else fill
    where = "list values of " if in_list else ""
    raise DataError(
        f"column {name!r} has type {typ} ({where}not a number, string or list of those); "
        "select other columns with columns=[...]"
    )


def plan_columns(
    schema: pa.Schema,
    columns: Sequence[str],
    hash_buckets: Mapping[str, int] | None = None,
    fill_null: Mapping[str, Any] | None = None,
) -> list[ColumnPlan]:
    """One :class:`ColumnPlan` per selected column; raises DataError for unsupported types."""
    hash_buckets = dict(hash_buckets or {})
    fill_null = dict(fill_null or {})
    for what, opt in (("hash_buckets", hash_buckets), ("fill_null", fill_null)):
        # options for columns not selected are ignored (one config serves several projections),
        # but a name that is no column at all is a typo worth stopping for
        unknown = [c for c in opt if schema.get_field_index(c) < 0]
        if unknown:
            raise DataError(
                f"{what} names column {unknown[0]!r}, which does not exist; columns: {', '.join(schema.names)}"
            )
    for c, n in hash_buckets.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise DataError(f"hash_buckets[{c!r}] must be an integer >= 1, got {n!r}")
    plans = []
    for c in columns:
        typ = schema.field(c).type
        if pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
            kind, dtype, fill = _leaf_plan(c, typ.value_type, hash_buckets.get(c), fill_null.get(c), True)
            plans.append(ColumnPlan(c, "list_" + kind, dtype, fill, hash_buckets.get(c)))
        else:
            kind, dtype, fill = _leaf_plan(c, typ, hash_buckets.get(c), fill_null.get(c), False)
            plans.append(ColumnPlan(c, kind, dtype, fill, hash_buckets.get(c)))
    return plans


def fnv1a64(arr: pa.Array) -> np.ndarray:
    """FNV-1a 64-bit hash of every string / binary value of ``arr``, vectorised.

    Runs over the Arrow offsets and data buffers with no copy of the strings: when every
    value has the same byte length ``L`` or none (fixed-width codes, hex ids, with nulls) the
    data buffer is viewed as a ``(non-empty values, L)`` matrix; otherwise values are ordered by length (longest
    first) so that the values still active at byte position ``j`` are a prefix, and each
    FNV round is one gather plus two in-place numpy operations on that prefix. The Python
    loop is over byte positions, never over values. Null slots hash to whatever bytes
    they span (callers overwrite them).
    """
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    typ = arr.type
    if pa.types.is_large_binary(typ) or pa.types.is_large_string(typ):
        odt: Any = np.int64
    elif pa.types.is_binary(typ) or pa.types.is_string(typ):
        odt = np.int32
    else:  # e.g. string_view, fixed-size binary
        arr = arr.cast(pa.large_binary())
        odt = np.int64
    n = len(arr)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    if n == 0:
        return h
    bufs = arr.buffers()
    size = np.dtype(odt).itemsize
    offsets = np.frombuffer(bufs[1], dtype=odt, count=n + 1, offset=arr.offset * size)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    longest = int(lengths.max())
    if longest == 0:
        return h
    with np.errstate(over="ignore"):
        filled = lengths != 0
        k = int(np.count_nonzero(filled))
        if int(offsets[-1]) - int(offsets[0]) == k * longest:
            # every value is `longest` bytes long or empty (nulls, ""): empty ones take no bytes,
            # so the data is a (k, longest) matrix of the others, in order
            mat = data[int(offsets[0]) : int(offsets[-1])].reshape(k, longest)
            hk = h if k == n else np.full(k, _FNV_OFFSET, dtype=np.uint64)
            for j in range(longest):
                hk ^= mat[:, j]
                hk *= _FNV_PRIME
            if k != n:
                h[filled] = hk  # empty values keep the offset basis, the hash of no bytes
            return h
        order = np.argsort(-lengths, kind="stable")
        starts = offsets[:-1][order].astype(np.int64)
        # active[j]: how many values are longer than j bytes (a prefix of `order`)
        active = np.searchsorted(-lengths[order], -np.arange(longest), side="left")
        hs = np.full(n, _FNV_OFFSET, dtype=np.uint64)
        for j in range(longest):
            k = int(active[j])
            v = hs[:k]
            v ^= data[starts[:k] + j]
            v *= _FNV_PRIME
        h[order] = hs
    return h


class HashMemo:
    """Remembers the ids of the last dictionary hashed per column.

    Dictionary-encoded sources (Parquet dictionary pages) hand every batch of a row group
    the same dictionary; comparing it with the previous one (a buffer comparison) is much
    cheaper than hashing it again.
    """

    def __init__(self) -> None:
        self._last: dict[tuple[str, int], tuple[pa.Array, np.ndarray]] = {}

    def dictionary_ids(self, key: str, dictionary: pa.Array, buckets: int) -> np.ndarray:
        hit = self._last.get((key, buckets))
        if hit is not None and len(hit[0]) == len(dictionary) and hit[0].equals(dictionary):
            return hit[1]
        ids = (fnv1a64(dictionary) % np.uint64(buckets)).astype(np.int64)
        self._last[(key, buckets)] = (dictionary, ids)
        return ids


def hash_ids(
    arr: pa.Array | pa.ChunkedArray,
    buckets: int,
    fill: int = 0,
    memo: HashMemo | None = None,
    key: str = "",
) -> np.ndarray:
    """``int64`` ids ``fnv1a64(value) % buckets`` for a string array; nulls -> ``fill``.

    Plain string arrays are hashed value by value (vectorised; cheaper than finding the
    distinct values first). Dictionary arrays hash their dictionary once (remembered in
    ``memo`` under ``key`` across batches) and take the ids by index.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    if pa.types.is_dictionary(arr.type):
        d = arr.dictionary
        if len(d) == 0:
            return np.full(n, fill, dtype=np.int64)
        codes = (
            memo.dictionary_ids(key, d, buckets)
            if memo is not None
            else (fnv1a64(d) % np.uint64(buckets)).astype(np.int64)
        )
        indices = arr.indices
        if indices.null_count:
            out = codes[indices.fill_null(0).to_numpy(zero_copy_only=False)]
            out[indices.is_null().to_numpy(zero_copy_only=False)] = fill
            return out
        return codes[indices.to_numpy(zero_copy_only=False)]
    out = (fnv1a64(arr) % np.uint64(buckets)).astype(np.int64)
    if arr.null_count:
        out[arr.is_null().to_numpy(zero_copy_only=False)] = fill
    return out


def prehash(
    batch: pa.RecordBatch, plans: Sequence[ColumnPlan], memo: HashMemo | None = None
) -> pa.RecordBatch:
    """``batch`` with every hashed string column (and list of strings) replaced by its
    ``int64`` ids (lists keep their row layout, null lists become empty ones).

    Run once per source record batch, before batches are cut and shuffled: the hash then
    runs on large batches, and the rows carried through re-batching and shuffling are 8-byte
    ids instead of strings. :func:`convert` passes such columns through.
    """
    if not any(p.kind in ("hash", "list_hash") for p in plans):
        return batch
    cols = list(batch.columns)
    for i, plan in enumerate(plans):
        arr = cols[i]
        if plan.kind == "hash" and not pa.types.is_integer(arr.type):
            cols[i] = pa.array(hash_ids(arr, plan.buckets or 1, plan.fill, memo, plan.name))
        elif plan.kind == "list_hash" and not pa.types.is_integer(arr.type.value_type):
            if pa.types.is_fixed_size_list(arr.type):
                arr = arr.cast(pa.large_list(arr.type.value_type))
            lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False)
            offsets = np.zeros(len(arr) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            ids = hash_ids(pc.list_flatten(arr), plan.buckets or 1, plan.fill, memo, plan.name)
            cols[i] = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(ids))
    return pa.RecordBatch.from_arrays(cols, names=batch.schema.names)


@functools.lru_cache(maxsize=256, typed=True)
def _cached_scalar(value: Any, typ: pa.DataType) -> pa.Scalar:
    return pa.scalar(value, typ)


def _fill_scalar(value: Any, typ: pa.DataType) -> pa.Scalar:
    """``pa.scalar(value, typ)``, made once per (value, type): a column is filled batch after batch."""
    try:
        return _cached_scalar(value, typ)
    except TypeError:  # an unhashable fill value (or one of the wrong type: raised again below)
        return pa.scalar(value, typ)


def _leaf(arr: pa.Array, plan: ColumnPlan, kind: str) -> np.ndarray:
    if kind == "hash":
        if pa.types.is_integer(arr.type):  # already hashed by prehash()
            return arr.to_numpy(zero_copy_only=False)
        return hash_ids(arr, plan.buckets or 1, plan.fill)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if arr.null_count:
        if pa.types.is_null(arr.type):
            return np.full(len(arr), plan.fill, dtype=plan.dtype)
        arr = pc.coalesce(arr, _fill_scalar(plan.fill, arr.type))  # = pc.fill_null, less overhead
    if kind == "string":
        return arr.to_numpy(zero_copy_only=False)
    if pa.types.is_null(arr.type):
        return np.full(len(arr), plan.fill, dtype=plan.dtype)
    return arr.to_numpy(zero_copy_only=False)  # zero-copy when Arrow allows (no nulls, not bool)


def convert(batch: pa.RecordBatch, plans: Sequence[ColumnPlan]) -> dict[str, np.ndarray]:
    """The batch's columns as numpy arrays, by ``plans`` (see the module doc)."""
    out: dict[str, np.ndarray] = {}
    for i, plan in enumerate(plans):
        arr = batch.column(i)
        if plan.kind.startswith("list_"):
            if pa.types.is_fixed_size_list(arr.type):
                arr = arr.cast(pa.large_list(arr.type.value_type))
            lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False)
            offsets = np.zeros(len(arr) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            out[plan.name] = _leaf(pc.list_flatten(arr), plan, plan.kind[5:])
            out[plan.name + OFFSETS_SUFFIX] = offsets
        else:
            out[plan.name] = _leaf(arr, plan, plan.kind)
    return out
