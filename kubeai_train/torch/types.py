"""Contracts of the torch trainer: its errors, configuration and the retryable exit code.

Everything a caller configures is a typed dataclass validated in ``__post_init__``; every error
raised on purpose derives from :class:`TorchTrainError` and pickles (errors cross processes
through the launcher's logs and DataLoader workers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = [
    "RETRYABLE_EXIT_CODE",
    "CheckpointError",
    "ConfigError",
    "ExportError",
    "PeerFailedError",
    "TorchTrainError",
    "TrainConfig",
]

#: Exit code of a rank that stops because a peer failed (a broken process group). The
#: Kubeflow training-operator's ``restartPolicy: ExitCode`` treats 128-255 as retryable and
#: 1-127 as permanent; 143 is also what SIGTERM gives, which the operator already retries.
RETRYABLE_EXIT_CODE = 143


class TorchTrainError(Exception):
    """Base of the errors ``kubeai_train.torch`` raises on purpose."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(TorchTrainError, ValueError):
    """A configuration value is out of range; the message names it and the allowed range."""


class PeerFailedError(TorchTrainError, RuntimeError):
    """A collective failed or timed out: another rank died or hangs.

    Every surviving rank raises this (a dead peer closes its sockets; a hung one runs into the
    process-group timeout), so the job fails as a whole and the launcher or the operator
    restarts it from the last checkpoint. :func:`kubeai_train.torch.run` turns it into
    :data:`RETRYABLE_EXIT_CODE`.
    """


class CheckpointError(TorchTrainError, ValueError):
    """A checkpoint is missing a part or belongs to another world size; names the path."""


class ExportError(TorchTrainError, ValueError):
    """The model could not be exported, or the exported program disagrees with the live model."""


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _positive_float(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """How :class:`kubeai_train.torch.Trainer` trains.

    Attributes:
        dense_lr: learning rate of the dense optimizer (Adam) for MLPs and other dense params.
        sparse_lr: learning rate of the sparse optimizer (SparseAdam) for ``sparse=True``
            embedding tables.
        checkpoint_dir: where checkpoints go (local path or fsspec URL); None disables them.
        checkpoint_every: write a checkpoint every this many global steps (and at the end).
        keep_checkpoints: how many checkpoints to keep (older ones are deleted by rank 0).
        log_dir: TensorBoard summaries (rank 0); None disables them.
        log_every: log loss / throughput every this many steps on rank 0.
        num_workers: DataLoader worker processes per rank (0 reads in the training process).
        max_steps: stop after this many global steps (None: until the data ends).
    """

    dense_lr: float = 1e-3
    sparse_lr: float = 1e-2
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_dir: str | None = None
    log_every: int = 100
    num_workers: int = 0
    max_steps: int | None = None

    def __post_init__(self) -> None:
        _positive_float("dense_lr", self.dense_lr)
        _positive_float("sparse_lr", self.sparse_lr)
        _positive_int("checkpoint_every", self.checkpoint_every)
        _positive_int("keep_checkpoints", self.keep_checkpoints)
        _positive_int("log_every", self.log_every)
        _positive_int("num_workers", self.num_workers, minimum=0)
        if self.max_steps is not None:
            _positive_int("max_steps", self.max_steps)
