"""Raw rows in, checked Arrow columns out: the one place serving validates what callers pass.

Both predictors start here, so a missing or mistyped column gets the same one-line error
whatever framework trained the model. Columns come back as Arrow arrays (not numpy): string
columns keep their buffers (the torch preprocessing hashes them vectorised, never per row in
Python) and nulls stay nulls until each framework's own training-time rule fills them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from kubeai_train.serving.types import (
    ColumnTypeError,
    InputError,
    MissingColumnError,
    Signature,
)

__all__ = ["check_rows", "slices"]

_EXPECTED = {
    "string": "raw strings as in the training data (the model hashes them itself; nulls allowed)",
    "float32": "numbers (nulls allowed: null, None or NaN)",
    "int64": "integers without nulls",
}


def _is_stringish(t: pa.DataType) -> bool:
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
    )


def _as_arrow(name: str, value: Any) -> pa.Array:
    if isinstance(value, pa.ChunkedArray):
        return value.combine_chunks()
    if isinstance(value, pa.Array):
        return value
    if isinstance(value, (str, bytes)) or np.ndim(value) != 1:
        raise ColumnTypeError(
            f"column {name!r} must be a 1-d array of values (one per row), got {type(value).__name__}"
            + ("" if isinstance(value, (str, bytes)) else f" of shape {np.shape(value)}")
        )
    try:
        # from_pandas: a NaN in a float array is a null, as in a DataFrame
        return pa.array(value, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ColumnTypeError(
            f"column {name!r} mixes types Arrow cannot hold in one column ({e}); give one type per column"
        ) from e


def _columns(rows: Any) -> Mapping[str, Any]:
    if isinstance(rows, (pa.Table, pa.RecordBatch)):
        return {n: rows.column(i) for i, n in enumerate(rows.schema.names)}
    if isinstance(rows, Mapping):
        return rows
    raise InputError(
        f"rows must be a pyarrow Table / RecordBatch or a mapping of column -> array, got {type(rows).__name__}"
    )


def _check_type(name: str, arr: pa.Array, dtype: str) -> pa.Array:
    t = arr.type
    if pa.types.is_null(t):  # a column of nulls only (e.g. pa.array([None, None]))
        if dtype == "int64":
            raise ColumnTypeError(f"column {name!r} is all null; expected {_EXPECTED[dtype]}")
        return pa.nulls(len(arr), pa.string() if dtype == "string" else pa.float32())
    value_type = t.value_type if pa.types.is_dictionary(t) else t
    if dtype == "string":
        if _is_stringish(value_type):
            return arr
    elif dtype == "float32":
        if pa.types.is_integer(value_type) or pa.types.is_floating(value_type):
            return arr.dictionary_decode() if pa.types.is_dictionary(t) else arr
    elif pa.types.is_integer(value_type):
        arr = arr.dictionary_decode() if pa.types.is_dictionary(t) else arr
        if arr.null_count:
            raise ColumnTypeError(
                f"column {name!r} has {arr.null_count} nulls; expected {_EXPECTED[dtype]}: fill them"
            )
        return arr
    raise ColumnTypeError(f"column {name!r} has type {t}; expected {dtype}: {_EXPECTED[dtype]}")


def check_rows(rows: Any, signature: Signature) -> tuple[dict[str, pa.Array], int]:
    """The signature's columns of ``rows`` as Arrow arrays, checked, and the row count.

    Args:
        rows: a ``pyarrow.Table`` / ``RecordBatch`` or a mapping of column -> array-like (Arrow
            array, numpy array, list with None for null). Other columns are ignored.
        signature: the inputs to take.

    Returns:
        ``({column: array}, n)``: every input of the signature, in its order; an all-null column
        typed as its dtype; numeric dictionary columns decoded (string ones are kept encoded).

    Raises:
        MissingColumnError: inputs absent from ``rows`` (names them, their dtypes and what
            ``rows`` has).
        ColumnTypeError: a column has a type the input does not take (names both).
        InputError: ``rows`` is of another kind, or its columns differ in length.
    """
    given = _columns(rows)
    missing = [s for s in signature.inputs if s.name not in given]
    if missing:
        what = ", ".join(f"{s.name!r} ({s.dtype})" for s in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise MissingColumnError(
            f"rows lack column{'s' if len(missing) > 1 else ''} {what}{more}; the model takes "
            f"{len(signature.inputs)} raw columns (Predictor.inputs), rows have {sorted(given)[:12]}"
        )
    out: dict[str, pa.Array] = {}
    n: int | None = None
    first = ""
    for spec in signature.inputs:
        arr = _check_type(spec.name, _as_arrow(spec.name, given[spec.name]), spec.dtype)
        if n is None:
            n, first = len(arr), spec.name
        elif len(arr) != n:
            raise InputError(
                f"column {spec.name!r} has {len(arr)} rows, {first!r} has {n}: give columns of one length"
            )
        out[spec.name] = arr
    return out, int(n or 0)


def slices(columns: Mapping[str, pa.Array], n: int, batch_size: int) -> Iterator[dict[str, pa.Array]]:
    """``columns`` cut into batches of at most ``batch_size`` rows (zero-copy slices)."""
    for start in range(0, n, batch_size):
        yield {k: v.slice(start, batch_size) for k, v in columns.items()}
