"""Runtime re-placement in between-graph mode: a PS that stays hot gets shards moved off it.

With ``BalancedPlacement(rebalance=True)`` the chief feeds
:class:`kubeai_train.balance.RebalancePolicy` one window of measured per-shard traffic every
``window_steps`` of its steps (its :class:`TrafficCounter`: ids routed to each embedding shard
and rows it sent back, dense variables read and written whole). When the busiest PS stays over
the threshold for the policy's windows, the new placement is applied as a job restart inside
the running processes, losing no update:

1. the chief writes the new plan to ``placement_plan.json`` in the model directory (what every
   role plans from when it builds its graph) and raises the job's re-placement generation (a
   variable on PS 0);
2. each worker sees it at its next ``log_steps`` boundary, reports itself parked and rebuilds
   its graph from the new plan, then waits for the chief as at start-up;
3. once every worker is parked (or ``ready_timeout`` passed: a worker's updates after the
   checkpoint are then undone, and its rows read again from the checkpoint's position), the
   chief checkpoints (model and every reader position), clears the job's variables on every PS
   (``Session.reset``: the old shards free their memory) and rebuilds;
4. the new chief restores the checkpoint into the new placement (TensorFlow restores a
   partitioned variable by its full name and slices) and the workers continue.

TF1 partitioners cut a variable into even parts, so the policy runs with ``cuts="even"``: whole
shards move or swap, and a hot variable may be re-cut into more even shards (up to one per PS;
TensorFlow restores the checkpoint of the old partitioning into the new one), but never into
uneven ones. The pause (decision to the new
chief ready), bytes moved and the policy's lower bound on them are logged and kept in the plan
file's history, which the placement report (and the published metadata) carries as
``"rebalances"``. Asynchronous training only (``sync=True`` ignores it, with a warning).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from kubeai_train.balance import RebalancePolicy
from kubeai_train.balance.rebalance import RebalanceDecision
from kubeai_train.balance.types import BalanceError, Plan, Shard

__all__ = ["PLAN_FILE", "LiveRebalancer", "plan_from_json", "plan_to_json"]

PLAN_FILE = "placement_plan.json"


def plan_to_json(plan: Plan) -> dict[str, Any]:
    """Every shard with its rows, PS, bytes and traffic (what :func:`plan_from_json` reads)."""
    return {
        "num_ps": plan.num_ps,
        "policy": plan.policy,
        "lower_bound": plan.lower_bound,
        "capacities": list(plan.capacities),
        "total_bytes": plan.total_bytes,
        "total_traffic": plan.total_traffic,
        "shards": [
            {
                "variable": s.variable,
                "index": s.index,
                "offset": s.offset,
                "rows": s.rows,
                "ps": s.ps,
                "nbytes": s.nbytes,
                "traffic": s.traffic,
            }
            for s in plan.shards
        ],
    }


def plan_from_json(doc: Mapping[str, Any]) -> Plan:
    """The plan :func:`plan_to_json` wrote.

    Raises:
        BalanceError: not such a document (one line naming what is wrong).
    """
    try:
        shards = tuple(
            Shard(
                str(s["variable"]),
                int(s["index"]),
                int(s["offset"]),
                int(s["rows"]),
                int(s["ps"]),
                float(s["nbytes"]),
                float(s["traffic"]),
            )
            for s in doc["shards"]
        )
        return Plan(
            num_ps=int(doc["num_ps"]),
            shards=shards,
            lower_bound=float(doc["lower_bound"]),
            capacities=tuple(int(c) for c in doc.get("capacities") or ()),
            policy=str(doc.get("policy", "balanced")),
            total_bytes=float(doc.get("total_bytes", 0.0)),
            total_traffic=float(doc.get("total_traffic", 0.0)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise BalanceError(f"{PLAN_FILE}: not a placement plan ({type(e).__name__}: {e})") from None


class LiveRebalancer:
    """Windows of one trainer's measured per-shard traffic into a :class:`RebalancePolicy`.

    Args:
        plan: the placement in force.
        names: the TensorFlow name of each counted variable, in the counter's order.
        window_steps: steps per window.
        policy: the decision rule (default: threshold 1.10 for 3 windows, target 1.05, even
            re-cuts and whole-shard moves only).
    """

    def __init__(
        self,
        plan: Plan,
        names: Sequence[str],
        window_steps: int = 50,
        policy: RebalancePolicy | None = None,
    ) -> None:
        if not isinstance(window_steps, int) or window_steps < 1:
            raise BalanceError(f"rebalance window_steps must be an integer >= 1, got {window_steps!r}")
        self.plan = plan
        self.policy = policy or RebalancePolicy(cuts="even")
        self.policy.reset()
        self.window_steps = window_steps
        known = set(plan.assignment())
        # counter slots that are shards of the plan (the step counter and the global step are not)
        self.slots = [(i, n) for i, n in enumerate(names) if n in known]
        self._last: list[int] | None = None
        self._last_steps = 0

    def window(self, counts: Sequence[int]) -> RebalanceDecision | None:
        """Feed the counter's totals (``counts[0]`` = steps, then one per variable); returns the
        decision when a window is complete, else None."""
        steps = int(counts[0])
        if self._last is None:
            self._last, self._last_steps = list(counts), steps
            return None
        if steps - self._last_steps < self.window_steps:
            return None
        n = steps - self._last_steps
        traffic = {name: (counts[1 + i] - self._last[1 + i]) / n for i, name in self.slots}
        self._last, self._last_steps = list(counts), steps
        return self.policy.observe(self.plan, traffic)


def history_entry(
    decision: RebalanceDecision, old: Plan, generation: int, global_step: int
) -> dict[str, Any]:
    """What the plan file (and then the placement report) records of one re-placement."""
    before = old.assignment()
    after = decision.plan.assignment() if decision.plan is not None else {}
    moved = [f"{n}: ps {before[n]} -> ps {t}" for n, t in sorted(after.items()) if before.get(n, t) != t]
    if decision.plan is not None:
        # a re-cut variable's shards have new names: say how its rows were cut and placed
        was, now = old.rows(), decision.plan.rows()
        for v in sorted(now):
            if len(now[v]) != len(was.get(v, now[v])):
                shards = [f"{s.rows} rows on ps {s.ps}" for s in decision.plan.shards if s.variable == v]
                moved.append(f"{v}: re-cut from {len(was[v])} to {len(now[v])} shards ({', '.join(shards)})")
    return {
        "generation": generation,
        "global_step": global_step,
        "decided_at": time.time(),
        "reason": decision.reason,
        "bytes_moved": decision.bytes_moved,
        "min_bytes": decision.min_bytes,
        "before": decision.before,
        "after": decision.after,
        "moved": moved,
    }
