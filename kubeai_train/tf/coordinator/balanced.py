"""The ``balanced`` plan applied under ParameterServerStrategy, and per-PS load measured live.

Planning: :func:`plan_build` runs the user's ``build`` once uncut in a throw-away graph (the
whole variables, in creation order), gives their loads to the planner
(:class:`kubeai_train.tf.balanced.BalancedPlacement`), and hands the shard count of every
variable to a :class:`PlanPartitioner`. ParameterServerStrategy asks its ``variable_partitioner``
once per variable of rank >= 1 that is not colocated with another one, in creation order, with
only ``(shape, dtype)``: so the partitioner answers by creation order and checks each shape
against the planning pass (a mismatch: one warning, no more cuts, and ``verify`` reports where
everything went). A second planning pass with that partitioner lists the shards exactly as the
strategy cuts them, which is what :class:`~kubeai_train.tf.coordinator.placement.PlanApplier`
places.

Measuring: :func:`resident_bytes` sums the bytes of the live variables (shards, optimizer slots,
the step counter) by the device TensorFlow reports for each. :class:`TrafficMeter` counts, inside
every training step, the bytes the step exchanges with each variable, from the actual batch: an
embedding shard moves ``(n + 3u) x row bytes`` (``n`` ids routed to it gathered in the forward
pass; ``u`` distinct rows: the Adagrad accumulator's rows sent, read back, and the update sent),
a dense variable ``4 x its bytes`` (read, accumulator sent and read back, update sent). The sums
live in one small int64 vector on PS 0 (``assign_add`` per step); per-step figures are the sums
over the steps counted. Re-run closures (a lost worker) count twice; gRPC framing is not counted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from kubeai_train.balance import Plan as BalancePlan
from kubeai_train.balance.types import VariableLoad
from kubeai_train.tf.balanced import BalancedPlacement, loads_of
from kubeai_train.tf.coordinator.placement import Planned, snapshot_build
from kubeai_train.tf.types import PlacementError, PlacementPlan

__all__ = [
    "PlanPartitioner",
    "TrafficMeter",
    "plan_build",
    "planned_loads",
    "resident_bytes",
    "whole_loads",
]

log = logging.getLogger("kubeai_train.tf")


class PlanPartitioner:
    """A ``variable_partitioner`` that cuts the ``i``-th partitionable variable into ``counts[i]``.

    Before :meth:`bind` (and for variables beyond the plan) it cuts nothing. Call :meth:`reset`
    before each pass that creates the model's variables.
    """

    def __init__(self) -> None:
        self.expected: list[tuple[tuple[int, ...], int]] = []
        self.broken: str | None = None
        self._next = 0

    def bind(self, expected: Sequence[tuple[tuple[int, ...], int]]) -> None:
        """``expected[i] = (shape, shards)`` of the ``i``-th variable the strategy will ask about."""
        self.expected = list(expected)
        self.reset()

    def reset(self) -> None:
        self._next = 0
        self.broken = None

    def __call__(self, shape: Any, dtype: Any = None, axis: int = 0) -> list[int]:
        dims = tuple(int(d) for d in tf.TensorShape(shape).as_list())
        rank = max(len(dims), 1)
        i = self._next
        self._next += 1
        if self.broken is not None or i >= len(self.expected):
            return [1] * rank
        want, count = self.expected[i]
        if dims != want:
            self.broken = f"variable #{i} has shape {dims}, the planning pass saw {want}"
            log.warning("balanced partitioner: %s; not cutting it or any later variable", self.broken)
            return [1] * rank
        return [count] + [1] * (rank - 1)


def whole_loads(
    whole: Sequence[Planned], batch_size: int, slots: int = 1
) -> tuple[list[VariableLoad], dict[str, str]]:
    """The load model of every uncut variable, and each one's kind.

    A trainable variable whose name contains ``emb`` (``emb_v``, ``user_embedding``) is an
    embedding table (looked up by id); other trainables are dense; non-trainables are state.
    """
    out, kinds = [], {}
    for p in whole:
        if not p.trainable:
            kind = "state"
        elif "emb" in p.name.lower() and len(p.shape) >= 1:
            kind = "embedding"
        else:
            kind = "dense"
        size = tf.as_dtype(p.dtype).size
        out.append(loads_of(p.name, p.shape, size, p.dtype, kind=kind, batch_size=batch_size, slots=slots))
        kinds[p.name] = kind
    return out, kinds


def plan_build(
    build: Callable[[], Any],
    policy: BalancedPlacement,
    partitioner: PlanPartitioner,
    num_ps: int,
    batch_size: int,
) -> tuple[list[Planned], PlacementPlan, BalancePlan]:
    """Plan ``build``'s variables and bind ``partitioner`` to the plan's shard counts.

    Returns:
        The shards as the strategy will create them (for ``PlanApplier``), the TF plan, and the
        planner's plan (with its per-PS loads and lower bound).

    Raises:
        PlacementError: the planner rejected the variables, or the cut pass disagrees with it.
    """
    whole = snapshot_build(build, None)
    loads, _ = whole_loads(whole, batch_size)
    bplan = policy.balance_plan(loads, num_ps)
    counts = bplan.shard_counts()
    partitioner.bind([(p.shape, counts.get(p.name, 1)) for p in whole if p.shape])
    planned = snapshot_build(build, partitioner)
    partitioner.reset()
    plan = PlacementPlan(bplan.assignment(), num_ps, policy.name)
    names = {p.name for p in planned}
    if names != set(plan.assignment):
        extra, missing = sorted(names - set(plan.assignment)), sorted(set(plan.assignment) - names)
        raise PlacementError(
            f"balanced placement: the cut model has variables {extra[:3]} the plan lacks and the plan "
            f"has {missing[:3]} the model lacks; variable names must be unique (tf.Module name scopes)"
        )
    return planned, plan, bplan


def _task(device: str) -> int | None:
    spec = tf.DeviceSpec.from_string(device or "")
    return spec.task if spec.job == "ps" and spec.task is not None else None


def resident_bytes(variables: Sequence[Any], num_ps: int) -> list[int]:
    """Bytes of ``variables`` (live ``tf.Variable`` objects) per PS task, by their real device."""
    out = [0] * num_ps
    for v in variables:
        task = _task(v.device)
        if task is not None and 0 <= task < num_ps:
            out[task] += int(v.shape.num_elements() or 0) * v.dtype.size
    return out


class TrafficMeter:
    """Bytes each training step exchanges with each PS, counted in the step from the real batch.

    Create it under the strategy's scope (its counter vector goes on PS 0 with the caller's
    ``pinned(0)``), call :meth:`record` in the step with the gradients and their variables, and
    :meth:`per_ps` after training.
    """

    def __init__(self, variables: Sequence[Any], extra: Sequence[tuple[Any, int]] = ()) -> None:
        self.variables = list(variables)
        self.extra = list(extra)  # (variable, bytes per step): the step counter
        n = 1 + len(self.variables) + len(self.extra)
        self.counts = tf.Variable(tf.zeros([n], tf.int64), trainable=False, name="kubeai_traffic")

    def record(self, grads: Sequence[Any]) -> Any:
        """The op adding this step's bytes (call once per step, after the gradients)."""
        parts: list[Any] = [tf.constant(1, tf.int64)]
        for g, v in zip(grads, self.variables, strict=True):
            size = v.dtype.size
            if g is None:
                parts.append(tf.constant(0, tf.int64))
            elif isinstance(g, tf.IndexedSlices):
                row = math.prod(int(d) for d in v.shape[1:]) * size
                n = tf.size(g.indices, out_type=tf.int64)
                u = tf.size(tf.unique(g.indices)[0], out_type=tf.int64)
                parts.append((n + 3 * u) * row)
            else:
                parts.append(tf.constant(4 * int(v.shape.num_elements() or 0) * size, tf.int64))
        parts.extend(tf.constant(b, tf.int64) for _, b in self.extra)
        return self.counts.assign_add(tf.stack(parts))

    def per_ps(
        self, num_ps: int, counts: Sequence[int] | None = None, devices: Sequence[str] | None = None
    ) -> tuple[int, list[float]]:
        """``(steps counted, mean bytes per step per PS task)``.

        ``counts`` defaults to the counter's value and ``devices`` (one per variable given, then
        one per ``extra``) to the variables' real devices.
        """
        counts = [int(c) for c in (self.counts.numpy() if counts is None else counts)]
        if devices is None:
            devices = [v.device for v in self.variables] + [v.device for v, _ in self.extra]
        steps = counts[0]
        out = [0.0] * num_ps
        for dev, c in zip(devices, counts[1:], strict=True):
            task = _task(dev)
            if task is not None and 0 <= task < num_ps:
                out[task] += c / steps if steps else 0.0
        return steps, out


