"""Contracts of slow-worker mitigation: what a policy sees (per-step timings of each worker)
and what it decides (flags, local batch sizes, which gradients to aggregate).

Everything here is pure Python: the trainers measure, the policies decide, the trainers apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BatchPlan", "Detection", "StragglerError", "WorkerTiming"]


class StragglerError(ValueError):
    """Bad configuration or input of a straggler policy (the message names the value)."""


@dataclass(frozen=True)
class WorkerTiming:
    """What one worker did in one step.

    Attributes:
        worker: the worker's index (its rank in DDP, its task index in TF).
        rows: rows it processed in the step (its local batch); 0 for a step it sat out (a
            Join shadow step), which policies ignore.
        compute_seconds: time spent on its own work (input, forward, backward, optimizer),
            excluding the time it waited for others (all-reduce, PS round trips beyond its own
            traffic). A slow worker is slow here; a fast worker waiting for it is not.
        wait_seconds: time spent waiting for the others (reported, not used for detection).
    """

    worker: int
    rows: int
    compute_seconds: float
    wait_seconds: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.worker, int) or self.worker < 0:
            raise StragglerError(f"worker must be an integer >= 0, got {self.worker!r}")
        if not isinstance(self.rows, int) or self.rows < 0:
            raise StragglerError(f"rows of worker {self.worker} must be an integer >= 0, got {self.rows!r}")
        if not self.compute_seconds >= 0 or self.compute_seconds == float("inf"):
            raise StragglerError(
                f"compute_seconds of worker {self.worker} must be a finite number >= 0, got {self.compute_seconds!r}"
            )
        if not self.wait_seconds >= 0:
            raise StragglerError(
                f"wait_seconds of worker {self.worker} must be >= 0, got {self.wait_seconds!r}"
            )

    @property
    def seconds_per_row(self) -> float | None:
        """Compute time per row, the speed-independent-of-batch-size figure detection compares;
        None for a step with no rows or no measurable time."""
        if self.rows == 0 or self.compute_seconds <= 0:
            return None
        return self.compute_seconds / self.rows


@dataclass(frozen=True)
class Detection:
    """The detector's view after one step.

    Attributes:
        step: the step observed.
        flagged: workers currently flagged slow.
        new: workers flagged at this step.
        cleared: workers whose flag was cleared at this step.
        ratio: each observed worker's seconds-per-row over the median of the other workers'.
    """

    step: int
    flagged: frozenset[int] = frozenset()
    new: frozenset[int] = frozenset()
    cleared: frozenset[int] = frozenset()
    ratio: dict[int, float] = field(default_factory=dict)

    def describe(self) -> str:
        """One log line, or "" when nothing changed."""
        parts = []
        if self.new:
            parts.append(
                "slow worker(s) "
                + ", ".join(f"{w} ({self.ratio.get(w, float('nan')):.2f}x median)" for w in sorted(self.new))
            )
        if self.cleared:
            parts.append("recovered " + ", ".join(str(w) for w in sorted(self.cleared)))
        return f"step {self.step}: " + "; ".join(parts) if parts else ""


@dataclass(frozen=True)
class BatchPlan:
    """Local batch sizes of one synchronous step: they add up to the global batch.

    Attributes:
        step: the first step the plan applies to.
        sizes: local batch of each worker (index = worker).
        speeds: the rows/s each size was planned from (index = worker).
    """

    step: int
    sizes: tuple[int, ...]
    speeds: tuple[float, ...] = ()

    @property
    def global_batch(self) -> int:
        return sum(self.sizes)

    def loss_weight(self, worker: int) -> float:
        """The factor on ``worker``'s mean loss that makes the replicas' averaged gradient the
        mean gradient over the global batch: ``world x local / global`` (the derivation is in
        :func:`kubeai_train.straggler.adaptive.loss_weight`)."""
        return len(self.sizes) * self.sizes[worker] / self.global_batch
