"""Adaptive local batches for DDP: the trainer's side of :mod:`kubeai_train.straggler`.

Synchronous DDP waits for the slowest rank every step. With ``TrainConfig(straggler="adaptive")``
the global batch stays fixed and each rank's share follows its measured speed:

* **Granularity.** The reader's ``batch_size`` ``B`` is the local batch at equal shares, as
  without adaptive batches (so switching the mode on keeps the global batch ``N B``). A plan is
  in units of ``u = B / micro_batches`` rows; a rank takes ``k_r >= 1`` units per step.
  :class:`RowSlicer` cuts them out of the reader's big batches (views, a copy only where a step
  spans two reader batches), so the reader keeps its batch size and its per-batch cost. The
  rows of a reader batch not trained on yet (the *carry*, fewer than ``B``) go into a
  checkpoint next to the reader's position after that batch, and a resumed rank trains on them
  first: the same exactly-once bookkeeping as with one batch per step, for the static and the
  dynamic assignment alike.
* **Measurement.** A rank's compute time of a step runs from the moment it starts taking its
  micro-batches to the end of forward and loss: reading and transforming its input (or waiting
  for its DataLoader workers), the host-to-device copy, forward and the loss. Backward is left
  out: DDP's gradient all-reduce overlaps it, so its duration includes the wait for the slowest
  rank, which would make every rank look as slow as the straggler. Backward costs about as much
  per row as forward, so the ratio between ranks, which is all a plan uses, is kept.
* **Exchange at no extra collective.** Each step's ``(rows, compute_seconds)`` of every rank
  rides in the input-sync all-reduce the loop issues anyway (rank ``r`` fills its two slots, the
  others add zeros, so the sum is an all-gather and bit-exact). It arrives one step late: the
  timings of step ``s`` are known during step ``s + 1``, and a plan made from them applies from
  step ``s + 2``. Every rank feeds the same numbers to the same pure policies in the same order,
  so every rank holds the same plan with no further coordination.
* **Unbiased gradients.** A rank with ``n`` rows of a step planned at ``G`` rows over ``N``
  ranks scales its mean loss by ``N n / G`` (:func:`kubeai_train.straggler.loss_weight`), so
  DDP's averaged gradient is the mean over the global batch, as with equal shares.
* **Detection.** :class:`~kubeai_train.straggler.SlowWorkerDetector` flags a rank slower than
  ``k`` x the median per row for ``m`` steps and clears it after ``m`` normal steps. Rank 0 logs
  each change; every rank's :class:`~kubeai_train.torch.FitResult` carries the history.

With a static split of the data (``kubeai_train.data.read`` by rank) a slowed rank still owns its
whole shard: it takes smaller steps, so the fast ranks run out first and then step with the
slow one in shadow steps until it is done. Every step is shorter, the epoch is not. Shares
that follow speed need the data to follow speed too, which dynamic assignment of splits does.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kubeai_train.straggler import AdaptiveBatchPolicy, SlowWorkerDetector, StragglerError, WorkerTiming
from kubeai_train.torch.types import AdaptiveBatching, ConfigError

__all__ = [
    "AdaptiveController",
    "RowSlicer",
    "StragglerReport",
    "concat_batches",
    "decode_carry",
    "encode_carry",
    "timing_slots",
    "unpack_timings",
]

log = logging.getLogger(__name__)


def timing_slots(world: int, rank: int, rows: int, compute_seconds: float) -> list[float]:
    """This rank's contribution to the summed timing vector: ``(rows, seconds)`` at slots
    ``2 rank, 2 rank + 1``, zeros elsewhere (summing every rank's vector gathers them)."""
    out = [0.0] * (2 * world)
    out[2 * rank] = float(rows)
    out[2 * rank + 1] = float(compute_seconds)
    return out


def unpack_timings(values: Sequence[float]) -> list[WorkerTiming]:
    """The summed timing vector as one :class:`WorkerTiming` per rank."""
    if len(values) % 2:
        raise StragglerError(f"a timing vector holds (rows, seconds) pairs, got {len(values)} values")
    return [
        WorkerTiming(i, int(round(values[2 * i])), max(0.0, float(values[2 * i + 1])))
        for i in range(len(values) // 2)
    ]


def concat_batches(parts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Micro-batches of the same columns, concatenated row-wise into one local batch."""
    if not parts:
        raise ValueError("concat_batches needs at least one micro-batch")
    if len(parts) == 1:
        return dict(parts[0])
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class RowSlicer:
    """Local batches of a planned number of rows, cut out of a reader's bigger batches.

    Args:
        batches: the reader's batches (dicts of tensors with the same leading dimension).
        carry: rows of a batch taken before a restart and not trained on (they come first).

    :meth:`take` returns views of the current reader batch while a step fits in it and copies
    only where a step spans two batches; :attr:`fetched` counts the reader batches taken from
    ``batches`` (what the reader's position counts) and :meth:`carry` is what is left of the
    last of them.
    """

    def __init__(
        self, batches: Iterator[dict[str, torch.Tensor]], carry: dict[str, torch.Tensor] | None = None
    ) -> None:
        self._it = batches
        self._head = carry if carry is not None and _rows_of(carry) else None
        self._offset = 0
        self.fetched = 0
        self.ended = False

    def take(self, rows: int) -> dict[str, torch.Tensor] | None:
        """Up to ``rows`` rows (fewer only at the end of the batches); None when none are left."""
        if rows < 1:
            raise ValueError(f"a local batch needs at least one row, got {rows}")
        parts: list[dict[str, torch.Tensor]] = []
        need = rows
        while need:
            if self._head is None:
                b = None if self.ended else next(self._it, None)
                if b is None:
                    self.ended = True  # never ask an ended DataLoader iterator again
                    break
                self.fetched += 1
                self._head, self._offset = b, 0
            n = _rows_of(self._head) - self._offset
            k = min(n, need)
            if self._offset == 0 and k == n:
                parts.append(self._head)
            else:
                parts.append({c: v[self._offset : self._offset + k] for c, v in self._head.items()})
            need -= k
            self._offset += k
            if self._offset == _rows_of(self._head):
                self._head, self._offset = None, 0
        return concat_batches(parts) if parts else None

    def carry(self) -> dict[str, torch.Tensor] | None:
        """The rows of the last fetched batch not taken yet (None: none)."""
        if self._head is None:
            return None
        return {c: v[self._offset :] for c, v in self._head.items()}


def _rows_of(batch: Mapping[str, torch.Tensor]) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def encode_carry(batch: Mapping[str, torch.Tensor] | None) -> dict[str, Any] | None:
    """A carry as JSON (dtype, shape and base64 bytes per column) for a checkpoint's data state."""
    if batch is None:
        return None
    out: dict[str, Any] = {}
    for c, v in batch.items():
        if not isinstance(v, torch.Tensor):
            raise ConfigError(
                f"straggler='adaptive' checkpoints hold tensor columns only; column {c!r} is "
                f"{type(v).__name__}: transform it to a tensor in the features"
            )
        a = v.detach().cpu().contiguous().numpy()
        out[c] = {
            "dtype": a.dtype.str,
            "shape": list(a.shape),
            "data": base64.b64encode(a.tobytes()).decode(),
        }
    return out


def decode_carry(state: Mapping[str, Any] | None) -> dict[str, torch.Tensor] | None:
    """The inverse of :func:`encode_carry`."""
    if not state:
        return None
    try:
        return {
            c: torch.from_numpy(
                np.frombuffer(base64.b64decode(v["data"]), dtype=np.dtype(v["dtype"]))
                .reshape(v["shape"])
                .copy()
            )
            for c, v in state.items()
        }
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"the checkpoint's carried rows are unreadable ({e}); delete the checkpoint") from e


@dataclass
class StragglerReport:
    """What ``straggler="adaptive"`` did in a fit (the same on every rank).

    Attributes:
        micro_batch: rows of a micro-batch, the plan's unit (the reader's ``batch_size`` over
            ``micro_batches``).
        global_batch: planned rows per step over all ranks.
        plans: ``{"step": first step it applied to, "sizes": rows per rank}``, the initial
            equal plan first.
        detections: each change of the slow flags: ``{"step": the step observed, "reported_at":
            the step during which it was known, "new": [...], "cleared": [...], "ratio": {rank:
            seconds-per-row over the others' median}}``.
        flagged: ranks flagged slow at the end.
        speeds: each rank's smoothed rows per compute-second at the end (None: never measured).
    """

    micro_batch: int
    global_batch: int
    plans: list[dict[str, Any]] = field(default_factory=list)
    detections: list[dict[str, Any]] = field(default_factory=list)
    flagged: list[int] = field(default_factory=list)
    speeds: list[float | None] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "micro_batch": self.micro_batch,
            "global_batch": self.global_batch,
            "plans": self.plans,
            "detections": self.detections,
            "flagged": self.flagged,
            "speeds": self.speeds,
        }


class AdaptiveController:
    """The detector and the batch policy of one rank, fed the gathered timings of every step.

    Args:
        options: the :class:`AdaptiveBatching` settings.
        world: ranks in the job.
        rank: this rank.
        micro_batch: rows of the plan's unit ``u`` (the reader's ``batch_size`` over
            ``options.micro_batches``).

    Every rank builds one and calls :meth:`observe` with the same timings at the same steps, so
    all of them hold the same plan (pure functions of the timings).
    """

    def __init__(self, options: AdaptiveBatching, world: int, rank: int, micro_batch: int) -> None:
        if not isinstance(micro_batch, int) or isinstance(micro_batch, bool) or micro_batch < 1:
            raise ConfigError(
                f"a micro-batch (batch_size / micro_batches) must be an integer >= 1 rows, got {micro_batch!r}"
            )
        self.options = options
        self.world = world
        self.rank = rank
        self.micro_batch = micro_batch
        self.policy = AdaptiveBatchPolicy(
            global_batch=world * options.micro_batches,
            world=world,
            replan_every=options.replan_every,
            hysteresis=options.hysteresis,
            min_local=1,
            smoothing=options.smoothing,
            reset_steps=options.slow_steps,
        )
        self.detector = SlowWorkerDetector(k=options.slow_factor, m=options.slow_steps)
        self.report = StragglerReport(micro_batch, self.global_rows)
        self._record_plan(0)

    @property
    def global_rows(self) -> int:
        """Planned rows per step over all ranks (fixed)."""
        return self.world * self.options.micro_batches * self.micro_batch

    @property
    def units(self) -> int:
        """Micro-batches this rank takes in the next step."""
        return self.policy.plan.sizes[self.rank]

    @property
    def rows(self) -> int:
        """Rows this rank takes in the next step."""
        return self.units * self.micro_batch

    def sizes(self) -> list[int]:
        """Planned rows per rank."""
        return [u * self.micro_batch for u in self.policy.plan.sizes]

    @property
    def loss_scale(self) -> float:
        """The factor on this rank's *summed* loss: ``N / G``, i.e. the weight ``N n / G`` of
        :func:`~kubeai_train.straggler.loss_weight` on the mean loss of its ``n`` rows. DDP's
        average is then the sum of row gradients over ``G``: the global-batch mean (a step with
        fewer rows than planned, at the end of a shard, counts them at the same weight each)."""
        return self.world / self.global_rows

    def observe(self, step: int, values: Sequence[float], applies_from: int) -> tuple[str, bool]:
        """Feed the gathered timings of ``step``; ``applies_from`` is the first step a new plan
        can still change. Returns the detector's log line ("" when nothing changed) and whether
        the plan changed."""
        timings = unpack_timings(values)
        if not any(t.rows for t in timings):
            return "", False  # nobody trained (the first step of a pass has no previous step)
        det = self.detector.observe(step, timings)
        if det.new or det.cleared:
            self.report.detections.append(
                {
                    "step": step,
                    "reported_at": applies_from - 1,
                    "new": sorted(det.new),
                    "cleared": sorted(det.cleared),
                    "ratio": {w: round(r, 4) for w, r in det.ratio.items()},
                }
            )
        self.report.flagged = sorted(det.flagged)
        # the policy sees rows, not micro-batches: speeds are ratios, the plan is in units
        plan = self.policy.observe(step, timings, new=det.new, cleared=det.cleared)
        self.report.speeds = list(self.policy.speeds)
        if plan is not None:
            self._record_plan(applies_from)
        return det.describe(), plan is not None

    def _record_plan(self, step: int) -> None:
        self.report.plans.append({"step": step, "sizes": self.sizes()})

    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.state_dict(),
            "detector": self.detector.state_dict(),
            "micro_batch": self.micro_batch,
        }

    def load_state_dict(self, state: Mapping[str, Any], step: int) -> None:
        """Restore a checkpoint's plan and flags (the job keeps its shares across a restart);
        a plan of another shape (world, micro-batches) raises ConfigError."""
        if int(state.get("micro_batch", -1)) != self.micro_batch:
            raise ConfigError(
                f"the checkpoint was trained with micro-batches of {state.get('micro_batch')!r} rows, "
                f"this run's are {self.micro_batch}; resume with the same batch_size and micro_batches"
            )
        try:
            self.policy.load_state_dict(dict(state["policy"]))
            self.detector.load_state_dict(dict(state["detector"]))
        except (KeyError, StragglerError) as e:
            raise ConfigError(f"cannot resume the adaptive batch plan: {e}") from e
        self.report.plans = [{"step": step, "sizes": self.sizes()}]
        self.report.flagged = sorted(self.detector.flagged)
