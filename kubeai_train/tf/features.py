"""Feature transforms defined once and shared by training and serving.

A model sees raw columns as they are in the data (strings and floats, nulls as ``""`` / NaN);
the transforms here turn them into embedding row ids and normalised dense values inside the
TensorFlow graph, so the exported SavedModel takes the same raw features and needs no
preprocessing code at serving time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from kubeai_train.tf.types import TrainError

__all__ = ["CRITEO_CATEGORICAL", "CRITEO_DENSE", "CtrFeatures", "partitioner"]

CRITEO_DENSE = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CATEGORICAL = tuple(f"C{i}" for i in range(1, 27))


def partitioner(num_ps: int) -> Any:
    """Shard a table over ``num_ps`` parameter servers (contiguous row ranges), or None for one PS."""
    return tf.compat.v1.fixed_size_partitioner(num_ps) if num_ps > 1 else None


@dataclass(frozen=True)
class CtrFeatures:
    """Categorical columns hashed into one shared embedding table, dense columns log-normalised.

    Attributes:
        categorical: string columns; column j's values hash into rows ``[j*B, (j+1)*B)``.
        dense: float columns; each becomes ``log1p(max(x, 0))`` plus a 0/1 missing indicator.
        hash_buckets: ``B``, the rows per categorical column.
    """

    categorical: Sequence[str] = CRITEO_CATEGORICAL
    dense: Sequence[str] = CRITEO_DENSE
    hash_buckets: int = 10000

    def __post_init__(self) -> None:
        if self.hash_buckets < 1:
            raise TrainError(f"hash_buckets must be >= 1, got {self.hash_buckets}")
        if not self.categorical and not self.dense:
            raise TrainError("CtrFeatures needs at least one categorical or dense column")
        overlap = set(self.categorical) & set(self.dense)
        if overlap:
            raise TrainError(f"columns {sorted(overlap)} are listed as both categorical and dense")

    @property
    def table_rows(self) -> int:
        return len(self.categorical) * self.hash_buckets

    @property
    def dense_width(self) -> int:
        return 2 * len(self.dense)

    def raw_features(self) -> dict[str, str]:
        out = dict.fromkeys(self.categorical, "string")
        out.update(dict.fromkeys(self.dense, "float32"))
        return out

    def transform(self, features: Mapping[str, Any]) -> tuple[Any, Any]:
        """Raw ``[batch]`` tensors -> (dense ``[batch, dense_width]`` float32, ids ``[batch, n_cat]`` int64)."""
        ids = None
        if self.categorical:
            cols = [
                tf.strings.to_hash_bucket_fast(tf.reshape(features[c], [-1]), self.hash_buckets)
                + j * self.hash_buckets
                for j, c in enumerate(self.categorical)
            ]
            ids = tf.stack(cols, axis=1)
        dense = None
        if self.dense:
            parts = []
            for c in self.dense:
                x = tf.cast(tf.reshape(features[c], [-1]), tf.float32)
                missing = tf.math.is_nan(x)
                value = tf.math.log1p(tf.maximum(tf.where(missing, tf.zeros_like(x), x), 0.0))
                parts += [value, tf.cast(missing, tf.float32)]
            dense = tf.stack(parts, axis=1)
        return dense, ids
