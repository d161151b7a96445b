"""The balanced planner: how many shards each variable gets, their rows, and the PS of each.

The objective is the largest *normalised* PS load: a PS's resident bytes over its share of all
bytes (equal shares, or shares proportional to the given memory capacities) and its per-step
traffic over the mean, whichever is larger. Any plan is at least the :func:`lower_bound`: 1 (the
totals must go somewhere) or the largest piece that cannot be cut smaller (a ``state`` variable,
or a variable already cut into ``min(P, rows)`` shards).

How: a variable is cut so that no piece exceeds a fraction ``eps`` of a PS's fair share in either
dimension (never into more shards than PS or rows). Pieces go largest first onto the PS whose
load after adding it is smallest (a two-dimensional LPT), then a local search moves or swaps
pieces off the most loaded PS while that lowers it, and -- when rows may be uneven -- shifts rows
between shards of one variable on two PS to fill the exact residuals. ``eps`` halves until the
plan is within ``tolerance`` of the lower bound, so variables are cut no finer than needed.
Every step is ordered by names and indices, never by dict or hash order: every role of a job
computes the same plan from the same input.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kubeai_train.balance.load import from_variable_infos
from kubeai_train.balance.types import BalanceError, Plan, Shard, VariableLoad

__all__ = ["BalancedPlacement", "Planner", "even_rows", "lower_bound"]

_EPS = (0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625)


def even_rows(rows: int, shards: int) -> list[int]:
    """Rows of each shard as TensorFlow's partitioners cut them: the first ``rows % shards`` get one more."""
    base, extra = divmod(rows, shards)
    return [base + (1 if i < extra else 0) for i in range(shards)]


def _proportional(rows: int, weights: list[float]) -> list[int]:
    """``rows`` split in proportion to ``weights`` (largest remainders; every part >= 1)."""
    total = sum(weights)
    raw = [rows * w / total for w in weights]
    out = [max(1, int(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - int(raw[i])), i))
    i = 0
    while sum(out) < rows:
        out[order[i % len(out)]] += 1
        i += 1
    while sum(out) > rows:
        j = max(range(len(out)), key=lambda i: (out[i], -i))
        out[j] -= 1
    return out


@dataclass
class _Var:
    v: VariableLoad
    rows: int
    mem: float
    tr: float
    max_shards: int


def _check(
    variables: Iterable[VariableLoad], num_ps: Any, capacities: Sequence[Any] | None
) -> tuple[list[_Var], int, tuple[int, ...]]:
    if not isinstance(num_ps, int) or isinstance(num_ps, bool) or num_ps < 1:
        raise BalanceError(f"num_ps must be an integer >= 1, got {num_ps!r}")
    caps: tuple[int, ...] = ()
    if capacities:
        if len(capacities) != num_ps:
            raise BalanceError(
                f"{len(capacities)} capacities given for {num_ps} PS; give one per PS (or none)"
            )
        for c in capacities:
            if not isinstance(c, int | float) or isinstance(c, bool) or not c > 0 or not math.isfinite(c):
                raise BalanceError(f"PS capacity must be a number of bytes > 0, got {c!r}")
        caps = tuple(int(c) for c in capacities)
    out: dict[str, _Var] = {}
    for v in variables:
        if not isinstance(v, VariableLoad):
            raise BalanceError(f"expected VariableLoad entries, got {type(v).__name__}: {v!r:.60}")
        if v.name in out:
            raise BalanceError(f"variable {v.name!r} is given twice; names must be unique")
        k = min(num_ps, v.rows) if v.splittable else 1
        out[v.name] = _Var(v, v.rows, float(v.nbytes), float(v.traffic), k)
    return [out[n] for n in sorted(out)], num_ps, caps


def lower_bound(
    variables: Sequence[VariableLoad], num_ps: int, capacities: Sequence[int] | None = None
) -> float:
    """The smallest normalised max load any plan can reach (see the module docstring).

    Raises:
        BalanceError: bad input, or the variables cannot fit the capacities.
    """
    vs, p, caps = _check(variables, num_ps, capacities)
    return _bound(vs, p, caps)


