"""Contracts of PS load balancing: the load model of a variable, a plan, and the errors.

Everything here is plain data with no TensorFlow: a :class:`VariableLoad` is what the planner
sees of one variable (resident bytes with optimizer slots, bytes moved per step, how it may be
cut), a :class:`Plan` is what it decides (shards, their rows, their parameter server, and the
lower bound no plan can beat). Loads scale linearly with a shard's rows: hashed ids spread hot
rows evenly over a table, so a contiguous row range carries its share of the table's traffic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "KINDS",
    "BalanceError",
    "Plan",
    "Shard",
    "VariableLoad",
]

#: The kinds of variables: ``embedding`` (rows looked up by id), ``dense`` (pulled and pushed
#: whole each step), ``state`` (step counters, reader positions: tiny and never split).
KINDS = ("embedding", "dense", "state")


class BalanceError(ValueError):
    """Bad input to the load model, the planner or the rebalancer; one line naming the value."""


@dataclass(frozen=True)
class VariableLoad:
    """One variable as the planner sees it; the fields of ``kubeai_train.tf.VariableInfo``.

    Attributes:
        name: the variable's name (a partitioned variable's name without ``/part_N``).
        shape: its full shape; dim 0 is the one shards cut (a scalar has one indivisible row).
        dtype: its dtype name, e.g. ``"float32"``.
        kind: one of :data:`KINDS`.
        nbytes: resident bytes on the PS, optimizer slots included.
        traffic: bytes moved per training step (pull + push).
        splittable: whether shards may cut it along dim 0 (default: every embedding / dense
            variable with more than one row; ``state`` never).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    kind: str = "dense"
    nbytes: int | float = 0
    traffic: float = 0.0
    splittable: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise BalanceError(f"variable name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "shape", tuple(self.shape))
        for d in self.shape:
            if not isinstance(d, int) or isinstance(d, bool) or d < 0:
                raise BalanceError(
                    f"variable {self.name!r}: shape must be integers >= 0, got {list(self.shape)}"
                )
        if self.shape and self.shape[0] == 0:
            raise BalanceError(f"variable {self.name!r}: shape[0] must be >= 1, got {list(self.shape)}")
        if self.kind not in KINDS:
            raise BalanceError(
                f"variable {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}"
            )
        if not isinstance(self.nbytes, int | float) or isinstance(self.nbytes, bool) or not self.nbytes >= 0:
            raise BalanceError(f"variable {self.name!r}: nbytes must be >= 0, got {self.nbytes!r}")
        t = self.traffic
        if not isinstance(t, int | float) or isinstance(t, bool) or not (t >= 0 and math.isfinite(t)):
            raise BalanceError(f"variable {self.name!r}: traffic must be a finite number >= 0, got {t!r}")
        if self.splittable is None:
            object.__setattr__(self, "splittable", self.kind != "state" and self.rows > 1)
        elif self.splittable and (self.kind == "state" or self.rows < 2):
            raise BalanceError(
                f"variable {self.name!r}: a {self.kind} variable of {self.rows} row(s) cannot be split"
            )

    @property
    def rows(self) -> int:
        """Rows along dim 0 (1 for a scalar)."""
        return self.shape[0] if self.shape else 1

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "kind": self.kind,
            "nbytes": self.nbytes,
            "traffic": self.traffic,
        }

    @classmethod
    def from_json(cls, obj: Any, where: str = "variable") -> VariableLoad:
        """Parse one entry of a plan spec (``{"name", "shape", "dtype", "kind", "nbytes", "traffic"}``).

        Raises:
            BalanceError: a field is missing or has the wrong type.
        """
        if not isinstance(obj, Mapping):
            raise BalanceError(
                f"{where} must be an object with name, shape, kind, nbytes, traffic; got {obj!r:.60}"
            )
        missing = [k for k in ("name", "shape", "nbytes") if k not in obj]
        if missing:
            raise BalanceError(f"{where} ({obj.get('name', '?')!r}) lacks {', '.join(missing)}")
        shape = obj["shape"]
        if not isinstance(shape, list | tuple):
            raise BalanceError(
                f"{where} {obj['name']!r}: shape must be a list of integers, got {shape!r:.40}"
            )
        unknown = sorted(set(obj) - {"name", "shape", "dtype", "kind", "nbytes", "traffic", "splittable"})
        if unknown:
            raise BalanceError(f"{where} {obj['name']!r}: unknown field(s) {', '.join(unknown)}")
        return cls(
            name=obj["name"],
            shape=tuple(shape),
            dtype=obj.get("dtype", "float32"),
            kind=obj.get("kind", "dense"),
            nbytes=obj["nbytes"],
            traffic=obj.get("traffic", 0.0),
            splittable=obj.get("splittable"),
        )


