"""Contracts of the TF2 coordinator mode: the tf.Module model a user writes and the mode's options.

The coordinator mode (``kubeai_train.tf.coordinator``) trains with ParameterServerStrategy and a
ClusterCoordinator on the chief. It shares :class:`~kubeai_train.tf.types.TrainConfig`, the
placement-policy contract and the errors with the between-graph mode; what differs is the model
(TF2: a ``tf.Module`` built once under the strategy's scope, not ``get_variable`` calls in a
graph) and where input is read (:class:`CoordinatorOptions`). Nothing here imports TensorFlow.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubeai_train.tf.types import TrainError

__all__ = ["INPUT_MODES", "NATIVE_FORMATS", "CoordinatorOptions", "ModuleModel"]

#: ``"chief"``: ``kubeai_train.data`` reads on the chief and every batch travels to the worker with
#: its step; ``"workers"``: ``tf.data`` file readers (TFRecord / CSV) run on the workers themselves.
INPUT_MODES = ("chief", "workers")
NATIVE_FORMATS = ("tfrecord", "csv")


class ModuleModel(ABC):
    """What a user writes for the coordinator mode: raw columns in, logits out, as a ``tf.Module``.

    ``build`` is called once under the strategy's scope (variables land on the parameter servers,
    placed by the placement policy; tables large enough for the partitioner are sharded); it must
    create every variable (build Keras 3 layers explicitly, e.g. ``layer.build(shape)``) and must
    create them in the same order every time (the placement plan is matched by creation order).
    The returned object is called as ``module(features, training=...)`` with a dict of raw
    ``[batch]`` tensors and returns logits ``[batch]``; it is checkpointed as ``model`` and
    exported (a local copy restored from the checkpoint) with a serving signature on the raw
    features.

    Attributes:
        label: the label column (0/1).
    """

    label: str = "label"

    @abstractmethod
    def raw_features(self) -> Mapping[str, str]:
        """Raw input columns -> ``"string"`` or ``"float32"``; the serving signature takes these."""

    @abstractmethod
    def build(self) -> Any:
        """Create and return the model (a ``tf.Module``, or a Keras 3 layer, callable as above)."""

    def learning_rate(self) -> float:
        """The Adagrad learning rate the trainer's optimizer uses (sparse-aware, slots on the PS)."""
        return 0.05

    def params(self) -> dict[str, Any]:
        """Hyper-parameters recorded in the published lineage."""
        return {}


@dataclass
class CoordinatorOptions:
    """Options of the coordinator mode beyond :class:`~kubeai_train.tf.types.TrainConfig`.

    Attributes:
        input: ``"chief"`` (``kubeai_train.data`` on the chief; every row exactly once, any
            source) or ``"workers"`` (``tf.data`` readers of TFRecord / CSV files on the workers,
            each worker reading its own files; no chief bottleneck).
        native_data: with ``input="workers"``: the files (a directory, glob or list joined by
            commas) in ``native_format``; :func:`kubeai_train.tf.coordinator.write_native` writes
            them from any ``kubeai_train.data`` source.
        native_format: ``"tfrecord"`` (tf.train.Example) or ``"csv"`` (a header line).
        reader_threads: with ``input="chief"``: reader threads on the chief, each reading its own
            part of the data (the data module's exactly-once assignment).
        in_flight: closures queued on the coordinator ahead of the workers (bounds chief memory).
        min_shard_bytes / max_shards: ``MinSizePartitioner``: a variable is sharded over the PS
            in shards of at least this many bytes, at most ``max_shards`` (default: the PS count).
        fixed_shards: use ``FixedShardsPartitioner(fixed_shards)`` instead (every variable whose
            first dimension allows it is cut into this many shards).
        connect_timeout: seconds the chief retries connecting to the cluster (PS restarting).
        done_poll: seconds between a ps / worker process's checks for the chief's done marker.
    """

    input: str = "chief"
    native_data: str | None = None
    native_format: str = "tfrecord"
    reader_threads: int = 2
    in_flight: int = 8
    min_shard_bytes: int = 256 << 10
    max_shards: int | None = None
    fixed_shards: int | None = None
    connect_timeout: float = 120.0
    done_poll: float = 0.5

    def __post_init__(self) -> None:
        if self.input not in INPUT_MODES:
            raise TrainError(f"input must be one of {', '.join(INPUT_MODES)}, got {self.input!r}")
        if self.native_format not in NATIVE_FORMATS:
            raise TrainError(
                f"native_format must be one of {', '.join(NATIVE_FORMATS)}, got {self.native_format!r}"
            )
        if self.input == "workers" and not self.native_data:
            raise TrainError(
                "input='workers' needs native_data: TFRecord / CSV files the workers read with tf.data "
                "(write them with kubeai_train.tf.coordinator.write_native)"
            )
        for name in ("reader_threads", "in_flight", "min_shard_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TrainError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("max_shards", "fixed_shards"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise TrainError(f"{name} must be an integer >= 1 or None, got {value!r}")
        for name in ("connect_timeout", "done_poll"):
            if getattr(self, name) <= 0:
                raise TrainError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
