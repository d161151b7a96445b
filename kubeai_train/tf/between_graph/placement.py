"""Placement in a between-graph job: the snapshot a policy sees, and the bridge to
``replica_device_setter``.

:func:`snapshot` takes the snapshot from a graph built in a throw-away pass; :class:`PlanStrategy`
is the callable ``ps_strategy`` that applies a plan while the real graph is built;
:func:`actual_placement` reads back where every variable really went, which is what
:func:`placement_report` shows. The policies themselves are in
:mod:`kubeai_train.tf.placement_policies`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from kubeai_train.tf.types import PlacementError, PlacementPlan, VariableInfo

__all__ = ["PlanStrategy", "actual_placement", "placement_report", "snapshot"]

_PART = re.compile(r"/part_\d+$")
_DTYPE_BYTES = {"float32": 4, "float64": 8, "int32": 4, "int64": 8, "float16": 2, "bfloat16": 2, "bool": 1}


def _kind(name: str, op_type: str) -> str:
    if name.startswith("kubeai/") or "global_step" in name or op_type not in ("VarHandleOp", "VariableV2"):
        return "state"
    if _PART.search(name) or "emb" in name.lower():
        return "embedding"
    return "dense"


def snapshot(graph: Any, batch_size: int = 512) -> list[VariableInfo]:
    """The variables of ``graph`` (creation order) as a policy sees them.

    Variables colocated with another one (optimizer slots: Adagrad accumulators, Adam moments)
    are not placed on their own: they follow their primary, so their bytes and traffic are added
    to the primary's entry. Per-step traffic is estimated as twice (read + update) the full
    variable for dense weights and ``batch_size`` looked-up rows for embedding shards.
    """
    infos: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    # local variables (e.g. SyncReplicasOptimizer's local step) live on the trainer, not a PS
    local = {v.op.name for v in graph.get_collection("local_variables")}
    for op in graph.get_operations():
        if op.type not in ("VarHandleOp", "VariableV2") or op.name in local:
            continue
        shape = tuple(int(d.size) for d in op.get_attr("shape").dim)
        dtype = op.get_attr("dtype").name
        n = 1
        for d in shape:
            n *= max(d, 0)
        nbytes = n * _DTYPE_BYTES.get(dtype, 8)
        groups = [g.decode()[len("loc:@") :] for g in op.colocation_groups()]
        primary = next((g for g in groups if g != op.name and g in infos), None)
        kind = _kind(op.name, op.type)
        sparse = kind == "embedding" or (primary is not None and infos[primary]["kind"] == "embedding")
        row_bytes = nbytes // shape[0] if shape and shape[0] else nbytes
        traffic = 2.0 * (min(nbytes, batch_size * row_bytes) if sparse else nbytes)
        if primary is not None:
            infos[primary]["nbytes"] += nbytes
            infos[primary]["traffic"] += traffic
            continue
        infos[op.name] = {"shape": shape, "dtype": dtype, "nbytes": nbytes, "traffic": traffic, "kind": kind}
        order.append(op.name)
    return [
        VariableInfo(
            name,
            i["shape"],
            i["dtype"],
            i["nbytes"],
            traffic=i["traffic"],
            kind=i["kind"],
            group=_PART.sub("", name),
        )
        for name in order
        for i in [infos[name]]
    ]


class PlanStrategy:
    """The ``ps_strategy`` callable for ``replica_device_setter``: looks each variable op up in a plan.

    A variable the plan does not know (created after the snapshot, e.g. by an optimizer wrapper)
    falls back to round-robin over the ops seen so far, and is recorded in :attr:`unplanned`.
    """

    def __init__(self, plan: PlacementPlan, pinned: Callable[[str], int | None] | None = None) -> None:
        self.plan = plan
        self.pinned = pinned
        self.unplanned: list[str] = []
        self._next = 0

    def __call__(self, op: Any) -> int:
        name = op.name
        if self.pinned is not None:
            pin = self.pinned(name)
            if pin is not None:
                return pin
        task = self.plan.assignment.get(name)
        if task is None:
            # an optimizer slot ("<variable>/Adagrad"): TensorFlow colocates it with its variable
            # after asking us, so answer the variable's task and do not count it as unplanned
            prefix = name
            while "/" in prefix:
                prefix = prefix.rsplit("/", 1)[0]
                if prefix in self.plan.assignment:
                    return self.plan.assignment[prefix]
        if task is None:
            task = self._next % self.plan.num_ps
            self._next += 1
            self.unplanned.append(name)
        return task


def actual_placement(graph: Any) -> dict[str, str]:
    """Variable op name -> the device it was really placed on, read from the built graph."""
    return {op.name: op.device for op in graph.get_operations() if op.type in ("VarHandleOp", "VariableV2")}


def placement_report(plan: PlacementPlan, variables: Sequence[VariableInfo], graph: Any) -> dict[str, Any]:
    """The plan's per-PS bytes and traffic plus the devices the variables really got.

    Raises:
        PlacementError: a variable landed on a different PS than the plan said.
    """
    report = plan.report(variables)
    devices = actual_placement(graph)
    mismatched = []
    for name, task in plan.assignment.items():
        dev = devices.get(name, "")
        if dev and f"/job:ps/task:{task}" not in dev:
            mismatched.append((name, task, dev))
    if mismatched:
        raise PlacementError(
            f"{len(mismatched)} variables are not where the plan put them, e.g. {mismatched[:2]}"
        )
    report["devices"] = devices
    report["groups"] = _groups(variables, plan)
    return report


def _groups(variables: Sequence[VariableInfo], plan: PlacementPlan) -> dict[str, dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for v in variables:
        if v.kind not in ("embedding", "dense"):
            continue
        g = groups.setdefault(v.group, {"kind": v.kind, "shards": {}, "bytes": 0})
        g["shards"][v.name] = plan.assignment[v.name]
        g["bytes"] += v.nbytes
    return groups