@dataclass(frozen=True)
class Shard:
    """One piece of a variable: a contiguous row range on one parameter server.

    Attributes:
        variable: the variable's name.
        index: the shard's index within its variable (``part_<index>``), in row order.
        offset: its first row.
        rows: its row count (>= 1).
        ps: the PS task that holds it.
        nbytes: its resident bytes (the variable's, pro rata rows).
        traffic: its bytes per step (pro rata rows).
    """

    variable: str
    index: int
    offset: int
    rows: int
    ps: int
    nbytes: float
    traffic: float

    @property
    def key(self) -> tuple[str, int]:
        return (self.variable, self.index)


@dataclass(frozen=True)
class Plan:
    """Shards of every variable and the PS holding each, with the bound no plan can beat.

    Attributes:
        num_ps: the number of parameter servers.
        shards: every shard, sorted by (variable, index); a variable's rows add up to its dim 0.
        lower_bound: the largest normalised load any plan must reach (>= 1).
        capacities: per-PS memory capacities in bytes (empty: unlimited, equal shares).
        policy: the name of what made the plan.
        total_bytes / total_traffic: the sums over all variables.
    """

    num_ps: int
    shards: tuple[Shard, ...]
    lower_bound: float
    capacities: tuple[int, ...] = ()
    policy: str = "balanced"
    total_bytes: float = 0.0
    total_traffic: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def memory(self) -> list[float]:
        """Resident bytes per PS."""
        out = [0.0] * self.num_ps
        for s in self.shards:
            out[s.ps] += s.nbytes
        return out

    def traffic(self) -> list[float]:
        """Bytes per step per PS."""
        out = [0.0] * self.num_ps
        for s in self.shards:
            out[s.ps] += s.traffic
        return out

    def max_over_mean(self) -> dict[str, float]:
        """``{"memory", "traffic"}``: the largest PS over the mean PS (1.0 is perfect)."""
        return {"memory": max_over_mean(self.memory()), "traffic": max_over_mean(self.traffic())}

    def normalised_max(self) -> float:
        """The objective: the largest PS load over its fair share, over both dimensions."""
        return normalised_max(self.memory(), self.traffic(), self.capacities)

    def shard_counts(self) -> dict[str, int]:
        """Variable name -> number of shards (what a partitioner must cut)."""
        out: dict[str, int] = {}
        for s in self.shards:
            out[s.variable] = out.get(s.variable, 0) + 1
        return out

    def rows(self) -> dict[str, list[int]]:
        """Variable name -> rows of each shard, in shard order."""
        out: dict[str, list[int]] = {}
        for s in self.shards:
            out.setdefault(s.variable, []).append(s.rows)
        return out

    def assignment(self) -> dict[str, int]:
        """TensorFlow variable name -> PS task: ``<name>/part_<i>`` for a split variable, else ``<name>``.

        This is what ``kubeai_train.tf.PlacementPlan.assignment`` holds.
        """
        counts = self.shard_counts()
        return {
            (f"{s.variable}/part_{s.index}" if counts[s.variable] > 1 else s.variable): s.ps
            for s in self.shards
        }

    def to_json(self) -> dict[str, Any]:
        """The CLI's document: ``{"num_ps", "shards": [{"variable", "rows", "ps"}], "lower_bound",
        "max_over_mean": {"memory", "traffic"}, ...}``."""
        return {
            "num_ps": self.num_ps,
            "policy": self.policy,
            "shards": [{"variable": s.variable, "rows": s.rows, "ps": s.ps} for s in self.shards],
            "lower_bound": self.lower_bound,
            "normalised_max": self.normalised_max(),
            "max_over_mean": self.max_over_mean(),
            "ps": [
                {"task": t, "planned_bytes": m, "planned_traffic": tr}
                for t, (m, tr) in enumerate(zip(self.memory(), self.traffic(), strict=True))
            ],
        }


def max_over_mean(loads: Sequence[float]) -> float:
    """The largest load over the mean load (1.0 when all are zero)."""
    mean = math.fsum(loads) / len(loads) if loads else 0.0
    return max(loads) / mean if mean > 0 else 1.0


def normalised_max(
    memory: Sequence[float], traffic: Sequence[float], capacities: Sequence[int] = ()
) -> float:
    """The largest of every PS's memory over its share (capacity-weighted if given) and traffic over the mean."""
    p = len(memory)
    m_total, t_total = math.fsum(memory), math.fsum(traffic)
    cap_total = math.fsum(capacities) if capacities else 0.0
    worst = 0.0
    for i in range(p):
        share = capacities[i] / cap_total if capacities else 1.0 / p
        if m_total > 0:
            worst = max(worst, memory[i] / (m_total * share))
        if t_total > 0:
            worst = max(worst, traffic[i] * p / t_total)
    return worst if (m_total > 0 or t_total > 0) else 1.0