def _bound(vs: list[_Var], p: int, caps: tuple[int, ...]) -> float:
    m_total = math.fsum(x.mem for x in vs)
    t_total = math.fsum(x.tr for x in vs)
    if caps:
        if m_total > sum(caps):
            raise BalanceError(
                f"the variables hold {int(m_total)} bytes but the PS capacities add up to {sum(caps)}; "
                "add parameter servers or capacity"
            )
        best_share = max(caps) / sum(caps)
    else:
        best_share = 1.0 / p
    bound = 1.0 if (m_total > 0 or t_total > 0) else 1.0
    for x in vs:
        piece_rows = math.ceil(x.rows / x.max_shards)
        piece_mem = x.mem * piece_rows / x.rows
        if caps and piece_mem > max(caps):
            raise BalanceError(
                f"variable {x.v.name!r} needs {int(piece_mem)} bytes on one PS even cut into {x.max_shards} "
                f"shard(s), more than the largest PS capacity {max(caps)}; add capacity or PS"
            )
        if m_total > 0:
            bound = max(bound, piece_mem / (m_total * best_share))
        if t_total > 0:
            bound = max(bound, x.tr * piece_rows / x.rows * p / t_total)
    return bound


class Planner:
    """Plans shards and their placement; a pure, deterministic function of its input.

    Args:
        rows: ``"free"`` lets shards of one variable hold different row counts (the best balance);
            ``"even"`` cuts as TensorFlow's partitioners do (:func:`even_rows`), so only the shard
            counts and the placement are decided.
        tolerance: stop cutting finer once the plan is within this fraction of the lower bound.
        max_moves: local-search steps per pass (bounds the time on huge inputs).
    """

    def __init__(self, rows: str = "free", tolerance: float = 0.02, max_moves: int | None = None) -> None:
        if rows not in ("free", "even"):
            raise BalanceError(f"rows must be 'free' or 'even', got {rows!r}")
        if not tolerance >= 0:
            raise BalanceError(f"tolerance must be >= 0, got {tolerance!r}")
        self.rows = rows
        self.tolerance = tolerance
        self.max_moves = max_moves

    def plan(
        self, variables: Iterable[VariableLoad], num_ps: int, capacities: Sequence[int] | None = None
    ) -> Plan:
        """Shards of every variable and their PS.

        Guarantees: every variable's shards cover its rows exactly once, in order; no variable has
        more shards than ``num_ps`` (or rows); no PS holds more bytes than its capacity; the same
        input in any order gives the same plan.

        Raises:
            BalanceError: bad input (``num_ps < 1``, duplicate names, a variable too big for every
                capacity even cut ``num_ps`` ways, more bytes than all capacities).
        """
        vs, p, caps = _check(variables, num_ps, capacities)
        bound = _bound(vs, p, caps)
        m_total = math.fsum(x.mem for x in vs)
        t_total = math.fsum(x.tr for x in vs)
        shares = np.array([c / sum(caps) for c in caps] if caps else [1.0 / p] * p)
        # a dimension whose total is zero (or denormal: 1/total overflows) does not constrain
        with np.errstate(over="ignore", divide="ignore"):
            inv_m = 1.0 / (m_total * shares) if m_total > 0 else np.zeros(p)
        if not np.isfinite(inv_m).all():
            inv_m = np.zeros(p)
        inv_t = p / t_total if t_total > 0 and math.isfinite(p / t_total) else 0.0
        cap_norm = np.array(caps, float) * inv_m if caps else None
        best: _Packing | None = None
        failure = BalanceError("no plan")
        for eps in _EPS:
            counts = [self._count(x, eps, m_total * float(shares.min()), t_total / p) for x in vs]
            if best is not None and counts == best.counts:
                continue
            pack = _Packing(vs, counts, p, inv_m, inv_t, cap_norm, self.rows, self.max_moves, shares)
            try:
                pack.run(bound * (1 + self.tolerance))
            except BalanceError as e:  # a piece fits no capacity left: cut finer, if anything can
                failure = e
                continue
            if best is None or pack.objective < best.objective - 1e-12:
                best = pack
            if best.objective <= bound * (1 + self.tolerance):
                break
        if best is None:
            if vs:
                raise failure
            return Plan(p, (), bound, caps, "balanced", 0.0, 0.0)
        return best.to_plan(bound, caps, m_total, t_total)

    @staticmethod
    def _count(x: _Var, eps: float, m_share: float, t_share: float) -> int:
        if x.max_shards <= 1:
            return 1
        need = 1.0
        if m_share > 0:
            need = max(need, x.mem / (eps * m_share))
        if t_share > 0:
            need = max(need, x.tr / (eps * t_share))
        return min(x.max_shards, math.ceil(need - 1e-9))


