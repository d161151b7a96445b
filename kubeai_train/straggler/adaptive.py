"""Adaptive per-worker batch sizes for synchronous training: the global batch stays fixed, each
worker's share follows its measured speed, so all workers finish a step together.

Why the average stays unbiased: data-parallel training averages the replicas' gradients,
``g = (1/N) sum_i g_i``, and each replica's ``g_i`` is the mean over its ``b_i`` rows. With
unequal ``b_i`` that average over-weights the rows of small batches. Scaling replica ``i``'s
mean loss by ``w_i = N b_i / B`` (:func:`loss_weight`) gives
``(1/N) sum_i (N b_i / B) (1/b_i) sum_j g_ij = (1/B) sum_all g`` -- exactly the mean gradient
over the global batch, the same estimate as with equal batches. In torch that is a factor on the
loss before ``backward()`` (DDP's all-reduce averages as before); in TF sync training the same
factor on each replica's loss.

Plans are pure functions of what every worker sees (the all-gathered timings), so every
worker computes the same plan without another round of communication.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence

from kubeai_train.straggler.types import BatchPlan, StragglerError, WorkerTiming

__all__ = [
    "AdaptiveBatchPolicy",
    "capacity_bound",
    "equal_batches",
    "loss_weight",
    "plan_local_batches",
    "step_time",
]


def loss_weight(local: int, global_batch: int, world: int) -> float:
    """``world x local / global_batch``: the factor on a replica's mean loss that makes the
    averaged gradient the global-batch mean (derivation in the module doc)."""
    if not isinstance(global_batch, int) or global_batch < 1:
        raise StragglerError(f"global_batch must be an integer >= 1, got {global_batch!r}")
    if not isinstance(world, int) or world < 1:
        raise StragglerError(f"world must be an integer >= 1, got {world!r}")
    if not isinstance(local, int) or not 0 <= local <= global_batch:
        raise StragglerError(f"local batch must be an integer in [0, {global_batch}], got {local!r}")
    return world * local / global_batch


def equal_batches(global_batch: int, world: int) -> tuple[int, ...]:
    """The global batch split as evenly as integers allow (the first ``B mod N`` get one more)."""
    _check_shape(global_batch, world, 1)
    q, r = divmod(global_batch, world)
    return tuple(q + (1 if i < r else 0) for i in range(world))


def _check_shape(global_batch: int, world: int, min_local: int) -> None:
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise StragglerError(f"world must be an integer >= 1, got {world!r}")
    if not isinstance(min_local, int) or isinstance(min_local, bool) or min_local < 1:
        raise StragglerError(f"min_local must be an integer >= 1, got {min_local!r}")
    if (
        not isinstance(global_batch, int)
        or isinstance(global_batch, bool)
        or global_batch < world * min_local
    ):
        raise StragglerError(
            f"global_batch must be an integer >= world x min_local = {world * min_local}, got {global_batch!r}"
        )


def _check_speeds(speeds: Sequence[float]) -> list[float]:
    out = []
    for i, s in enumerate(speeds):
        if not isinstance(s, (int, float)) or not (s > 0 and math.isfinite(s)):
            raise StragglerError(f"speed of worker {i} must be a finite number > 0 (rows/s), got {s!r}")
        out.append(float(s))
    return out


def plan_local_batches(global_batch: int, speeds: Sequence[float], min_local: int = 1) -> tuple[int, ...]:
    """Local batches adding up to ``global_batch`` that minimise the step time
    ``max_i b_i / speed_i`` over integers, each at least ``min_local``.

    Proportional shares rounded down, then the remaining rows one at a time to whoever would
    finish them soonest (ties to the lower index): deterministic, optimal for the max.
    """
    s = _check_speeds(speeds)
    n = len(s)
    _check_shape(global_batch, n, min_local)
    total = sum(s)
    sizes = [max(min_local, math.floor(global_batch * x / total)) for x in s]
    # the floors at min_local can overshoot: take back from the slowest-finishing worker first
    over = sum(sizes) - global_batch
    while over > 0:
        i = max((j for j in range(n) if sizes[j] > min_local), key=lambda j: (sizes[j] / s[j], -j))
        sizes[i] -= 1
        over -= 1
    heap = [((sizes[i] + 1) / s[i], i) for i in range(n)]
    heapq.heapify(heap)
    for _ in range(global_batch - sum(sizes)):
        _, i = heapq.heappop(heap)
        sizes[i] += 1
        heapq.heappush(heap, ((sizes[i] + 1) / s[i], i))
    return tuple(sizes)


def step_time(sizes: Sequence[int], speeds: Sequence[float]) -> float:
    """Seconds of a synchronous step: the last worker to finish its batch."""
    s = _check_speeds(speeds)
    if len(sizes) != len(s):
        raise StragglerError(f"{len(sizes)} batch sizes for {len(s)} speeds")
    return max(b / x for b, x in zip(sizes, s, strict=True))


def capacity_bound(global_batch: int, speeds: Sequence[float]) -> float:
    """T* of one step: the global batch over the workers' summed speed (no plan does better)."""
    return global_batch / sum(_check_speeds(speeds))


