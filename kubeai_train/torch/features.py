"""CTR feature definitions: which columns, how strings become embedding rows, how floats are scaled.

The definitions follow the TensorFlow trainer's (``kubeai_train.tf.features.CtrFeatures``): the
Criteo columns, ``B`` rows per categorical column in one shared table (column ``j`` owns rows
``[j*B, (j+1)*B)``), and each dense value ``x`` becoming ``log1p(max(x, 0))`` plus a 0/1 missing
indicator. The one difference is the string hash, because each side uses the hash its input
pipeline computes fastest: TF hashes inside the graph (``to_hash_bucket_fast``, FarmHash),
torch lets the reader hash (``kubeai_train.data.read(..., hash_buckets=...)``, vectorised over
Arrow buffers in the DataLoader workers). So:

* **categoricals** -> ``ids``, int64 ``[batch, n_categorical]``:
  ``fnv1a64(utf8(value)) % B`` (64-bit FNV-1a over the UTF-8 bytes), null -> 0, exactly what
  ``data.read(hash_buckets={col: B})`` yields (:meth:`CTRFeatures.read_options` asks for it;
  :func:`hash_column` is the same function for raw strings, e.g. at serving time).
* **dense** -> ``dense``, float32 ``[batch, n_dense]``: the raw values, NaN for null (the reader
  is asked to fill nulls with NaN). The model does the scaling and the missing indicators, so
  the exported program takes raw floats and nothing about scaling can drift.
* **label** -> ``label``, float32 ``[batch]``.

The export ships this transform as a declared, versioned preprocessing step: ``features.json``
(:meth:`CTRFeatures.to_dict`) names it ``{"name": "ctr-fnv1a", "version": 1}`` (:data:`PREPROCESSING`)
with the columns and bucket counts, and :meth:`CTRFeatures.model_inputs` is its one
implementation: the trainer runs it on every batch (whose strings the reader hashed already with
the same ``data.convert.hash_ids``), ``kubeai_train.serving.load_predictor`` runs it on raw
rows, so serving ids are bit-identical to training ids. The version changes whenever the ids a
raw value maps to would change; a loader that does not know a declared version refuses the export.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from kubeai_train.data.convert import hash_ids
from kubeai_train.torch.types import ConfigError

__all__ = ["CATEGORICAL", "DENSE", "HASH_NAME", "LABEL", "PREPROCESSING", "CTRFeatures", "hash_column"]

LABEL = "label"
DENSE = tuple(f"I{i}" for i in range(1, 14))
CATEGORICAL = tuple(f"C{i}" for i in range(1, 27))
HASH_NAME = "fnv1a64-utf8"
DEFAULT_BUCKETS = 10000  # the TF trainer's default rows per categorical column
#: the preprocessing step :meth:`CTRFeatures.model_inputs` implements, as exports declare it
PREPROCESSING: dict[str, Any] = {"name": "ctr-fnv1a", "version": 1}


def hash_column(values: Any, buckets: int) -> np.ndarray:
    """Raw strings (None = null) -> int64 ids ``fnv1a64(utf8(v)) % buckets``, null -> 0.

    The same function ``kubeai_train.data.read(hash_buckets=...)`` applies in the reader.
    """
    if buckets < 1:
        raise ConfigError(f"buckets must be >= 1, got {buckets}")
    arr = (
        values
        if isinstance(values, (pa.Array, pa.ChunkedArray))
        else pa.array(list(values), type=pa.string())
    )
    return hash_ids(arr, buckets, fill=0)


@dataclass(frozen=True)
class CTRFeatures:
    """The model's input columns and how categoricals are hashed (see the module docstring).

    Attributes:
        dense: float columns, in model order.
        categorical: string columns, in model order.
        label: the 0/1 label column.
        buckets: embedding rows per categorical, one int for all (default 10000, as the TF
            trainer) or a mapping by column.
    """

    dense: tuple[str, ...] = DENSE
    categorical: tuple[str, ...] = CATEGORICAL
    label: str = LABEL
    buckets: int | Mapping[str, int] = field(default=DEFAULT_BUCKETS, compare=False)
    _sizes: tuple[int, ...] = field(init=False, repr=False)  # equality is by resolved sizes

    def __post_init__(self) -> None:
        for name in ("dense", "categorical"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ConfigError(f"{name} must be a sequence of column names, got the string {value!r}")
            object.__setattr__(self, name, tuple(value))
        names = [*self.dense, *self.categorical, self.label]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"feature columns must be distinct, {dup} appear twice")
        if not self.categorical or not self.dense:
            raise ConfigError("CTRFeatures needs at least one dense and one categorical column")
        if isinstance(self.buckets, Mapping):
            missing = [c for c in self.categorical if c not in self.buckets]
            if missing:
                raise ConfigError(f"buckets has no entry for {missing}: give one per categorical column")
            sizes = tuple(self.buckets[c] for c in self.categorical)
        else:
            sizes = tuple(self.buckets for _ in self.categorical)
        for c, s in zip(self.categorical, sizes, strict=True):
            if not isinstance(s, int) or isinstance(s, bool) or s < 1:
                raise ConfigError(f"buckets of {c} must be an integer >= 1, got {s!r}")
        object.__setattr__(self, "_sizes", sizes)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Embedding rows of each categorical column, in model order."""
        return self._sizes

    @property
    def columns(self) -> list[str]:
        """Columns to read: label, dense, categorical."""
        return [self.label, *self.dense, *self.categorical]

    def read_options(self) -> dict[str, Any]:
        """Keyword arguments for ``kubeai_train.data.read``: the columns, hashing in the reader,
        NaN for null floats."""
        fill: dict[str, Any] = dict.fromkeys(self.dense, math.nan)
        return {
            "columns": self.columns,
            "hash_buckets": dict(zip(self.categorical, self.sizes, strict=True)),
            "fill_null": fill,
        }

    def model_inputs(self, batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Raw or reader columns -> ``(ids, dense)``, the model's two inputs (see module doc).

        This is the preprocessing step exports declare as :data:`PREPROCESSING`. Categorical
        columns may come hashed by the reader (integers, taken as they are) or as raw strings:
        Arrow string / dictionary arrays (hashed vectorised, null -> 0) or sequences of ``str``
        with None for null (hashed with :func:`hash_column`). Dense columns may be any numeric
        array (Arrow nulls and None become NaN). The label is not needed.

        Raises:
            ConfigError: a feature column is missing (names it and what the batch has).
        """
        missing = [c for c in (*self.dense, *self.categorical) if c not in batch]
        if missing:
            raise ConfigError(
                f"batch lacks columns {missing}; it has {sorted(batch)}: read with **features.read_options()"
            )
        n = len(batch[self.categorical[0]])
        ids = np.empty((n, len(self.categorical)), dtype=np.int64)
        for j, (c, size) in enumerate(zip(self.categorical, self.sizes, strict=True)):
            col = batch[c]
            if isinstance(col, (pa.Array, pa.ChunkedArray)) and not pa.types.is_integer(col.type):
                ids[:, j] = hash_ids(col, size, fill=0)  # no detour through Python strings
                continue
            col = np.asarray(col)
            ids[:, j] = col if col.dtype.kind in "iu" else hash_column(col, size)
        dense = np.stack([_floats(batch[c]) for c in self.dense], axis=1)
        return ids, dense

    def transform(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """A reader batch -> ``{"ids", "dense", "label"}`` numpy arrays: :meth:`model_inputs`
        plus the label.

        Raises:
            ConfigError: a column is missing from the batch (names it and what the batch has).
        """
        missing = [c for c in self.columns if c not in batch]
        if missing:
            raise ConfigError(
                f"batch lacks columns {missing}; it has {sorted(batch)}: read with **features.read_options()"
            )
        ids, dense = self.model_inputs(batch)
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
            "preprocessing": {
                **PREPROCESSING,
                "implementation": "kubeai_train.torch.features.CTRFeatures.model_inputs",
                "categorical": "string; fnv1a64(utf8(value)) % buckets[column]; null -> 0",
                "dense": "number; as is, null -> NaN",
            },
            "ids": "int64 [batch, n_categorical]: fnv1a64(utf8(value)) % buckets[column]; null -> 0",
            "dense_input": "float32 [batch, n_dense]: raw values, NaN for null (scaling is inside the model)",
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CTRFeatures:
        """The features :meth:`to_dict` wrote (files of exports made before ``preprocessing``
        was recorded read the same)."""
        return cls(
            dense=tuple(d["dense"]),
            categorical=tuple(d["categorical"]),
            label=str(d["label"]),
            buckets=dict(d["buckets"]),
        )


def _floats(col: Any) -> np.ndarray:
    """A dense column as float32, nulls (Arrow nulls, None) as NaN."""
    if isinstance(col, (pa.Array, pa.ChunkedArray)):
        col = col.to_numpy(zero_copy_only=False)  # nulls of a numeric array come out as NaN
    arr = np.asarray(col)
    if arr.dtype == object:
        arr = np.array([math.nan if v is None else v for v in arr], dtype=np.float32)
    return arr.astype(np.float32, copy=False)
