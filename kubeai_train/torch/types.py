"""Contracts of the torch trainer: its errors, configuration and the retryable exit code.

Everything a caller configures is a typed dataclass validated in ``__post_init__``; every error
raised on purpose derives from :class:`TorchTrainError` and pickles (errors cross processes
through the launcher's logs and DataLoader workers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "RETRYABLE_EXIT_CODE",
    "STRAGGLER_MODES",
    "AdaptiveBatching",
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


#: What ``TrainConfig.straggler`` accepts.
STRAGGLER_MODES = ("none", "adaptive", "backup")


@dataclass(frozen=True)
class AdaptiveBatching:
    """How ``straggler="adaptive"`` sizes each rank's local batch.

    The reader's ``batch_size`` is the local batch at equal shares, as without adaptive
    batches, so the global batch stays ``world x batch_size`` rows while the shares follow the
    ranks' measured speed. A share is a whole number (at least one) of *micro-batches* of
    ``batch_size / micro_batches`` rows, cut from the reader's batches by the trainer.

    Attributes:
        micro_batches: micro-batches per rank at equal shares (the resolution of a re-plan:
            with 8, a share moves in steps of 1/8 of the equal local batch).
        replan_every: steps between re-plans (R).
        hysteresis: adopt a new plan only when it predicts a step at least this fraction shorter.
        smoothing: weight of the newest step in a rank's speed (exponential average, (0, 1]).
        slow_factor: a rank is slow when its compute time per row exceeds this many times the
            median of the others' (k, > 1) ...
        slow_steps: ... for this many consecutive steps (m); as many normal steps clear it.
    """

    micro_batches: int = 8
    replan_every: int = 10
    hysteresis: float = 0.05
    smoothing: float = 0.5
    slow_factor: float = 1.5
    slow_steps: int = 2

    def __post_init__(self) -> None:
        _positive_int("adaptive.micro_batches", self.micro_batches)
        _positive_int("adaptive.replan_every", self.replan_every)
        _positive_int("adaptive.slow_steps", self.slow_steps)
        if (
            isinstance(self.hysteresis, bool)
            or not isinstance(self.hysteresis, (int, float))
            or not (0 <= self.hysteresis < 1)
        ):
            raise ConfigError(f"adaptive.hysteresis must be a fraction in [0, 1), got {self.hysteresis!r}")
        if (
            isinstance(self.smoothing, bool)
            or not isinstance(self.smoothing, (int, float))
            or not (0 < self.smoothing <= 1)
        ):
            raise ConfigError(f"adaptive.smoothing must be in (0, 1], got {self.smoothing!r}")
        _positive_float("adaptive.slow_factor", self.slow_factor)
        if self.slow_factor <= 1:
            raise ConfigError(
                f"adaptive.slow_factor must be > 1 (times the median), got {self.slow_factor!r}"
            )


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
        straggler: ``"none"`` (every rank trains one reader batch per step), ``"adaptive"``
            (local batches follow measured speed, slow ranks are detected and reported; see
            :class:`AdaptiveBatching` and :mod:`kubeai_train.torch.adaptive`) or ``"backup"``
            (up to ``backup_workers`` ranks flagged slow sit steps out, taking no batch; see
            :mod:`kubeai_train.torch.backup`).
        adaptive: the settings of ``straggler="adaptive"``; its ``slow_factor`` and
            ``slow_steps`` are also the detector of ``straggler="backup"``.
        backup_workers: with ``straggler="backup"``, how many flagged ranks may sit a step out
            (``b``, 1 <= b < world; see :mod:`kubeai_train.torch.backup`).
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
    straggler: str = "none"
    adaptive: AdaptiveBatching = field(default_factory=AdaptiveBatching)
    backup_workers: int = 1

    def __post_init__(self) -> None:
        _positive_float("dense_lr", self.dense_lr)
        _positive_float("sparse_lr", self.sparse_lr)
        _positive_int("checkpoint_every", self.checkpoint_every)
        _positive_int("keep_checkpoints", self.keep_checkpoints)
        _positive_int("log_every", self.log_every)
        _positive_int("num_workers", self.num_workers, minimum=0)
        if self.max_steps is not None:
            _positive_int("max_steps", self.max_steps)
        if self.straggler not in STRAGGLER_MODES:
            raise ConfigError(
                f"straggler must be one of {', '.join(STRAGGLER_MODES)}, got {self.straggler!r}"
            )
        _positive_int("backup_workers", self.backup_workers)
        if not isinstance(self.adaptive, AdaptiveBatching):
            raise ConfigError(
                f"adaptive must be an AdaptiveBatching, got {type(self.adaptive).__name__}; "
                "build it with kubeai_train.torch.AdaptiveBatching(...)"
            )