class AdaptiveBatchPolicy:
    """Re-plans local batch sizes from measured speeds, every ``replan_every`` steps, when it pays.

    Args:
        global_batch: rows per synchronous step, over all workers (fixed).
        world: number of workers.
        replan_every: steps between re-plans (R).
        hysteresis: adopt a new plan only when it predicts a step at least this fraction shorter
            than the current plan's at the same speeds (no churn on noise).
        min_local: smallest local batch (a worker never drops out of the step).
        smoothing: weight of the newest step in each worker's speed (exponential average, (0, 1]).

    Speeds are rows per compute-second (:class:`WorkerTiming`); a worker's speed is known once it
    reported a step with rows. ``observe`` returns the new plan when one is adopted, else None.
    """

    def __init__(
        self,
        global_batch: int,
        world: int,
        replan_every: int = 10,
        hysteresis: float = 0.05,
        min_local: int = 1,
        smoothing: float = 0.5,
    ) -> None:
        _check_shape(global_batch, world, min_local)
        if not isinstance(replan_every, int) or isinstance(replan_every, bool) or replan_every < 1:
            raise StragglerError(f"replan_every must be an integer >= 1 (steps), got {replan_every!r}")
        if not isinstance(hysteresis, (int, float)) or not 0 <= hysteresis < 1:
            raise StragglerError(f"hysteresis must be a fraction in [0, 1), got {hysteresis!r}")
        if not isinstance(smoothing, (int, float)) or not 0 < smoothing <= 1:
            raise StragglerError(f"smoothing must be in (0, 1], got {smoothing!r}")
        self.global_batch = global_batch
        self.world = world
        self.replan_every = replan_every
        self.hysteresis = float(hysteresis)
        self.min_local = min_local
        self.smoothing = float(smoothing)
        self.plan = BatchPlan(0, equal_batches(global_batch, world))
        self._speeds: list[float | None] = [None] * world
        self._since = 0

    @property
    def speeds(self) -> tuple[float | None, ...]:
        return tuple(self._speeds)

    def observe(self, step: int, timings: Iterable[WorkerTiming]) -> BatchPlan | None:
        """Take one step's timings; returns the plan for step ``step + 1`` on when it changes."""
        for t in timings:
            if t.worker >= self.world:
                raise StragglerError(f"worker {t.worker} out of range for world {self.world}")
            if t.rows == 0 or t.compute_seconds <= 0:
                continue
            v = t.rows / t.compute_seconds
            old = self._speeds[t.worker]
            self._speeds[t.worker] = v if old is None else self.smoothing * v + (1 - self.smoothing) * old
        self._since += 1
        if self._since < self.replan_every or any(v is None for v in self._speeds):
            return None
        self._since = 0
        speeds = [float(v) for v in self._speeds if v is not None]
        target = plan_local_batches(self.global_batch, speeds, self.min_local)
        now, then = step_time(self.plan.sizes, speeds), step_time(target, speeds)
        if target == self.plan.sizes or then > now * (1 - self.hysteresis):
            return None
        self.plan = BatchPlan(step + 1, target, tuple(speeds))
        return self.plan

    def state_dict(self) -> dict[str, object]:
        return {"sizes": list(self.plan.sizes), "step": self.plan.step, "speeds": list(self._speeds)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        try:
            sizes = tuple(int(b) for b in state["sizes"])  # type: ignore[attr-defined]
            speeds = [None if v is None else float(v) for v in state["speeds"]]  # type: ignore[attr-defined]
            step = int(state["step"])  # type: ignore[call-overload]
        except (KeyError, TypeError, ValueError) as e:
            raise StragglerError(
                f"not an AdaptiveBatchPolicy state: {e!r}; pass what state_dict() returned"
            ) from e
        if len(sizes) != self.world or sum(sizes) != self.global_batch or len(speeds) != self.world:
            raise StragglerError(
                f"the state's plan {list(sizes)} is not of {self.world} workers summing to {self.global_batch}; "
                "it belongs to another job shape"
            )
        self.plan = BatchPlan(step, sizes)
        self._speeds = speeds
        self._since = 0