class _Packing:
    """One pass: pieces at fixed counts packed, improved, and (free rows) refined."""

    def __init__(
        self,
        vs: list[_Var],
        counts: list[int],
        p: int,
        inv_m: np.ndarray,
        inv_t: float,
        cap_norm: np.ndarray | None,
        rows_mode: str,
        max_moves: int | None,
        shares: np.ndarray,
    ) -> None:
        self.vs, self.counts, self.p = vs, counts, p
        self.inv_m, self.inv_t, self.cap = inv_m, inv_t, cap_norm
        self.rows_mode = rows_mode
        self.max_moves = max_moves if max_moves is not None else 40 * p + 200
        # pieces: parallel lists; rows may change in refine
        self.var: list[int] = []
        self.idx: list[int] = []
        self.rows: list[int] = []
        for vi, (x, k) in enumerate(zip(vs, counts, strict=True)):
            cut = even_rows(x.rows, k)
            if rows_mode == "free" and cap_norm is not None and k > 1:
                # unequal capacities: cut in proportion to the k largest shares, so the big
                # piece can go where the room is
                cut = _proportional(x.rows, sorted(shares.tolist(), reverse=True)[:k])
            for i, r in enumerate(cut):
                self.var.append(vi)
                self.idx.append(i)
                self.rows.append(r)
        n = len(self.var)
        self.ps = [-1] * n
        self.A = np.zeros(p)  # normalised memory per PS
        self.B = np.zeros(p)  # normalised traffic per PS
        self.holds: list[set[int]] = [set() for _ in range(p)]  # variable indices with a shard on each PS
        self.on: list[set[int]] = [set() for _ in range(p)]
        self.var_ps: list[dict[int, int]] = [{} for _ in vs]  # variable -> {PS: its shards there}
        self.objective = math.inf

    def _mem(self, j: int) -> float:
        x = self.vs[self.var[j]]
        return x.mem * self.rows[j] / x.rows

    def _tr(self, j: int) -> float:
        x = self.vs[self.var[j]]
        return x.tr * self.rows[j] / x.rows

    def _put(self, j: int, q: int) -> None:
        self.ps[j] = q
        self.A[q] += self._mem(j) * self.inv_m[q]
        self.B[q] += self._tr(j) * self.inv_t
        self.holds[q].add(self.var[j])
        self.var_ps[self.var[j]][q] = self.var_ps[self.var[j]].get(q, 0) + 1
        self.on[q].add(j)

    def _take(self, j: int) -> None:
        q = self.ps[j]
        self.A[q] -= self._mem(j) * self.inv_m[q]
        self.B[q] -= self._tr(j) * self.inv_t
        self.holds[q].discard(self.var[j])
        left = self.var_ps[self.var[j]].pop(q) - 1
        if left:
            self.var_ps[self.var[j]][q] = left
        self.on[q].discard(j)
        self.ps[j] = -1

    def _allowed(self, j: int, exclude: int = -1) -> np.ndarray:
        ok = np.ones(self.p, bool)
        taken = [q for q in self.var_ps[self.var[j]] if q != exclude]
        if taken:
            ok[taken] = False
        if self.cap is not None:
            ok &= self.A + self._mem(j) * self.inv_m <= self.cap * (1 + 1e-12)
        return ok

    def run(self, good_enough: float) -> None:
        order = sorted(
            range(len(self.var)),
            key=lambda j: (
                -max(self._mem(j) * float(self.inv_m.max()), self._tr(j) * self.inv_t),
                -(self._mem(j) * float(self.inv_m.max()) + self._tr(j) * self.inv_t),
                self.vs[self.var[j]].v.name,
                self.idx[j],
            ),
        )
        for j in order:
            a = self._mem(j) * self.inv_m
            b = self._tr(j) * self.inv_t
            ok = self._allowed(j)
            if not ok.any():
                ok = self._allowed_capacity_only(j)
            if not ok.any():
                raise BalanceError(
                    f"shard {self.idx[j]} of variable {self.vs[self.var[j]].v.name!r} "
                    f"({int(self._mem(j))} bytes) fits no PS's remaining capacity; add capacity or PS"
                )
            after = np.maximum(self.A + a, self.B + b)
            key = np.where(ok, after, np.inf)
            lo = key.min()
            cand = np.flatnonzero(key <= lo + 1e-12)
            if len(cand) > 1:  # ties: the emptier PS, then the lowest task
                tot = (self.A + a + self.B + b)[cand]
                cand = cand[tot <= tot.min() + 1e-12]
            self._put(j, int(cand[0]))
        self._improve(good_enough)
        # rows shift only when whole pieces are not good enough: fewer uneven cuts, less time
        if self.rows_mode == "free" and float(self._load().max()) > good_enough:
            self._refine(good_enough)
            self._improve(good_enough)
        self.objective = float(np.maximum(self.A, self.B).max()) if len(self.var) else 1.0

    def _allowed_capacity_only(self, j: int) -> np.ndarray:
        if self.cap is None:
            return np.ones(self.p, bool)
        return self.A + self._mem(j) * self.inv_m <= self.cap * (1 + 1e-12)

    def _load(self) -> np.ndarray:
        return np.maximum(self.A, self.B)

    def _improve(self, good_enough: float) -> None:
        """Move, else swap, a piece off the most loaded PS while that lowers the maximum (and
        the plan is not yet within the tolerance of the bound: polishing further buys nothing)."""
        for _ in range(self.max_moves):
            load = self._load()
            top = int(np.argmax(load))
            cur = load[top]
            if cur <= good_enough:
                return
            best: tuple[float, float, int, int, int] | None = None  # (new max, sum, piece, q, swap piece)
            pieces = sorted(self.on[top])
            for j in pieces:
                a = self._mem(j) * self.inv_m
                b = self._tr(j) * self.inv_t
                top_after = max(self.A[top] - a[top], self.B[top] - b)
                after = np.maximum(np.maximum(self.A + a, self.B + b), top_after)
                after[top] = np.inf
                after[~self._allowed(j)] = np.inf
                q = int(np.argmin(after))
                if after[q] < cur - 1e-12 and (best is None or after[q] < best[0] - 1e-12):
                    best = (float(after[q]), 0.0, j, q, -1)
            if best is None:
                best = self._best_swap(top, pieces, cur)
            if best is None:
                return
            _, _, j, q, k = best
            self._take(j)
            if k >= 0:
                self._take(k)
                self._put(k, top)
            self._put(j, q)

    def _best_swap(
        self, top: int, pieces: list[int], cur: float
    ) -> tuple[float, float, int, int, int] | None:
        load = self._load()
        # the least loaded PS are where a swap can help; a few keep it fast
        targets = [int(q) for q in np.argsort(load, kind="stable")[: min(self.p - 1, 4)] if q != top]
        best = None
        for q in targets:
            others = sorted(self.on[q])
            if not others:
                continue
            ma = np.array([self._mem(k) for k in others])
            tb = np.array([self._tr(k) * self.inv_t for k in others])
            ovar = [self.var[k] for k in others]
            for j in pieces:
                vj = self.var[j]
                if vj in self.holds[q] and vj not in ovar:
                    continue
                aj, bj = self._mem(j), self._tr(j) * self.inv_t
                new_top_a = self.A[top] - aj * self.inv_m[top] + ma * self.inv_m[top]
                new_top_b = self.B[top] - bj + tb
                new_q_a = self.A[q] - ma * self.inv_m[q] + aj * self.inv_m[q]
                new_q_b = self.B[q] - tb + bj
                after = np.maximum(np.maximum(new_top_a, new_top_b), np.maximum(new_q_a, new_q_b))
                for i, k in enumerate(others):
                    vk = self.var[k]
                    bad = (vk != vj) and (vj in self.holds[q] or vk in self.holds[top])
                    if bad or (
                        self.cap is not None and (new_top_a[i] > self.cap[top] or new_q_a[i] > self.cap[q])
                    ):
                        after[i] = np.inf
                i = int(np.argmin(after))
                if after[i] < cur - 1e-12 and (best is None or after[i] < best[0] - 1e-12):
                    best = (float(after[i]), 0.0, j, q, others[i])
        return best

    def _refine(self, good_enough: float) -> None:
        """Shift rows between two shards of one variable on different PS to lower the larger load."""
        shards_of: dict[int, list[int]] = {}
        for j, vi in enumerate(self.var):
            shards_of.setdefault(vi, []).append(j)
        for _ in range(min(self.max_moves, 8 * self.p + 100)):
            load = self._load()
            top = int(np.argmax(load))
            cur = float(load[top])
            if cur <= good_enough:
                return
            best: tuple[float, int, int, int] | None = None  # (new max of the pair, from, to, rows)
            for j in sorted(self.on[top]):
                if self.rows[j] < 2:
                    continue
                x = self.vs[self.var[j]]
                ra, rb = x.mem / x.rows, x.tr / x.rows * self.inv_t
                for k in shards_of[self.var[j]]:
                    q = self.ps[k]
                    if q == top:
                        continue
                    d = self._best_delta(top, q, ra, rb, self.rows[j] - 1)
                    if d <= 0:
                        continue
                    pair = self._pair_max(top, q, ra, rb, d)
                    if self.cap is not None and self.A[q] + d * ra * self.inv_m[q] > self.cap[q]:
                        continue
                    if pair < cur - 1e-12 and (best is None or pair < best[0] - 1e-12):
                        best = (pair, j, k, d)
            if best is None:
                return
            _, j, k, d = best
            q = self.ps[k]
            self._take(j)
            self._take(k)
            self.rows[j] -= d
            self.rows[k] += d
            self._put(j, top)
            self._put(k, q)

    def _pair_max(self, top: int, q: int, ra: float, rb: float, d: float) -> float:
        return max(
            self.A[top] - d * ra * self.inv_m[top],
            self.B[top] - d * rb,
            self.A[q] + d * ra * self.inv_m[q],
            self.B[q] + d * rb,
        )

    def _best_delta(self, top: int, q: int, ra: float, rb: float, limit: int) -> int:
        """The whole number of rows in [0, limit] that minimises the pair's larger load."""
        dec = [(self.A[top], ra * self.inv_m[top]), (self.B[top], rb)]
        inc = [(self.A[q], ra * self.inv_m[q]), (self.B[q], rb)]
        cands = {0, limit}
        for y0, s0 in dec:
            for y1, s1 in inc:
                if s0 + s1 > 0:
                    d = (y0 - y1) / (s0 + s1)
                    if not math.isfinite(d):  # a denormal slope: the crossing is beyond any limit
                        continue
                    for c in (math.floor(d), math.ceil(d)):
                        if 0 <= c <= limit:
                            cands.add(c)
        return min(sorted(cands), key=lambda c: (self._pair_max(top, q, ra, rb, c), c))

    def to_plan(self, bound: float, caps: tuple[int, ...], m_total: float, t_total: float) -> Plan:
        shards: list[Shard] = []
        by_var: dict[int, list[int]] = {}
        for j, vi in enumerate(self.var):
            by_var.setdefault(vi, []).append(j)
        for vi, js in by_var.items():
            x = self.vs[vi]
            off = 0
            for j in sorted(js, key=lambda j: self.idx[j]):
                r = self.rows[j]
                shards.append(
                    Shard(x.v.name, self.idx[j], off, r, self.ps[j], x.mem * r / x.rows, x.tr * r / x.rows)
                )
                off += r
        return Plan(self.p, tuple(shards), bound, caps, "balanced", m_total, t_total, {"counts": len(shards)})


