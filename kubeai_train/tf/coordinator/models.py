"""DeepFM as a ``tf.Module`` for the coordinator mode (Keras 3 ``Dense`` layers for the MLP).

The same model as the between-graph :class:`~kubeai_train.tf.models.DeepFM` (first-order
weights + FM pairwise term + an MLP over the field embeddings and dense features), on the same
:class:`~kubeai_train.tf.features.CtrFeatures` transforms, written the TF2 way: variables are
created once in ``build`` (under ParameterServerStrategy they land on the PS, the two embedding
tables sharded by the partitioner), ``__call__`` takes raw feature tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import keras
import tensorflow as tf

from kubeai_train.tf.coordinator.types import ModuleModel
from kubeai_train.tf.features import CtrFeatures
from kubeai_train.tf.models import DeepFMBase

__all__ = ["DeepFMModule", "DeepFMModuleModel"]


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
