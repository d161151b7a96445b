"""The load model: resident bytes and per-step traffic of a variable, from its shape and id statistics.

Dense variables are pulled and pushed whole every step. An embedding table moves only the rows a
batch touches: with ``B`` lookups drawn from id probabilities ``p_i`` the expected number of
distinct rows is ``sum_i 1 - (1 - p_i)^B``; each costs a row pulled and a row's gradient pushed.
Optimizer slots (Adam's two moments, Adagrad's accumulator) stay resident on the PS beside their
variable and never travel, so they count in ``nbytes`` only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from kubeai_train.balance.types import BalanceError, VariableLoad

__all__ = [
    "DTYPE_BYTES",
    "dense",
    "embedding",
    "expected_unique_rows",
    "from_variable_infos",
    "state",
    "zipf_unique_rows",
]

DTYPE_BYTES = {"float32": 4, "float64": 8, "int32": 4, "int64": 8, "float16": 2, "bfloat16": 2, "bool": 1}

# ids up to this rank are summed exactly; beyond, in geometric buckets whose members have
# near-equal probability (the relative error of the total stays below 1e-4)
_EXACT = 20_000
_RATIO = 1.002


def _dtype_size(dtype: str, name: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise BalanceError(
            f"variable {name!r}: unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}"
        ) from None


def expected_unique_rows(probabilities: Iterable[float] | np.ndarray, draws: int) -> float:
    """Expected distinct ids among ``draws`` independent lookups with the given id probabilities.

    ``probabilities`` may be counts (measured or a histogram); they are normalised to sum to 1.

    Raises:
        BalanceError: a negative probability, all zero, or ``draws < 0``.
    """
    p = np.asarray(list(probabilities) if not isinstance(probabilities, np.ndarray) else probabilities, float)
    if draws < 0:
        raise BalanceError(f"draws must be >= 0, got {draws}")
    if p.size == 0 or (p < 0).any() or not np.isfinite(p).all() or p.sum() <= 0:
        raise BalanceError("id frequencies must be finite, >= 0 and not all zero")
    p = p / p.sum()
    return float(_touched(p, draws).sum())


def zipf_unique_rows(num_ids: int, exponent: float, draws: int) -> float:
    """:func:`expected_unique_rows` for ``p_i ~ i^-exponent``, ``i = 1..num_ids``, in O(log num_ids) buckets."""
    if num_ids < 1:
        raise BalanceError(f"num_ids must be >= 1, got {num_ids}")
    if exponent < 0 or not math.isfinite(exponent):
        raise BalanceError(f"zipf exponent must be a finite number >= 0, got {exponent}")
    if draws < 0:
        raise BalanceError(f"draws must be >= 0, got {draws}")
    head = np.arange(1, min(num_ids, _EXACT) + 1, dtype=float)
    weights = [head**-exponent]
    counts = [np.ones_like(head)]
    if num_ids > _EXACT:
        edges = np.unique(np.round(_EXACT * _RATIO ** np.arange(0, math.log(num_ids / _EXACT, _RATIO) + 2)))
        edges = np.clip(edges, _EXACT, num_ids).astype(float)
        edges = np.unique(np.concatenate([edges, [float(num_ids)]]))
        lo, hi = edges[:-1], edges[1:]  # bucket = ids lo+1 .. hi
        n = hi - lo
        mid = (lo + 1 + hi) / 2
        weights.append(mid**-exponent)
        counts.append(n)
    w = np.concatenate(weights)
    c = np.concatenate(counts)
    p = w / float((w * c).sum())
    return float((c * _touched(p, draws)).sum())


def _touched(p: np.ndarray, draws: int) -> np.ndarray:
    """``1 - (1 - p)^draws`` per id, through log1p/expm1 so the tiny ``p`` of a long tail stay exact."""
    if not draws:
        return np.zeros_like(p)
    sure = p >= 1.0
    safe = np.where(sure, 0.0, p)
    return np.where(sure, 1.0, -np.expm1(draws * np.log1p(-safe)))


def embedding(
    name: str,
    rows: int,
    dim: int,
    *,
    batch_size: int,
    dtype: str = "float32",
    slots: int = 0,
    lookups_per_example: int = 1,
    zipf: float | None = None,
    frequencies: Sequence[float] | np.ndarray | None = None,
) -> VariableLoad:
    """The load of an embedding table of ``rows x dim``.

    Args:
        slots: optimizer slots of the table's shape kept beside it (Adam: 2, Adagrad: 1).
        lookups_per_example: ids of this table per example (1 for a one-hot feature).
        zipf: id popularity ``p_i ~ i^-zipf`` over all rows (0 is uniform).
        frequencies: measured or histogram id counts instead (one per id that occurs).
            With neither, ids are uniform over the rows.
    """
    if rows < 1 or dim < 1 or batch_size < 1 or slots < 0 or lookups_per_example < 1:
        raise BalanceError(
            f"embedding {name!r}: rows, dim, batch_size, lookups_per_example must be >= 1 and slots >= 0, "
            f"got rows={rows} dim={dim} batch_size={batch_size} lookups={lookups_per_example} slots={slots}"
        )
    size = _dtype_size(dtype, name)
    draws = batch_size * lookups_per_example
    if frequencies is not None:
        unique = expected_unique_rows(frequencies, draws)
    else:
        unique = zipf_unique_rows(rows, zipf or 0.0, draws)
    row_bytes = dim * size
    return VariableLoad(
        name=name,
        shape=(rows, dim),
        dtype=dtype,
        kind="embedding",
        nbytes=rows * row_bytes * (1 + slots),
        traffic=2.0 * min(unique, rows) * row_bytes,
    )


def dense(name: str, shape: Sequence[int], *, dtype: str = "float32", slots: int = 0) -> VariableLoad:
    """A dense weight: pulled whole and its gradient pushed whole every step."""
    n = math.prod(shape)
    size = _dtype_size(dtype, name)
    return VariableLoad(name, tuple(shape), dtype, "dense", n * size * (1 + slots), 2.0 * n * size)


def state(
    name: str, shape: Sequence[int] = (), *, dtype: str = "int64", traffic: float | None = None
) -> VariableLoad:
    """A counter or position (global_step): read and incremented every step, never split."""
    n = math.prod(shape)
    size = _dtype_size(dtype, name)
    return VariableLoad(
        name, tuple(shape), dtype, "state", n * size, 2.0 * n * size if traffic is None else traffic
    )


def from_variable_infos(infos: Iterable[Any]) -> list[VariableLoad]:
    """Whole variables from ``kubeai_train.tf.VariableInfo`` entries (duck-typed: no TF import).

    Shards of one partitioned variable (same ``group``, names ``<group>/part_N``) are merged back
    into one variable: the planner decides the cut itself. Order follows first appearance.

    Raises:
        BalanceError: an entry lacks a field or its shards disagree on the trailing dims.
    """
    merged: dict[str, dict[str, Any]] = {}
    for info in infos:
        try:
            name, shape, dtype = info.name, tuple(info.shape), info.dtype
            nbytes, traffic, kind = info.nbytes, float(info.traffic), info.kind
        except AttributeError as e:
            raise BalanceError(
                f"not a VariableInfo (needs name, shape, dtype, nbytes, traffic, kind): {info!r:.80}"
            ) from e
        group = getattr(info, "group", "") or name
        part = name != group and name.startswith(group + "/part_")
        key = group if part else name
        m = merged.get(key)
        if m is None:
            merged[key] = {
                "shape": list(shape),
                "dtype": dtype,
                "nbytes": nbytes,
                "traffic": traffic,
                "kind": kind,
            }
            continue
        if not part or tuple(m["shape"][1:]) != shape[1:]:
            raise BalanceError(
                f"variable {key!r} appears twice in the snapshot with shapes {m['shape']} and {list(shape)}"
            )
        m["shape"][0] += shape[0] if shape else 1
        m["nbytes"] += nbytes
        m["traffic"] += traffic
    return [
        VariableLoad(k, tuple(m["shape"]), m["dtype"], m["kind"], m["nbytes"], m["traffic"])
        for k, m in merged.items()
    ]
