"""CTR feature definitions: which columns, how strings become embedding rows, how floats are scaled.

One :class:`CTRFeatures` object describes the model's input (the Criteo schema by default)
and owns the only preprocessing done outside the model:

* **categoricals** -> ``ids``, int64 ``[batch, n_categorical]``: a null becomes row 0 of its
  feature; a value ``v`` of column ``C`` becomes ``1 + fnv1a64("C=" + v) % (buckets - 1)``, where
  ``fnv1a64`` is 64-bit FNV-1a over the Unicode code points of the string (for ASCII, the same
  as over its UTF-8 bytes). The feature name in the key keeps equal strings of two columns apart.
* **dense** -> ``dense``, float32 ``[batch, n_dense]``: the raw values, NaN for null. The model
  itself does the scaling (NaN -> 0, then ``sign(x) * log1p(|x|)``), so the exported program
  takes raw floats and nothing about scaling can drift between training and serving.
* **label** -> ``label``, float32 ``[batch]``.

A serving system therefore reimplements only the hash above; :meth:`CTRFeatures.to_dict`
(stored in the exported model's metadata) holds everything it needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kubeai_train.torch.types import ConfigError

__all__ = ["CATEGORICAL", "DENSE", "LABEL", "CTRFeatures", "fnv1a64", "hash_column"]

LABEL = "label"
DENSE = tuple(f"I{i}" for i in range(1, 14))
CATEGORICAL = tuple(f"C{i}" for i in range(1, 27))
HASH_NAME = "fnv1a64-codepoints"

_FNV_OFFSET = 14695981039346656037
_FNV_PRIME = 1099511628211
_MASK64 = (1 << 64) - 1


def fnv1a64(text: str, h: int = _FNV_OFFSET) -> int:
    """64-bit FNV-1a over the code points of ``text``, continuing from state ``h`` (the
    reference implementation; :func:`hash_column` is the vectorised one)."""
    for ch in text:
        h = ((h ^ ord(ch)) * _FNV_PRIME) & _MASK64
    return h


def _as_codepoints(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(null mask, uint32 code points [n, width]) of a column of strings / bytes / None."""
    if values.dtype.kind == "U":
        nulls = np.zeros(len(values), dtype=bool)
        text = values
    elif values.dtype.kind == "S":
        nulls = np.zeros(len(values), dtype=bool)
        text = values.astype("U")  # bytes -> str by code point = byte (latin-1 like); ASCII unchanged
    else:
        obj = values.astype(object, copy=False)
        nulls = np.asarray(obj == None)  # noqa: E711 - elementwise on an object array
        filled = np.where(nulls, "", obj)
        sample = next((v for v in filled if v), "")
        if isinstance(sample, bytes):
            filled = np.array(
                [v.decode("utf-8") if isinstance(v, bytes) else v for v in filled], dtype=object
            )
        text = filled.astype("U")
    if text.dtype.itemsize == 0:
        return nulls, np.zeros((len(text), 0), dtype=np.uint32)
    width = text.dtype.itemsize // 4
    return nulls, np.ascontiguousarray(text).view(np.uint32).reshape(len(text), width)


def hash_column(values: np.ndarray, name: str, buckets: int) -> np.ndarray:
    """Map one categorical column to row ids in ``[0, buckets)`` (0 = null), int64.

    Equal to ``[0 if v is None else 1 + fnv1a64(f"{name}={v}") % (buckets - 1) for v in values]``.
    Strings are read up to their first NUL character (numpy's fixed-width strings pad with NUL).
    """
    if buckets < 2:
        raise ConfigError(f"buckets of {name} must be >= 2 (row 0 is the null row), got {buckets}")
    nulls, cps = _as_codepoints(np.asarray(values))
    h = np.full(len(nulls), fnv1a64(f"{name}="), dtype=np.uint64)
    prime = np.uint64(_FNV_PRIME)
    live = np.ones(len(nulls), dtype=bool)
    with np.errstate(over="ignore"):
        for j in range(cps.shape[1]):
            c = cps[:, j]
            live &= c != 0
            if not live.any():
                break
            h = np.where(live, (h ^ c.astype(np.uint64)) * prime, h)
    ids = (h % np.uint64(buckets - 1)).astype(np.int64) + 1
    ids[nulls] = 0
    return ids


