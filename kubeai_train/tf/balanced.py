"""The ``balanced`` placement policy for TensorFlow: the ``balance/`` planner behind the TF hooks.

Round-robin and greedy-by-bytes only choose a PS for shards someone else cut; ``balanced`` also
decides how many shards each embedding table gets, so the policy and the partitioner must agree.
TensorFlow's partitioners cut a variable evenly along dim 0 (the first ``rows % n`` shards get a
row more) and cannot be told other row counts, so the planner runs with ``rows="even"``: it
decides each table's shard count and each shard's PS, and the rows follow TensorFlow's cut.
Dense weights and state are never cut (a Keras kernel does not survive being a ShardedVariable
everywhere; they are placed whole). The planner is deterministic (sorted by names, no hash
order), so every role of a job that sees the same variables computes the same plan.

This module is mode-independent; the coordinator mode's partitioner that cuts at the plan's
counts lives in :mod:`kubeai_train.tf.coordinator.balanced`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from kubeai_train.balance import Plan as BalancePlan
from kubeai_train.balance import Planner, RebalancePolicy
from kubeai_train.balance.load import from_variable_infos
from kubeai_train.balance.types import BalanceError, VariableLoad, max_over_mean
from kubeai_train.tf.placement_policies import GreedyBytesPlacement, RoundRobinPlacement
from kubeai_train.tf.types import PlacementError, PlacementPlan, PlacementPolicy, VariableInfo

__all__ = ["POLICIES", "BalancedPlacement", "load_report", "placement_policy"]

#: Placement policies by name (``--placement``, ``run(placement="balanced")``).
POLICIES = ("round_robin", "greedy_bytes", "balanced")


class BalancedPlacement(PlacementPolicy):
    """Shard counts and PS of every variable from :class:`kubeai_train.balance.Planner` (``rows="even"``).

    Args:
        tolerance: the planner stops cutting finer within this fraction of the lower bound.
        capacities: per-PS memory capacities in bytes (default: equal, unlimited).
        rebalance: re-place shards while training when a PS stays hot (between-graph mode,
            asynchronous; see ``kubeai_train.tf.between_graph.rebalancing``): True for the
            default rule (traffic max/mean over 1.10 for 3 windows, target 1.05), or a
            :class:`kubeai_train.balance.RebalancePolicy`.
        window_steps: the chief's steps per measured window.
    """

    name = "balanced"

    def __init__(
        self,
        tolerance: float = 0.02,
        capacities: Sequence[int] | None = None,
        *,
        rebalance: bool | RebalancePolicy = False,
        window_steps: int = 50,
    ) -> None:
        self.planner = Planner(rows="even", tolerance=tolerance)
        self.capacities = tuple(capacities) if capacities else None
        self.last: BalancePlan | None = None
        if isinstance(rebalance, RebalancePolicy):
            self.rebalance: RebalancePolicy | None = rebalance
        elif rebalance is True:
            self.rebalance = RebalancePolicy(cuts="even")  # TF1 partitions evenly: no uneven re-cuts
        elif rebalance is False or rebalance is None:
            self.rebalance = None
        else:
            raise PlacementError(f"rebalance must be True, False or a RebalancePolicy, got {rebalance!r}")
        if not isinstance(window_steps, int) or isinstance(window_steps, bool) or window_steps < 1:
            raise PlacementError(f"window_steps must be an integer >= 1, got {window_steps!r}")
        self.window_steps = window_steps

    def balance_plan(self, loads: Sequence[VariableLoad], num_ps: int) -> BalancePlan:
        """The planner's plan for whole variables (what the partitioner must then cut).

        Raises:
            PlacementError: the planner rejected the input (one line naming the value).
        """
        try:
            plan = self.planner.plan(loads, num_ps, self.capacities)
        except BalanceError as e:
            raise PlacementError(f"balanced placement: {e}") from e
        self.last = plan
        return plan

    def plan(self, variables: Sequence[VariableInfo], num_ps: int) -> PlacementPlan:
        """A plan for a snapshot; shards of one partitioned variable are merged and cut anew.

        The returned assignment names shards ``<variable>/part_<i>`` for the plan's shard counts
        (``self.last.shard_counts()``); a snapshot taken with other cuts has other names, so the
        caller must build with a partitioner cutting at those counts.
        """
        loads = [_cuttable(v) for v in from_variable_infos(variables)]
        plan = self.balance_plan(loads, num_ps)
        return PlacementPlan(plan.assignment(), num_ps, self.name)


def _cuttable(v: VariableLoad) -> VariableLoad:
    """Only embedding tables are cut (see the module doc)."""
    return dataclasses.replace(v, splittable=v.kind == "embedding" and v.rows > 1)


def loads_of(
    name: str,
    shape: tuple[int, ...],
    dtype_size: int,
    dtype: str,
    *,
    kind: str,
    batch_size: int,
    slots: int,
) -> VariableLoad:
    """The load model of one whole TF variable (see :mod:`kubeai_train.balance.load`).

    Embedding tables: ``batch_size`` lookups of uniformly spread (hashed) ids, so the expected
    distinct rows per step are ``rows * (1 - (1 - 1/rows)^batch_size)``, each pulled and its
    gradient pushed; optimizer ``slots`` of the variable's shape count in the resident bytes.
    """
    n = math.prod(shape)
    nbytes = n * dtype_size
    if kind == "state":
        return VariableLoad(name, shape, dtype, "state", nbytes, 2.0 * nbytes, splittable=False)
    resident = nbytes * (1 + slots)
    if kind == "embedding" and shape:
        rows = shape[0]
        row = nbytes / rows
        unique = rows * -math.expm1(batch_size * math.log1p(-1.0 / rows)) if rows > 1 else 1.0
        traffic = 2.0 * min(unique, rows) * row
        return VariableLoad(name, shape, dtype, "embedding", resident, traffic, splittable=rows > 1)
    return VariableLoad(name, shape, dtype, "dense", resident, 2.0 * nbytes, splittable=False)


def placement_policy(policy: PlacementPolicy | str | None) -> PlacementPolicy:
    """A policy instance from a policy or its name (None: round-robin, TensorFlow's default).

    Raises:
        PlacementError: an unknown name.
    """
    if policy is None:
        return RoundRobinPlacement()
    if isinstance(policy, PlacementPolicy):
        return policy
    if policy == "round_robin":
        return RoundRobinPlacement()
    if policy == "greedy_bytes":
        return GreedyBytesPlacement()
    if policy == "balanced":
        return BalancedPlacement()
    raise PlacementError(
        f"placement must be one of {', '.join(POLICIES)} or a PlacementPolicy, got {policy!r}"
    )


def load_report(
    report: Mapping[str, Any],
    planned: tuple[Sequence[float], Sequence[float]],
    measured: tuple[Sequence[float], Sequence[float]] | None,
    steps: int = 0,
) -> dict[str, Any]:
    """``report`` with ``planned_bytes`` / ``planned_traffic`` (and the measured ones) per PS.

    The ``ps`` entries keep their other keys; ``max_over_mean`` gets the planned and measured
    ratios of both dimensions.
    """
    out = dict(report)
    ps = []
    for t, entry in enumerate(report["ps"]):
        e = dict(entry)
        e["planned_bytes"], e["planned_traffic"] = float(planned[0][t]), float(planned[1][t])
        if measured is not None:
            e["measured_bytes"], e["measured_traffic"] = float(measured[0][t]), float(measured[1][t])
        ps.append(e)
    out["ps"] = ps
    ratios: dict[str, Any] = {
        "planned": {"memory": max_over_mean(planned[0]), "traffic": max_over_mean(planned[1])}
    }
    if measured is not None:
        ratios["measured"] = {"memory": max_over_mean(measured[0]), "traffic": max_over_mean(measured[1])}
        out["measured"] = {"steps": steps, "method": "step-counted tensors per variable device"}
    out["max_over_mean"] = ratios
    return out


#: The per-PS fields of the measured report that the log line shows.
LOAD_KEYS = ("task", "planned_bytes", "planned_traffic", "measured_bytes", "measured_traffic")


def measured_line(report: Mapping[str, Any], steps: int) -> str:
    """The one log line of a measured placement report (both modes' chiefs log it)."""
    return (
        f"placement {report['policy']} measured over {steps} steps "
        f"(max/mean {json.dumps(report['max_over_mean'], sort_keys=True)}): "
        + json.dumps([{k: e[k] for k in LOAD_KEYS} for e in report["ps"]])
    )