class BalancedPlacement:
    """The planner behind the ``plan(variables, num_ps)`` shape of ``kubeai_train.tf.PlacementPolicy``.

    ``variables`` may be :class:`VariableLoad` entries or ``kubeai_train.tf.VariableInfo`` ones
    (duck-typed; shards of one partitioned variable are merged, the plan cuts them anew). The
    returned :class:`~kubeai_train.balance.Plan` maps onto TensorFlow as follows:
    ``plan.shard_counts()[name]`` is the number of partitions the partitioner must return for that
    variable (1: not partitioned); ``plan.assignment()`` (``<name>/part_<i>`` -> PS task) is the
    ``assignment`` of a ``PlacementPlan(plan.assignment(), plan.num_ps, "balanced")``. Rows are
    cut evenly by default (``rows="even"``), exactly as TensorFlow cuts a partitioned variable.
    """

    name = "balanced"

    def __init__(
        self, rows: str = "even", tolerance: float = 0.02, capacities: Sequence[int] | None = None
    ) -> None:
        self.planner = Planner(rows=rows, tolerance=tolerance)
        self.capacities = tuple(capacities) if capacities else None

    def plan(self, variables: Sequence[Any], num_ps: int) -> Plan:
        loads = [v if isinstance(v, VariableLoad) else None for v in variables]
        if any(x is None for x in loads):
            loads = list(from_variable_infos(variables))  # type: ignore[arg-type]
        return self.planner.plan(loads, num_ps, self.capacities)  # type: ignore[arg-type]