@dataclass(frozen=True)
class CTRFeatures:
    """The model's input columns and the hashing of categoricals (see the module docstring).

    Attributes:
        dense: float columns, in model order.
        categorical: string columns, in model order.
        label: the 0/1 label column.
        buckets: embedding rows per categorical, one int for all or a mapping by column
            (row 0 of each is the null row).
    """

    dense: tuple[str, ...] = DENSE
    categorical: tuple[str, ...] = CATEGORICAL
    label: str = LABEL
    buckets: int | Mapping[str, int] = field(default=1 << 16, compare=False)
    _sizes: tuple[int, ...] = field(init=False, repr=False)  # equality is by resolved sizes

    def __post_init__(self) -> None:
        object.__setattr__(self, "dense", tuple(self.dense))
        object.__setattr__(self, "categorical", tuple(self.categorical))
        names = [*self.dense, *self.categorical, self.label]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"feature columns must be distinct, {dup} appear twice")
        if not self.categorical and not self.dense:
            raise ConfigError("CTRFeatures needs at least one dense or categorical column")
        if isinstance(self.buckets, Mapping):
            missing = [c for c in self.categorical if c not in self.buckets]
            if missing:
                raise ConfigError(f"buckets has no entry for {missing}: give one per categorical column")
            sizes = tuple(self.buckets[c] for c in self.categorical)
        else:
            sizes = tuple(self.buckets for _ in self.categorical)
        for c, s in zip(self.categorical, sizes, strict=True):
            if not isinstance(s, int) or isinstance(s, bool) or s < 2:
                raise ConfigError(f"buckets of {c} must be an integer >= 2, got {s!r}")
        object.__setattr__(self, "_sizes", sizes)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Embedding rows of each categorical column, in model order."""
        return self._sizes

    @property
    def columns(self) -> list[str]:
        """Columns to read: label, dense, categorical."""
        return [self.label, *self.dense, *self.categorical]

    def transform(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A batch of raw columns -> ``{"ids", "dense", "label"}`` numpy arrays (see module doc).

        Raises:
            ConfigError: a column is missing from the batch (names it and what the batch has).
        """
        missing = [c for c in self.columns if c not in batch]
        if missing:
            raise ConfigError(
                f"batch lacks columns {missing}; it has {sorted(batch)}: read them with columns=features.columns"
            )
        n = len(batch[self.label])
        if self.categorical:
            ids = np.stack(
                [hash_column(batch[c], c, s) for c, s in zip(self.categorical, self.sizes, strict=True)],
                axis=1,
            )
        else:
            ids = np.zeros((n, 0), dtype=np.int64)
        if self.dense:
            dense = np.stack([np.asarray(batch[c], dtype=np.float32) for c in self.dense], axis=1)
        else:
            dense = np.zeros((n, 0), dtype=np.float32)
        label = np.asarray(batch[self.label], dtype=np.float32)
        return {"ids": ids, "dense": dense, "label": label}

    def to_dict(self) -> dict[str, Any]:
        """JSON form, stored with an exported model so serving can preprocess without this code."""
        return {
            "dense": list(self.dense),
            "categorical": list(self.categorical),
            "label": self.label,
            "buckets": dict(zip(self.categorical, self.sizes, strict=True)),
            "hash": HASH_NAME,
            "ids": "int64 [batch, n_categorical]: 0 for null, else 1 + fnv1a64(f'{column}={value}') % (buckets - 1)",
            "dense_input": "float32 [batch, n_dense]: raw values, NaN for null (scaling is inside the model)",
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CTRFeatures:
        return cls(
            dense=tuple(d["dense"]),
            categorical=tuple(d["categorical"]),
            label=str(d["label"]),
            buckets=dict(d["buckets"]),
        )
