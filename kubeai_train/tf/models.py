"""Ready-made CTR models written against :class:`kubeai_train.tf.Model` (DeepFM).

They double as the reference for writing one: raw features in, ``CtrFeatures.transform`` in the
graph, embedding tables created with ``partitioner(num_ps)`` so they shard over the PS.

:class:`DeepFMParams` holds DeepFM's hyper-parameters and their validation once, for this
between-graph ``DeepFM`` and the coordinator mode's ``DeepFMModuleModel`` alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import tensorflow as tf

from kubeai_train.tf.features import CtrFeatures, partitioner
from kubeai_train.tf.types import Model, TrainError

__all__ = ["DeepFM", "DeepFMBase", "DeepFMParams"]


@dataclass(frozen=True)
class DeepFMParams:
    """DeepFM's hyper-parameters, validated once, shared by both modes' DeepFM models.

    Args:
        features: the feature transforms (default: the Criteo columns, 10k buckets per column).
        embedding_dim: FM / deep embedding width (>= 1).
        hidden: MLP layer widths.
        learning_rate: Adagrad learning rate (> 0).
        label: the label column (0/1).

    Raises:
        TrainError: an embedding_dim or learning_rate out of range.
    """

    features: CtrFeatures = field(default_factory=CtrFeatures)
    embedding_dim: int = 8
    hidden: tuple[int, ...] = (64, 32)
    learning_rate: float = 0.05
    label: str = "label"

    def __post_init__(self) -> None:
        if self.embedding_dim < 1:
            raise TrainError(f"embedding_dim must be >= 1, got {self.embedding_dim}")
        if self.learning_rate <= 0:
            raise TrainError(f"learning_rate must be > 0, got {self.learning_rate}")
        object.__setattr__(self, "hidden", tuple(self.hidden))

    @classmethod
    def of(
        cls,
        features: CtrFeatures | None,
        embedding_dim: int,
        hidden: Sequence[int],
        learning_rate: float,
        label: str,
    ) -> DeepFMParams:
        """The parameters of a model constructor's arguments (``features=None``: the default)."""
        return cls(features or CtrFeatures(), embedding_dim, tuple(hidden), learning_rate, label)

    def params(self) -> dict[str, Any]:
        """The hyper-parameters recorded in the published lineage."""
        return {
            "model": "DeepFM",
            "embedding_dim": self.embedding_dim,
            "hidden": list(self.hidden),
            "learning_rate": self.learning_rate,
            "hash_buckets": self.features.hash_buckets,
            "categorical": list(self.features.categorical),
            "dense": list(self.features.dense),
        }


class DeepFMBase:
    """Constructor, ``raw_features`` and ``params`` of both modes' DeepFM models (one DeepFMParams).

    Args:
        features: the feature transforms (default: the Criteo columns, 10k buckets per column).
        embedding_dim: FM / deep embedding width.
        hidden: MLP layer widths.
        learning_rate: Adagrad learning rate.
        label: the label column (0/1).

    Raises:
        TrainError: hyper-parameters out of range (see :class:`DeepFMParams`).
    """

    def __init__(
        self,
        features: CtrFeatures | None = None,
        embedding_dim: int = DeepFMParams.embedding_dim,
        hidden: Sequence[int] = DeepFMParams.hidden,
        learning_rate: float = DeepFMParams.learning_rate,
        label: str = DeepFMParams.label,
    ) -> None:
        self.hparams = DeepFMParams.of(features, embedding_dim, hidden, learning_rate, label)
        self.features = self.hparams.features
        self.embedding_dim = self.hparams.embedding_dim
        self.hidden = self.hparams.hidden
        self.label = self.hparams.label

    def raw_features(self) -> dict[str, str]:
        return self.features.raw_features()

    def params(self) -> dict[str, Any]:
        return self.hparams.params()


class DeepFM(DeepFMBase, Model):
    """DeepFM (Guo et al. 2017): first-order weights + FM pairwise term + an MLP over the
    field embeddings and the dense features, summed into one logit.

    Constructor arguments: see :class:`DeepFMBase` (``features``, ``embedding_dim``, ``hidden``,
    ``learning_rate``, ``label``).
    """

    @property
    def learning_rate(self) -> float:
        """The Adagrad learning rate."""
        return self.hparams.learning_rate

    def optimizer(self) -> Any:
        return tf.compat.v1.train.AdagradOptimizer(self.learning_rate, initial_accumulator_value=0.1)

    def logits(self, features: Mapping[str, Any], *, num_ps: int, training: bool) -> Any:
        f = self.features
        dense, ids = f.transform(features)
        k = self.embedding_dim
        init = tf.compat.v1.truncated_normal_initializer(stddev=0.01)
        with tf.compat.v1.variable_scope("deepfm"):
            bias = tf.compat.v1.get_variable("bias", [], initializer=tf.compat.v1.zeros_initializer())
            logit = bias
            deep_in = []
            if ids is not None:
                part = partitioner(num_ps)
                emb_w = tf.compat.v1.get_variable(
                    "emb_w", [f.table_rows, 1], initializer=tf.compat.v1.zeros_initializer(), partitioner=part
                )
                emb_v = tf.compat.v1.get_variable(
                    "emb_v", [f.table_rows, k], initializer=init, partitioner=part
                )
                w = tf.compat.v1.nn.embedding_lookup(emb_w, ids, partition_strategy="div")  # [B, F, 1]
                v = tf.compat.v1.nn.embedding_lookup(emb_v, ids, partition_strategy="div")  # [B, F, k]
                logit = logit + tf.reduce_sum(w, axis=[1, 2])
                sum_sq = tf.square(tf.reduce_sum(v, axis=1))
                sq_sum = tf.reduce_sum(tf.square(v), axis=1)
                logit = logit + 0.5 * tf.reduce_sum(sum_sq - sq_sum, axis=1)
                deep_in.append(tf.reshape(v, [-1, len(f.categorical) * k]))
            if dense is not None:
                dense_w = tf.compat.v1.get_variable(
                    "dense_w", [f.dense_width, 1], initializer=tf.compat.v1.zeros_initializer()
                )
                logit = logit + tf.squeeze(tf.matmul(dense, dense_w), axis=1)
                deep_in.append(dense)
            h = tf.concat(deep_in, axis=1)
            width = int(h.shape[1])
            for i, units in enumerate(self.hidden):
                kernel = tf.compat.v1.get_variable(
                    f"mlp_{i}/kernel", [width, units], initializer=tf.compat.v1.glorot_uniform_initializer()
                )
                b = tf.compat.v1.get_variable(
                    f"mlp_{i}/bias", [units], initializer=tf.compat.v1.zeros_initializer()
                )
                h = tf.nn.relu(tf.matmul(h, kernel) + b)
                width = units
            out_k = tf.compat.v1.get_variable(
                "mlp_out/kernel", [width, 1], initializer=tf.compat.v1.glorot_uniform_initializer()
            )
            logit = logit + tf.squeeze(tf.matmul(h, out_k), axis=1)
        return logit
