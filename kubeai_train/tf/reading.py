"""What both TF modes read data with: the reader contract, reader options and batch cleaning.

The batches come from ``kubeai_train.data.read`` (or a caller's ``read_fn`` of the same shape);
:func:`clean_batch` turns a batch into the dense arrays the feature columns expect (nulls
filled, dtypes fixed), for the between-graph pipeline, the coordinator's readers and the export's
evaluation alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = ["ReadFn", "clean_batch", "default_read_fn", "reader_options"]

#: ``read_fn(uri, *, columns, batch_size, rank, world_size, num_epochs, shuffle, seed, **options)``
#: returns an iterable of dict batches with ``state_dict()`` / ``load_state_dict()``.
ReadFn = Callable[..., Any]


def default_read_fn(uri: str, **kwargs: Any) -> Any:
    """``kubeai_train.data.read``; imported here so the trainer module loads without it."""
    from kubeai_train import data

    return data.read(uri, **kwargs)


def reader_options(kinds: Mapping[str, str], options: Mapping[str, Any]) -> dict[str, Any]:
    """Reader options with float nulls kept as NaN (the graph turns them into missing indicators)."""
    out = dict(options)
    fill = {name: math.nan for name, kind in kinds.items() if kind == "float32"}
    fill.update(out.get("fill_null") or {})
    out["fill_null"] = fill
    return out


def clean_batch(batch: Mapping[str, Any], kinds: Mapping[str, str]) -> dict[str, np.ndarray]:
    """Raw reader columns -> what the graph takes: nulls become ``""`` (strings) and NaN (floats)."""
    out = {}
    for name, kind in kinds.items():
        arr = batch[name]
        if kind == "string":
            arr = np.asarray(arr, dtype=object)
            mask = np.equal(arr, None)  # type: ignore[call-overload]
            if mask.any():
                arr = arr.copy()
                arr[mask] = ""
        elif kind == "float32":
            if isinstance(arr, np.ndarray) and arr.dtype != object:
                arr = arr.astype(np.float32, copy=False)
            else:
                arr = np.array([math.nan if v is None else v for v in arr], dtype=np.float32)
        else:
            arr = np.asarray(arr).astype(np.int64, copy=False)
        out[name] = arr
    return out
