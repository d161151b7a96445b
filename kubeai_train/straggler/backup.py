"""Backup workers: a synchronous step aggregates the first ``N - b`` gradients to arrive and drops
the rest (TF's ``SyncReplicasOptimizer(replicas_to_aggregate=N - b)``; the trainers'
``backup_workers=b``).

The bias, written down: a dropped gradient's rows are not learnt from in that step, and the
dropped ones are the slow workers' -- every step while a worker is slow. Its data is therefore
under-sampled by the share of steps it loses, and the global step is an average over ``N - b``
local batches, i.e. a smaller effective batch. With i.i.d. shares the estimate stays unbiased
but noisier; with shares that differ (a worker's data is a different day, region or user
segment) the model leans toward the fast workers' data. Adaptive batches
(:mod:`.adaptive`) keep every row and every worker; prefer them when shares are not i.i.d.

The DDP form (:meth:`BackupWorkers.sit_out`). DDP's gradient all-reduce is collective: once a
slow rank has computed, its gradient is in the sum, and leaving it out would not make the step
shorter. So the ranks decide *before* a step, from the previous steps' measured speed, which of
them sit it out: those take no batch and join the all-reduce with a zero gradient, and the
others' losses are scaled so the average is the mean over the kept ranks' rows. No row is lost
(unlike TF, where the dropped gradient's rows were read and are gone): the rows a sitting rank
did not take stay in its reader, for a later step or -- with dynamic assignment -- for the
other ranks. Only ranks the detector flags sit out, never "always the ``b`` slowest" as
SyncReplicasOptimizer does: there every replica computes and the step ends at the
``N - b``-th arrival, so dropping costs no compute; in DDP a rank that sits out idles, and
idling the ``b`` slowest of equally fast ranks would cut throughput by ``b / N`` for nothing.
Its bias: each step averages ``N - s`` local batches (``s`` sitting out), a smaller effective
batch while a rank is slow; with a static split the slow rank's rows are all trained on, but
later (after the fast ranks' shards, when it trains alone); with dynamic assignment the fast
ranks read what it did not, so a slow rank's data share shrinks -- the same lean toward the
fast ranks' data as above when shares are not i.i.d., but every row of the epoch still counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from kubeai_train.straggler.types import StragglerError

__all__ = ["BackupWorkers", "sample_shares"]


class BackupWorkers:
    """Which replicas' gradients a step aggregates when ``backup`` of ``world`` may be dropped.

    Args:
        world: number of replicas.
        backup: how many of them a step may drop (0 <= backup < world).
    """

    def __init__(self, world: int, backup: int) -> None:
        if not isinstance(world, int) or isinstance(world, bool) or world < 1:
            raise StragglerError(f"world must be an integer >= 1, got {world!r}")
        if not isinstance(backup, int) or isinstance(backup, bool) or not 0 <= backup < world:
            raise StragglerError(
                f"backup workers must be an integer in [0, {world - 1}] for {world} replicas, got {backup!r}"
            )
        self.world = world
        self.backup = backup

    @property
    def to_aggregate(self) -> int:
        return self.world - self.backup

    def aggregate(self, arrivals: Mapping[int, float]) -> tuple[int, ...]:
        """The replicas whose gradients count: the first ``world - backup`` by arrival time
        (ties to the lower index), in arrival order. ``arrivals``: replica -> seconds."""
        if len(arrivals) < self.to_aggregate:
            raise StragglerError(
                f"{len(arrivals)} gradients arrived, the step needs {self.to_aggregate} of {self.world}"
            )
        for r in arrivals:
            if not isinstance(r, int) or not 0 <= r < self.world:
                raise StragglerError(f"replica {r!r} out of range for {self.world} replicas")
        order = sorted(arrivals, key=lambda r: (arrivals[r], r))
        return tuple(order[: self.to_aggregate])

    def sit_out(
        self, flagged: Iterable[int], ratio: Mapping[int, float], holding: Iterable[int]
    ) -> frozenset[int]:
        """The DDP form, decided before a step: which replicas take no batch in it.

        Up to ``backup`` of the ``flagged`` replicas that still hold data (``holding``), the
        slowest first (highest ``ratio``: seconds per row over the others' median; unknown
        counts as 0; ties to the lower index), and never every replica that holds data (the
        step must train on something, and the last rows must be read).
        """
        holders = set(holding)
        for r in holders:
            if not isinstance(r, int) or not 0 <= r < self.world:
                raise StragglerError(f"replica {r!r} out of range for {self.world} replicas")
        slow = sorted((r for r in set(flagged) if r in holders), key=lambda r: (-ratio.get(r, 0.0), r))
        return frozenset(slow[: min(self.backup, len(holders) - 1)])

    def step_time(self, compute_seconds: Sequence[float]) -> float:
        """Seconds of a step: when the ``world - backup``-th gradient arrives."""
        if len(compute_seconds) != self.world:
            raise StragglerError(f"{len(compute_seconds)} times for {self.world} replicas")
        return sorted(compute_seconds)[self.to_aggregate - 1]


def sample_shares(kept_steps: Mapping[int, int], steps: int) -> dict[int, float]:
    """Each replica's share of steps whose gradient counted (1.0 = never dropped): the bias."""
    if not isinstance(steps, int) or steps < 1:
        raise StragglerError(f"steps must be an integer >= 1, got {steps!r}")
    return {r: n / steps for r, n in sorted(kept_steps.items())}
