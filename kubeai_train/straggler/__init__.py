"""Slow-worker mitigation for synchronous training: pure policies, fed by per-step timings.

A trainer reports what each worker did in a step (:class:`WorkerTiming`: rows, compute time
apart from waiting); :class:`SlowWorkerDetector` flags a worker slower than ``k`` x the median
per row for ``m`` steps (and clears it when it recovers); :class:`AdaptiveBatchPolicy` keeps the
global batch fixed and re-plans the local batches in proportion to measured speed, with
:func:`loss_weight` keeping the averaged gradient the global-batch mean; :class:`BackupWorkers`
decides which gradients a step aggregates when ``b`` may be dropped (its bias is in
:mod:`.backup`). No TensorFlow or torch here: the trainers apply the decisions.
"""

from kubeai_train.straggler.adaptive import (
    AdaptiveBatchPolicy,
    capacity_bound,
    equal_batches,
    loss_weight,
    plan_local_batches,
    step_time,
)
from kubeai_train.straggler.backup import BackupWorkers, sample_shares
from kubeai_train.straggler.detect import SlowWorkerDetector
from kubeai_train.straggler.types import BatchPlan, Detection, StragglerError, WorkerTiming

__all__ = [
    "AdaptiveBatchPolicy",
    "BackupWorkers",
    "BatchPlan",
    "Detection",
    "SlowWorkerDetector",
    "StragglerError",
    "WorkerTiming",
    "capacity_bound",
    "equal_batches",
    "loss_weight",
    "plan_local_batches",
    "sample_shares",
    "step_time",
]
