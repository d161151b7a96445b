"""DeepFM as a ``tf.Module`` for the coordinator mode (Keras 3 ``Dense`` layers for the MLP).

The same model as the between-graph :class:`~kubeai_train.tf.models.DeepFM` (first-order
weights + FM pairwise term + an MLP over the field embeddings and dense features), on the same
:class:`~kubeai_train.tf.features.CtrFeatures` transforms, written the TF2 way: variables are
created once in ``build`` (under ParameterServerStrategy they land on the PS, the two embedding
tables sharded by the partitioner), ``__call__`` takes raw feature tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import tensorflow as tf

from kubeai_train.tf.coordinator.types import ModuleModel
from kubeai_train.tf.features import CtrFeatures
from kubeai_train.tf.models import DeepFMBase
from kubeai_train.tf.types import TrainError

__all__ = ["DeepFMModule", "DeepFMModuleModel", "TablesModel", "TablesModule"]


class DeepFMModule(tf.Module):
    """The trainable module; call it with a dict of raw ``[batch]`` tensors for logits ``[batch]``."""

    def __init__(self, features: CtrFeatures, embedding_dim: int, hidden: Sequence[int]) -> None:
        super().__init__(name="deepfm")
        self.features = features
        self.embedding_dim = embedding_dim
        rows, k = features.table_rows, embedding_dim
        self.bias = tf.Variable(0.0, name="bias")
        self.emb_w = None
        self.emb_v = None
        if features.categorical:
            self.emb_w = tf.Variable(
                lambda: tf.zeros([rows, 1]), shape=[rows, 1], dtype=tf.float32, name="emb_w"
            )
            self.emb_v = tf.Variable(
                lambda: tf.random.truncated_normal([rows, k], stddev=0.01),
                shape=[rows, k],
                dtype=tf.float32,
                name="emb_v",
            )
        self.dense_w = None
        if features.dense:
            self.dense_w = tf.Variable(tf.zeros([features.dense_width, 1]), name="dense_w")
        width = len(features.categorical) * k + (features.dense_width if features.dense else 0)
        self.mlp = []
        for i, units in enumerate(hidden):
            layer = keras.layers.Dense(units, activation="relu", name=f"mlp_{i}")
            layer.build((None, width))
            self.mlp.append(layer)
            width = units
        self.out = keras.layers.Dense(1, use_bias=False, name="mlp_out")
        self.out.build((None, width))

    def __call__(self, features: Mapping[str, Any], training: bool = False) -> Any:
        dense, ids = self.features.transform(features)
        logit = self.bias
        deep_in = []
        if ids is not None:
            w = tf.nn.embedding_lookup(self.emb_w, ids)  # [B, F, 1]
            v = tf.nn.embedding_lookup(self.emb_v, ids)  # [B, F, k]
            logit = logit + tf.reduce_sum(w, axis=[1, 2])
            sum_sq = tf.square(tf.reduce_sum(v, axis=1))
            sq_sum = tf.reduce_sum(tf.square(v), axis=1)
            logit = logit + 0.5 * tf.reduce_sum(sum_sq - sq_sum, axis=1)
            deep_in.append(tf.reshape(v, [-1, len(self.features.categorical) * self.embedding_dim]))
        if dense is not None:
            logit = logit + tf.squeeze(tf.matmul(dense, self.dense_w), axis=1)
            deep_in.append(dense)
        h = tf.concat(deep_in, axis=1)
        for layer in self.mlp:
            h = layer(h)
        return logit + tf.squeeze(self.out(h), axis=1)


class DeepFMModuleModel(DeepFMBase, ModuleModel):
    """DeepFM for :func:`kubeai_train.tf.coordinator.run`, with ``ktf.DeepFM``'s constructor.

    Constructor arguments: see :class:`~kubeai_train.tf.models.DeepFMBase` (``features``,
    ``embedding_dim``, ``hidden``, ``learning_rate``, ``label``; one ``DeepFMParams`` for both).
    """

    def build(self) -> DeepFMModule:
        return DeepFMModule(self.features, self.embedding_dim, self.hidden)

    def learning_rate(self) -> float:
        return self.hparams.learning_rate


class TablesModule(tf.Module):
    """One embedding table per categorical column, each its own size, an MLP on top.

    Variables, in creation order: ``emb_<column>`` ``[rows, dim]`` per table, then ``mlp_w<i>`` /
    ``mlp_b<i>`` per hidden layer and ``mlp_out``; ids are the column's string hashed into its
    table's rows (``tf.strings.to_hash_bucket_fast``).
    """

    def __init__(
        self, tables: Mapping[str, int], dim: int, hidden: Sequence[int], dense: Sequence[str]
    ) -> None:
        super().__init__(name="tables")
        self.columns = list(tables)
        self.rows = [int(r) for r in tables.values()]
        self.dense = list(dense)
        self.emb = [
            tf.Variable(
                lambda r=r: tf.random.truncated_normal([r, dim], stddev=0.05),
                shape=[r, dim],
                dtype=tf.float32,
                name=f"emb_{c}",
            )
            for c, r in zip(self.columns, self.rows, strict=True)
        ]
        width = dim * len(self.columns) + len(self.dense)
        self.weights = []
        for i, units in enumerate([*hidden, 1]):
            scale = 1.0 / math.sqrt(width)
            w = tf.Variable(
                lambda width=width, units=units, scale=scale: tf.random.normal([width, units], stddev=scale),
                shape=[width, units],
                dtype=tf.float32,
                name="mlp_out" if i == len(hidden) else f"mlp_w{i}",
            )
            b = tf.Variable(tf.zeros([units]), name=f"mlp_b{i}")
            self.weights.append((w, b))
            width = units

    def __call__(self, features: Mapping[str, Any], training: bool = False) -> Any:
        parts = []
        for c, rows, table in zip(self.columns, self.rows, self.emb, strict=True):
            ids = tf.strings.to_hash_bucket_fast(features[c], rows)
            parts.append(tf.nn.embedding_lookup(table, ids))
        for d in self.dense:
            x = features[d]
            x = tf.where(tf.math.is_finite(x), tf.maximum(x, 0.0), 0.0)  # nulls arrive as NaN
            parts.append(tf.math.log1p(x)[:, None])
        h = tf.concat(parts, axis=1)
        for i, (w, b) in enumerate(self.weights):
            h = tf.matmul(h, w) + b
            if i < len(self.weights) - 1:
                h = tf.nn.relu(h)
        return tf.squeeze(h, axis=1)


class TablesModel(ModuleModel):
    """:class:`TablesModule` for :func:`kubeai_train.tf.coordinator.run`: tables of unequal sizes,
    the shape where round-robin placement makes a hot parameter server.

    Args:
        tables: categorical column -> rows of its table (e.g. ``{"C1": 8000, "C2": 3000}``).
        dim: embedding width.
        hidden: MLP widths.
        dense: float columns fed to the MLP (``log1p``).
        learning_rate: Adagrad's step size.
    """

    def __init__(
        self,
        tables: Mapping[str, int],
        dim: int = 8,
        hidden: Sequence[int] = (64,),
        dense: Sequence[str] = ("I1",),
        learning_rate: float = 0.05,
    ) -> None:
        if not tables or any(int(r) < 1 for r in tables.values()):
            raise TrainError(f"tables must map columns to row counts >= 1, got {dict(tables)!r}")
        self.tables = dict(tables)
        self.dim = dim
        self.hidden = tuple(hidden)
        self.dense = tuple(dense)
        self.lr = learning_rate

    def raw_features(self) -> Mapping[str, str]:
        return {**dict.fromkeys(self.tables, "string"), **dict.fromkeys(self.dense, "float32")}

    def build(self) -> TablesModule:
        return TablesModule(self.tables, self.dim, self.hidden, self.dense)

    def learning_rate(self) -> float:
        return self.lr

    def params(self) -> dict[str, Any]:
        return {"tables": self.tables, "dim": self.dim, "hidden": list(self.hidden)}
