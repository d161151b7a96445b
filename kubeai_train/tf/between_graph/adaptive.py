"""Adaptive local batches for between-graph synchronous training: the TF side of
:mod:`kubeai_train.straggler` (``TrainConfig(sync=True, straggler="adaptive")``).

SyncReplicasOptimizer waits for ``N`` gradients per global step, so one slow replica makes
every step slow. Here the global batch stays fixed and each replica's share follows its
measured speed:

* **Granularity.** The reader's ``batch_size`` is a micro-batch of ``g`` rows; a replica takes
  ``k_i >= 1`` micro-batches per step and feeds their concatenation to the model (the graph's
  batch dimension is dynamic). At equal shares ``k_i = micro_batches``; the global batch is
  ``G = N x micro_batches x g`` rows. The position stored with the step is the last
  micro-batch's, so a restarted worker resumes exactly after the rows it trained on.
* **Measurement.** A replica's compute time of a step is taking its micro-batches (reading,
  or waiting for its tf.data prefetch) plus forward and backward, the latter timed in the graph
  (``tf.timestamp`` at the start of the step's run and after every gradient is computed). The
  push to the gradient accumulators and the wait for the sync token -- where a fast replica
  waits for the slow one -- are left out.
* **Exchange through PS 0.** Each replica writes its previous step's ``(local step, rows,
  seconds)`` into its slot of a small variable under the trainer's state scope, in the same
  ``session.run`` as its step (no extra round trip). After each of its steps the chief reads
  the slots and the global step in one tiny run, feeds the fresh timings to the pure policies
  (:class:`~kubeai_train.straggler.SlowWorkerDetector`,
  :class:`~kubeai_train.straggler.AdaptiveBatchPolicy`) and, on a new plan, writes the plan
  variable ``[applies_from, k_0..k_{N-1} (new), k_0..k_{N-1} (in effect before)]``.
* **Every replica of a step uses the same plan.** A replica reads the global step ``t`` and the
  plan (in the run that takes its first micro-batch) and uses the new sizes when ``t >=
  applies_from``. The chief writes a plan during global step ``c`` with ``applies_from = c + 1``:
  no replica starts step ``c + 1`` before step ``c``'s gradients are applied, and that needs the
  chief's own gradient of step ``c``, which it pushes only after writing the plan. (The plan is
  made from the timings of step ``c - 2``: a timing travels with the next step.)
  One exception: SyncReplicasOptimizer starts with ``N`` spare tokens, so in the first steps a
  replica can run one step ahead; a step then may mix plans, which changes its row count, not
  the weight of a row (next point).
* **Unbiased gradients.** SyncReplicasOptimizer averages the ``N`` replicas' dense gradients
  (a ConditionalAccumulator divides by the number of gradients). A replica with ``n`` rows scales
  its mean loss by ``N n / G`` (:func:`kubeai_train.straggler.loss_weight`), i.e. its summed
  loss by ``N / G`` (:func:`weighted_loss`), so the average is the sum of row gradients over
  ``G``: the global-batch mean. Sparse (IndexedSlices) gradients need one more step: TF's
  SparseConditionalAccumulator divides each table row by the number of replicas whose batch
  touched *that row*, which no local factor can undo (it depends on the other replicas' ids).
  Adaptive training therefore builds those accumulators summing (:func:`summed_sparse_gradients`)
  and each replica divides its sparse gradients by ``N`` (:func:`scale_sparse`): the sum over
  replicas is again the sum of row gradients over ``G``. (Plain sync training keeps TF's
  per-row mean.)

A restarted chief resumes the policies: their state (plan, speeds, slow flags) is a string
variable under the trainer's state scope, written with each new plan and before each checkpoint,
so it is in the checkpoint and on the PS a restarted chief finds alive.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubeai_train.straggler import (
    AdaptiveBatchPolicy,
    SlowWorkerDetector,
    StragglerError,
    WorkerTiming,
    equal_batches,
)
from kubeai_train.tf.types import AdaptiveBatching, TrainError

__all__ = [
    "AdaptiveChief",
    "StragglerReport",
    "plan_vector",
    "scale_sparse",
    "summed_sparse_gradients",
    "units_for",
    "weighted_loss",
]


def weighted_loss(row_losses: Any, world: int, global_rows: int) -> Any:
    """The loss a replica differentiates: its per-row losses summed, times ``world /
    global_rows`` -- the weight ``world x n / global_rows`` on the mean of its ``n`` rows. After
    SyncReplicasOptimizer's average over ``world`` replicas the gradient is the sum of the row
    gradients over ``global_rows``, however the rows were split."""
    import tensorflow as tf

    if not isinstance(world, int) or world < 1 or not isinstance(global_rows, int) or global_rows < 1:
        raise TrainError(f"world and global_rows must be integers >= 1, got {world!r}, {global_rows!r}")
    return tf.reduce_sum(row_losses) * tf.constant(world / global_rows, row_losses.dtype)


@contextlib.contextmanager
def summed_sparse_gradients() -> Iterator[None]:
    """While open, SparseConditionalAccumulators are built with ``reduction_type="SUM"``: wrap
    ``SyncReplicasOptimizer.apply_gradients`` in it (it builds one per sparse gradient and offers
    no option; the default MEAN divides each row by how many replicas touched it)."""
    from tensorflow.python.training import sync_replicas_optimizer as sro

    original = sro.data_flow_ops
    # only the optimizer module's view changes (the class itself stays: its __init__ calls
    # super() by its global name)
    sro.data_flow_ops = _SummingSparse(original)  # type: ignore[assignment]
    try:
        yield
    finally:
        sro.data_flow_ops = original


class _SummingSparse:
    """``data_flow_ops`` as SyncReplicasOptimizer sees it, with summing sparse accumulators."""

    def __init__(self, module: Any) -> None:
        self._module = module
        self.SparseConditionalAccumulator = functools.partial(
            module.SparseConditionalAccumulator, reduction_type="SUM"
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def scale_sparse(grads_and_vars: Sequence[tuple[Any, Any]], world: int) -> list[tuple[Any, Any]]:
    """``grads_and_vars`` with every IndexedSlices gradient divided by ``world`` (summed over the
    replicas by :func:`summed_sparse_gradients` they then average like the dense ones)."""
    import tensorflow as tf

    out = []
    for g, v in grads_and_vars:
        if isinstance(g, tf.IndexedSlices):
            g = tf.IndexedSlices(g.values / tf.constant(world, g.values.dtype), g.indices, g.dense_shape)
        out.append((g, v))
    return out


def plan_vector(applies_from: int, new: Sequence[int], old: Sequence[int]) -> list[int]:
    """The plan variable's value: ``[applies_from, *new, *old]`` (micro-batches per replica)."""
    if len(new) != len(old):
        raise TrainError(f"a plan of {len(new)} replicas cannot follow one of {len(old)}")
    return [int(applies_from), *(int(k) for k in new), *(int(k) for k in old)]


