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
import statistics
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
    """Re-plans local batch sizes from measured speeds: at once when a worker's regime changes
    (the detector flags or clears it), otherwise every ``replan_every`` steps when it pays and
    the speed differences stand out of the measurement noise.

    Args:
        global_batch: rows per synchronous step, over all workers (fixed).
        world: number of workers.
        replan_every: steps between periodic re-plans (R).
        hysteresis: adopt a new plan only when it predicts a step at least this fraction shorter
            than the current plan's at the same speeds (no churn on small differences).
        min_local: smallest local batch (a worker never drops out of the step).
        smoothing: weight of the newest step in each worker's speed (exponential average, (0, 1]).
        reset_steps: on a regime change, a worker's speed restarts from the mean of its newest
            this-many steps (the detector's ``m``: the steps that made the change), not from an
            average still dominated by the old regime.
        noise_z: a periodic re-plan plans a worker at its own speed only when that speed is more
            than ``noise_z`` standard errors (of its own step-to-step spread) from the median
            speed; the others are planned at the median. i.i.d. jitter then leaves the plan
            alone, while a lasting difference (or a flagged worker) moves it. 0 turns it off.
        min_regime: a plan made at a flag takes effect a few steps later and is undone a few
            steps after the clear, so it pays only for slowdowns that last. The policy keeps
            the lengths (flag to clear, in steps) of the last slow spells; when their median is
            under ``min_regime`` (slowdowns come and go, e.g. jitter) a new flag waits for the
            periodic re-plan, or until it has lasted ``min_regime`` steps itself. Default
            ``2 x (reset_steps + 2)``: detection lag plus the plan's own lag, on both ends.

    Speeds are rows per compute-second (:class:`WorkerTiming`); a worker's speed is known once it
    reported a step with rows. ``observe`` returns the new plan when one is adopted, else None.
    """

    #: steps of raw speeds kept per worker for the noise estimate
    WINDOW = 16

    def __init__(
        self,
        global_batch: int,
        world: int,
        replan_every: int = 10,
        hysteresis: float = 0.05,
        min_local: int = 1,
        smoothing: float = 0.5,
        reset_steps: int = 2,
        noise_z: float = 3.0,
        min_regime: int | None = None,
    ) -> None:
        _check_shape(global_batch, world, min_local)
        if not isinstance(replan_every, int) or isinstance(replan_every, bool) or replan_every < 1:
            raise StragglerError(f"replan_every must be an integer >= 1 (steps), got {replan_every!r}")
        if not isinstance(hysteresis, (int, float)) or not 0 <= hysteresis < 1:
            raise StragglerError(f"hysteresis must be a fraction in [0, 1), got {hysteresis!r}")
        if not isinstance(smoothing, (int, float)) or not 0 < smoothing <= 1:
            raise StragglerError(f"smoothing must be in (0, 1], got {smoothing!r}")
        if not isinstance(reset_steps, int) or isinstance(reset_steps, bool) or reset_steps < 1:
            raise StragglerError(f"reset_steps must be an integer >= 1 (steps), got {reset_steps!r}")
        if not isinstance(noise_z, (int, float)) or not (noise_z >= 0 and math.isfinite(noise_z)):
            raise StragglerError(f"noise_z must be a finite number >= 0 (standard errors), got {noise_z!r}")
        if min_regime is None:
            min_regime = 2 * (reset_steps + 2)
        if not isinstance(min_regime, int) or isinstance(min_regime, bool) or min_regime < 0:
            raise StragglerError(f"min_regime must be an integer >= 0 (steps), got {min_regime!r}")
        self.global_batch = global_batch
        self.world = world
        self.replan_every = replan_every
        self.hysteresis = float(hysteresis)
        self.min_local = min_local
        self.smoothing = float(smoothing)
        self.reset_steps = reset_steps
        self.noise_z = float(noise_z)
        self.plan = BatchPlan(0, equal_batches(global_batch, world))
        self._speeds: list[float | None] = [None] * world
        self._raw: list[list[float]] = [[] for _ in range(world)]
        self._since = 0
        self.min_regime = min_regime
        self._flag_since: dict[int, int] = {}  # flagged workers: the step of their flag
        self._waiting: set[int] = set()  # flagged workers the plan has not reacted to
        self._spells: list[int] = []  # lengths of the last slow spells (flag to clear)

    @property
    def speeds(self) -> tuple[float | None, ...]:
        return tuple(self._speeds)

    def observe(
        self,
        step: int,
        timings: Iterable[WorkerTiming],
        new: Iterable[int] = (),
        cleared: Iterable[int] = (),
    ) -> BatchPlan | None:
        """Take one step's timings; returns the plan for step ``step + 1`` on when it changes.

        ``new`` / ``cleared``: workers the detector flagged / cleared at this step (a regime
        change): their speeds restart from their newest ``reset_steps`` steps and the policy
        re-plans now instead of at the next R boundary."""
        for t in timings:
            if t.worker >= self.world:
                raise StragglerError(f"worker {t.worker} out of range for world {self.world}")
            if t.rows == 0 or t.compute_seconds <= 0:
                continue
            v = t.rows / t.compute_seconds
            old = self._speeds[t.worker]
            self._speeds[t.worker] = v if old is None else self.smoothing * v + (1 - self.smoothing) * old
            raw = self._raw[t.worker]
            raw.append(v)
            del raw[: -self.WINDOW]
        react = []
        for w in sorted({int(w) for w in (*new, *cleared)}):
            if not 0 <= w < self.world:
                raise StragglerError(f"worker {w} out of range for world {self.world}")
        for w in sorted({int(w) for w in cleared}):
            since = self._flag_since.pop(w, None)
            if since is not None:
                self._spells = [*self._spells, step - since][-8:]
            if w in self._waiting:
                self._waiting.discard(w)  # never reacted to: nothing to undo
            else:
                react.append(w)
        for w in sorted({int(w) for w in new}):
            self._flag_since[w] = step
            if self._spells and statistics.median(self._spells) < self.min_regime:
                self._waiting.add(w)
            else:
                react.append(w)
        for w in sorted(self._waiting):
            if step - self._flag_since[w] >= self.min_regime:  # lasted: react after all
                self._waiting.discard(w)
                react.append(w)
        for w in react:
            recent = self._raw[w][-self.reset_steps :]
            if recent:
                self._raw[w] = list(recent)
                self._speeds[w] = sum(recent) / len(recent)
        self._since += 1
        if any(v is None for v in self._speeds):
            return None
        if not react and self._since < self.replan_every:
            return None
        self._since = 0
        speeds = [float(v) for v in self._speeds if v is not None]
        planned = speeds if react else self._denoised(speeds)
        target = plan_local_batches(self.global_batch, planned, self.min_local)
        now, then = step_time(self.plan.sizes, planned), step_time(target, planned)
        if target == self.plan.sizes or then > now * (1 - self.hysteresis):
            return None
        self.plan = BatchPlan(step + 1, target, tuple(planned))
        return self.plan

    def _denoised(self, speeds: list[float]) -> list[float]:
        """Each worker's speed, or the median speed where the difference is within its noise
        (``noise_z`` standard errors of its smoothed speed; needs 3 steps to estimate)."""
        if self.noise_z == 0:
            return speeds
        med = statistics.median(speeds)
        n_eff = (2 - self.smoothing) / self.smoothing  # samples an exponential average holds
        out = []
        for v, raw in zip(speeds, self._raw, strict=True):
            if len(raw) < 3:
                out.append(v)
                continue
            se = statistics.stdev(raw) / math.sqrt(min(len(raw), n_eff))
            out.append(v if abs(v - med) > self.noise_z * se else med)
        return out

    def state_dict(self) -> dict[str, object]:
        return {
            "sizes": list(self.plan.sizes),
            "step": self.plan.step,
            "speeds": list(self._speeds),
            "raw": [list(r) for r in self._raw],
            "flag_since": {str(w): s for w, s in self._flag_since.items()},
            "waiting": sorted(self._waiting),
            "spells": list(self._spells),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        try:
            sizes = tuple(int(b) for b in state["sizes"])  # type: ignore[attr-defined]
            speeds = [None if v is None else float(v) for v in state["speeds"]]  # type: ignore[attr-defined]
            step = int(state["step"])  # type: ignore[call-overload]
            raw = [[float(v) for v in r] for r in state.get("raw", [[] for _ in speeds])]  # type: ignore[attr-defined]
            flag_since = {int(w): int(s) for w, s in dict(state.get("flag_since", {})).items()}  # type: ignore[call-overload]
            waiting = {int(w) for w in state.get("waiting", [])}  # type: ignore[attr-defined]
            spells = [int(n) for n in state.get("spells", [])]  # type: ignore[attr-defined]
        except (KeyError, TypeError, ValueError) as e:
            raise StragglerError(
                f"not an AdaptiveBatchPolicy state: {e!r}; pass what state_dict() returned"
            ) from e
        if (
            len(sizes) != self.world
            or sum(sizes) != self.global_batch
            or len(speeds) != self.world
            or len(raw) != self.world
        ):
            raise StragglerError(
                f"the state's plan {list(sizes)} is not of {self.world} workers summing to {self.global_batch}; "
                "it belongs to another job shape"
            )
        self.plan = BatchPlan(step, sizes)
        self._speeds = speeds
        self._raw = raw
        self._flag_since, self._waiting, self._spells = flag_since, waiting & set(flag_since), spells
        self._since = 0