def planned_loads(
    planned: Sequence[Planned], plan: PlacementPlan, batch_size: int, slots: int = 1
) -> tuple[list[float], list[float]]:
    """Per-PS resident bytes and traffic of ``plan`` under the load model, for any policy.

    Each shard carries its variable's load pro rata rows (the planner's model), so round-robin,
    greedy-by-bytes and balanced plans are compared on the same model.
    """
    groups: dict[str, list[Planned]] = {}
    for p in planned:
        key = p.name.rsplit("/part_", 1)[0] if p.partitioned else p.name
        groups.setdefault(key, []).append(p)
    whole = [
        Planned(
            key,
            key,
            (sum(s.shape[0] for s in parts), *parts[0].shape[1:]) if parts[0].shape else (),
            parts[0].dtype,
            parts[0].trainable,
            False,
        )
        for key, parts in groups.items()
    ]
    loads, _ = whole_loads(whole, batch_size, slots)
    mem = [0.0] * plan.num_ps
    tr = [0.0] * plan.num_ps
    for load, (_, parts) in zip(loads, groups.items(), strict=True):
        for s in parts:
            frac = (s.shape[0] / load.rows) if s.shape else 1.0
            task = plan.assignment[s.name]
            mem[task] += float(load.nbytes) * frac
            tr[task] += load.traffic * frac
    return mem, tr
