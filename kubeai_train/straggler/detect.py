"""Slow-worker detection: a worker is slow when its compute time per row exceeds ``k`` times
the median of the other workers' in the step for ``m`` consecutive steps, and recovered after
``m`` consecutive steps back under it.

Per row, not per step: with adaptive batch sizes a slow worker gets fewer rows, so its step
time looks normal while it still is slow. Compute time, not step time: in synchronous training
every worker's step lasts as long as the slowest one's, and the fast ones spend the difference
waiting. The median of the others (not the mean, not a median including the worker itself) so
that a slow worker does not move its own yardstick: with two workers, a median of both would
make a 3x slower one look 1.5x.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from kubeai_train.straggler.types import Detection, StragglerError, WorkerTiming

__all__ = ["SlowWorkerDetector"]


def _median_without(xs: list[float], x: float) -> float:
    """The median of sorted ``xs`` with one occurrence of ``x`` removed (O(log n): a step of
    a thousand workers stays cheap)."""
    i = bisect.bisect_left(xs, x)
    m = len(xs) - 1

    def rest(k: int) -> float:
        return xs[k] if k < i else xs[k + 1]

    return rest(m // 2) if m % 2 else (rest(m // 2 - 1) + rest(m // 2)) / 2


class SlowWorkerDetector:
    """Flags slow workers from per-step timings (pure: feed it steps, read its decisions).

    Args:
        k: how many times the median seconds-per-row makes a worker slow (> 1).
        m: consecutive slow steps before a flag, and consecutive normal steps before it clears
            (>= 1). With ``m=2`` a worker that turns 2x slower at step s is flagged at step s+1.

    Workers with no rows in a step (a Join shadow step) keep their counts; a step with fewer
    than two measured workers decides nothing (there is no "others" to compare with).
    """

    def __init__(self, k: float = 1.5, m: int = 2) -> None:
        if not isinstance(k, (int, float)) or not k > 1:
            raise StragglerError(f"k must be a number > 1 (times the median), got {k!r}")
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise StragglerError(f"m must be an integer >= 1 (consecutive steps), got {m!r}")
        self.k = float(k)
        self.m = m
        self._slow_run: dict[int, int] = {}
        self._normal_run: dict[int, int] = {}
        self._flagged: set[int] = set()

    @property
    def flagged(self) -> frozenset[int]:
        return frozenset(self._flagged)

    def observe(self, step: int, timings: Iterable[WorkerTiming]) -> Detection:
        """Take one step's timings (one per worker); returns what changed."""
        per_row: dict[int, float] = {}
        for t in timings:
            if t.worker in per_row:
                raise StragglerError(f"step {step}: two timings of worker {t.worker}")
            s = t.seconds_per_row
            if s is not None:
                per_row[t.worker] = s
        if len(per_row) < 2:
            return Detection(step, self.flagged)
        xs = sorted(per_row.values())
        ratio = {w: s / _median_without(xs, s) for w, s in per_row.items()}
        new: set[int] = set()
        cleared: set[int] = set()
        for w, r in ratio.items():
            if r > self.k:
                self._slow_run[w] = self._slow_run.get(w, 0) + 1
                self._normal_run[w] = 0
                if w not in self._flagged and self._slow_run[w] >= self.m:
                    self._flagged.add(w)
                    new.add(w)
            else:
                self._normal_run[w] = self._normal_run.get(w, 0) + 1
                self._slow_run[w] = 0
                if w in self._flagged and self._normal_run[w] >= self.m:
                    self._flagged.discard(w)
                    cleared.add(w)
        return Detection(step, self.flagged, frozenset(new), frozenset(cleared), ratio)

    def state_dict(self) -> dict[str, object]:
        """The counts and flags (a resumed job keeps its view of who is slow)."""
        return {
            "slow_run": {str(w): n for w, n in self._slow_run.items()},
            "normal_run": {str(w): n for w, n in self._normal_run.items()},
            "flagged": sorted(self._flagged),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        try:
            slow = {int(w): int(n) for w, n in dict(state["slow_run"]).items()}  # type: ignore[call-overload]
            normal = {int(w): int(n) for w, n in dict(state["normal_run"]).items()}  # type: ignore[call-overload]
            flagged = {int(w) for w in state["flagged"]}  # type: ignore[attr-defined]
        except (KeyError, TypeError, ValueError) as e:
            raise StragglerError(
                f"not a SlowWorkerDetector state: {e!r}; pass what state_dict() returned"
            ) from e
        self._slow_run, self._normal_run, self._flagged = slow, normal, flagged