def units_for(vector: Sequence[int], global_step: int, rank: int, world: int) -> int:
    """Micro-batches replica ``rank`` takes in the step it starts at ``global_step``."""
    if len(vector) != 1 + 2 * world:
        raise TrainError(
            f"the plan variable holds {len(vector)} values, a job of {world} replicas needs {1 + 2 * world}"
        )
    return int(vector[1 + rank] if global_step >= vector[0] else vector[1 + world + rank])


@dataclass
class StragglerReport:
    """What ``straggler="adaptive"`` did (the chief's view; in ``RunResult.straggler``).

    Attributes:
        micro_batch: rows of a micro-batch (the reader's ``batch_size``).
        global_batch: planned rows per step over all replicas.
        plans: ``{"step": first global step it applied to, "sizes": rows per replica}``, the
            initial equal plan first.
        detections: each change of the slow flags: ``{"step": the global step whose timings
            showed it, "reported_at": the last global step completed when it was known, "new":
            [...], "cleared": [...], "ratio": {replica: seconds-per-row over the others' median}}``.
        flagged: replicas flagged slow at the end.
        speeds: each replica's smoothed rows per compute-second at the end (None: not measured).
        applied: this process's own changes of micro-batches per step: ``{"global_step",
            "units"}`` (a worker's report holds only this and the sizes).
    """

    micro_batch: int
    global_batch: int
    plans: list[dict[str, Any]] = field(default_factory=list)
    detections: list[dict[str, Any]] = field(default_factory=list)
    flagged: list[int] = field(default_factory=list)
    speeds: list[float | None] = field(default_factory=list)
    applied: list[dict[str, int]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "micro_batch": self.micro_batch,
            "global_batch": self.global_batch,
            "plans": self.plans,
            "detections": self.detections,
            "flagged": self.flagged,
            "speeds": self.speeds,
            "applied": self.applied,
        }


