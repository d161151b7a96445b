"""Placement policies every mode can use, and the check that a plan fits the cluster.

A policy (:class:`~kubeai_train.tf.types.PlacementPolicy`) is a pure function of a snapshot of the
variables (:class:`~kubeai_train.tf.types.VariableInfo`) returning a
:class:`~kubeai_train.tf.types.PlacementPlan`; each mode takes the snapshot and applies the plan
its own way (:mod:`kubeai_train.tf.between_graph.placement`: ``replica_device_setter``;
:mod:`kubeai_train.tf.coordinator.placement`: a variable-creator scope). :class:`RoundRobinPlacement`
is TensorFlow's own default, :class:`GreedyBytesPlacement` the baseline for the ``balance/``
planner.
"""

from __future__ import annotations

from collections.abc import Sequence

from kubeai_train.tf.types import PlacementError, PlacementPlan, PlacementPolicy, VariableInfo

__all__ = ["GreedyBytesPlacement", "RoundRobinPlacement", "check_plan"]


class RoundRobinPlacement(PlacementPolicy):
    """Variable i (in creation order) goes to PS ``i % num_ps``: TensorFlow's own default."""

    name = "round_robin"

    def plan(self, variables: Sequence[VariableInfo], num_ps: int) -> PlacementPlan:
        return PlacementPlan({v.name: i % num_ps for i, v in enumerate(variables)}, num_ps, self.name)


class GreedyBytesPlacement(PlacementPolicy):
    """Largest variable first onto the least-loaded PS (by bytes, ties to the lowest task).

    A baseline for the load-balancing planner: it evens bytes but ignores per-step traffic.
    """

    name = "greedy_bytes"

    def plan(self, variables: Sequence[VariableInfo], num_ps: int) -> PlacementPlan:
        load = [0] * num_ps
        out: dict[str, int] = {}
        for v in sorted(variables, key=lambda v: (-v.nbytes, v.name)):
            task = min(range(num_ps), key=lambda t: (load[t], t))
            out[v.name] = task
            load[task] += v.nbytes
        return PlacementPlan(out, num_ps, self.name)


def check_plan(plan: PlacementPlan, variables: Sequence[VariableInfo], num_ps: int) -> None:
    """Raise PlacementError unless ``plan`` is for ``num_ps`` servers and places every variable."""
    if plan.num_ps != num_ps:
        raise PlacementError(
            f"policy {plan.policy!r} planned for {plan.num_ps} PS but the cluster has {num_ps}"
        )
    plan.validate(variables)