class AdaptiveChief:
    """The chief's detector and batch policy, fed the timing slots it reads after each step.

    Args:
        options: the :class:`~kubeai_train.tf.types.AdaptiveBatching` settings.
        world: replicas in the job.
        micro_batch: rows of a reader batch (``g``).

    Pure Python (no TensorFlow): :meth:`observe` takes the slot values and the global step, and
    returns what to log and the plan vector to write, if any.
    """

    def __init__(self, options: AdaptiveBatching, world: int, micro_batch: int) -> None:
        self.options = options
        self.world = world
        self.micro_batch = micro_batch
        units = world * options.micro_batches
        self.policy = AdaptiveBatchPolicy(
            global_batch=units,
            world=world,
            replan_every=options.replan_every,
            hysteresis=options.hysteresis,
            min_local=1,
            smoothing=options.smoothing,
            reset_steps=options.slow_steps,
        )
        self.detector = SlowWorkerDetector(k=options.slow_factor, m=options.slow_steps)
        equal = list(equal_batches(units, world))
        self.vector = plan_vector(0, equal, equal)
        self.report = StragglerReport(micro_batch, units * micro_batch)
        self.report.plans.append({"step": 0, "sizes": [k * micro_batch for k in equal]})
        self._seen = [0.0] * world  # the newest local step of each replica's slot fed so far

    def observe(self, slots: Sequence[Sequence[float]], global_step: int) -> tuple[str, list[int] | None]:
        """Feed the timing slots (``(local step, rows, seconds)`` per replica) read at
        ``global_step``; a slot not newer than the last one fed counts as "no measurement".
        Returns the detector's log line ("" when nothing changed) and the new plan vector to
        write (applying from ``global_step + 1``), or None."""
        if len(slots) != self.world:
            raise TrainError(f"{len(slots)} timing slots for {self.world} replicas")
        timings = []
        for r, (seq, rows, seconds) in enumerate(slots):
            # changed, not greater: a restarted replica counts its local steps from 1 again
            fresh = seq != self._seen[r] and rows > 0 and seconds > 0
            if fresh:
                self._seen[r] = seq
            timings.append(
                WorkerTiming(r, int(round(rows)) if fresh else 0, float(seconds) if fresh else 0.0)
            )
        if not any(t.rows for t in timings):
            return "", None
        step = int(global_step) - 1  # the last completed step: what the timings are known at
        det = self.detector.observe(step, timings)
        if det.new or det.cleared:
            self.report.detections.append(
                {
                    "step": step - 1,  # a timing travels with the replica's next step
                    "reported_at": step,
                    "new": sorted(det.new),
                    "cleared": sorted(det.cleared),
                    "ratio": {w: round(x, 4) for w, x in det.ratio.items()},
                }
            )
        self.report.flagged = sorted(det.flagged)
        plan = self.policy.observe(step, timings, new=det.new, cleared=det.cleared)
        self.report.speeds = list(self.policy.speeds)
        if plan is None:
            return det.describe(), None
        in_effect = [units_for(self.vector, int(global_step), r, self.world) for r in range(self.world)]
        self.vector = plan_vector(int(global_step) + 1, plan.sizes, in_effect)
        self.report.plans.append(
            {"step": int(global_step) + 1, "sizes": [k * self.micro_batch for k in plan.sizes]}
        )
        return det.describe(), list(self.vector)

    def state_dict(self) -> dict[str, Any]:
        """The policies' state and the plan vector (JSON-serialisable)."""
        return {
            "policy": self.policy.state_dict(),
            "detector": self.detector.state_dict(),
            "vector": list(self.vector),
            "micro_batch": self.micro_batch,
        }

    def load_state_dict(self, state: Mapping[str, Any], global_step: int) -> None:
        """Resume a saved state at ``global_step``; a state of another shape (replicas, batch
        size, micro-batches) raises TrainError naming it."""
        if int(state.get("micro_batch", -1)) != self.micro_batch:
            raise TrainError(
                f"the saved adaptive plan is in micro-batches of {state.get('micro_batch')!r} rows, this "
                f"run reads {self.micro_batch}; resume with the same batch_size"
            )
        vector = [int(v) for v in state.get("vector", ())]
        if len(vector) != 1 + 2 * self.world:
            raise TrainError(
                f"the saved adaptive plan is for {(len(vector) - 1) // 2} replicas, this job has {self.world}"
            )
        try:
            self.policy.load_state_dict(dict(state["policy"]))
            self.detector.load_state_dict(dict(state["detector"]))
        except (KeyError, StragglerError) as e:
            raise TrainError(f"cannot resume the adaptive batch plan: {e}") from e
        self.vector = vector
        self.report.plans = [{"step": int(global_step), "sizes": self.sizes()}]
        self.report.flagged = sorted(self.detector.flagged)

    def sizes(self) -> list[int]:
        """Rows per replica of the newest plan."""
        return [k * self.micro_batch for k in self.vector[1 : 1 + self.world]]
