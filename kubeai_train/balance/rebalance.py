"""Runtime rebalancing: notice a PS that stays hot and re-place as few bytes as fix it.

Per-shard traffic is observed in windows (bytes per step each shard really moved, e.g. counted
from the lookups and gradients the trainer sends to each PS). :class:`RebalancePolicy` triggers
when the busiest PS's traffic over the mean exceeds ``threshold`` (1.10) for ``windows`` (3)
consecutive windows, then :func:`replan` proposes a new placement of the *current* shards: it
keeps every shard where it is unless moving it helps, and picks, step by step, the move that
reaches the target (1.05 on memory and traffic) with the fewest bytes -- a whole shard to another
PS, a swap of two, or the tail rows of a hot shard cut off into a new shard (TensorFlow restores
a partitioned variable into a different partitioning, so a re-cut costs only the rows that move).
Three levels of cutting (``cuts``): ``"free"`` (True) cuts rows anywhere; ``"even"`` may change a
variable's shard count but cuts it evenly, as TensorFlow's partitioners do (a hot shard is split
by re-cutting its variable into more even shards, and only the rows that change PS count as
moved); ``"none"`` (False) only moves or swaps whole shards.
It reports the bytes moved beside :func:`min_bytes_to_move`, a bound no re-placement can beat.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubeai_train.balance.planner import Planner, even_rows
from kubeai_train.balance.types import BalanceError, Plan, Shard, VariableLoad, max_over_mean

__all__ = [
    "CUTS",
    "RebalanceDecision",
    "RebalancePolicy",
    "bytes_moved",
    "cut_mode",
    "min_bytes_to_move",
    "observed",
    "replan",
]

CUTS = ("free", "even", "none")


def cut_mode(cuts: bool | str) -> str:
    """``cuts`` as one of :data:`CUTS` (True is ``"free"``, False ``"none"``)."""
    if cuts is True:
        return "free"
    if cuts is False:
        return "none"
    if cuts in CUTS:
        return str(cuts)
    raise BalanceError(f"cuts must be one of {CUTS} (or True / False), got {cuts!r}")


@dataclass(frozen=True)
class RebalanceDecision:
    """What the policy says after a window.

    Attributes:
        rebalance: whether to re-place now.
        reason: why (or why not), for the log.
        plan: the new plan when ``rebalance`` (its shards carry the measured traffic).
        bytes_moved: resident bytes (slots included) that change PS.
        min_bytes: a lower bound on the bytes any re-placement reaching the target must move.
        before / after: ``{"memory", "traffic"}`` max over mean of the current / new placement.
        hot_windows: consecutive windows over the threshold so far.
    """

    rebalance: bool
    reason: str
    plan: Plan | None = None
    bytes_moved: float = 0.0
    min_bytes: float = 0.0
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    hot_windows: int = 0


def observed(plan: Plan, traffic: Mapping[str, float] | Mapping[tuple[str, int], float]) -> Plan:
    """``plan`` with each shard's traffic replaced by the observed one (keys: ``(variable, index)``
    or the TensorFlow names of :meth:`Plan.assignment`). Unobserved shards moved nothing."""
    names = {s.key: n for n, s in zip(plan.assignment(), plan.shards, strict=True)}
    known = set(names) | set(names.values())
    unknown = [k for k in traffic if k not in known]
    if unknown:
        raise BalanceError(f"observed traffic for {unknown[0]!r}, which is not a shard of the plan")
    shards = []
    for s in plan.shards:
        t = traffic.get(s.key, traffic.get(names[s.key], 0.0))  # type: ignore[call-overload]
        if not (isinstance(t, int | float) and t >= 0 and math.isfinite(t)):
            raise BalanceError(
                f"observed traffic of {names[s.key]!r} must be a finite number >= 0, got {t!r}"
            )
        shards.append(Shard(s.variable, s.index, s.offset, s.rows, s.ps, s.nbytes, float(t)))
    return Plan(
        plan.num_ps,
        tuple(shards),
        plan.lower_bound,
        plan.capacities,
        plan.policy,
        plan.total_bytes,
        math.fsum(s.traffic for s in shards),
    )


def bytes_moved(old: Plan, new: Plan) -> float:
    """Resident bytes whose PS differs between two plans (row ranges compared, so re-cuts count only moved rows)."""
    moved = 0.0
    by_var: dict[str, list[Shard]] = {}
    for s in old.shards:
        by_var.setdefault(s.variable, []).append(s)
    for s in new.shards:
        per_row = s.nbytes / s.rows
        for o in by_var.get(s.variable, ()):
            lo, hi = max(s.offset, o.offset), min(s.offset + s.rows, o.offset + o.rows)
            if hi > lo and o.ps != s.ps:
                moved += (hi - lo) * per_row
    return moved


def min_bytes_to_move(
    plan: Plan, target: float = 1.05, cuts: bool | str = True, max_nodes: int = 200_000
) -> float:
    """The fewest bytes a re-placement reaching ``target`` x mean (memory and traffic) must move.

    With ``cuts`` (shards may be cut anywhere) a lower bound: a PS over the traffic target must
    shed its excess traffic, the cheapest way being its shards with the most traffic per byte
    first, cut to the exact rows (a fractional knapsack); a PS over the memory target must shed
    at least its excess bytes.

    With ``cuts="none"`` (False: only whole shards move) the exact minimum over every
    assignment of the current shards to PS, found by a branch and bound over shards largest
    first; when that search would visit more than ``max_nodes`` assignments, or no assignment
    of whole shards reaches the target, the fractional bound. With ``cuts="even"`` the same
    search also over every even shard count of every variable (up to one shard per PS; a
    re-cut shard's bytes and traffic pro rata rows of the old shards it overlaps, as
    :func:`replan` assumes), when there are at most 4,096 combinations of counts.
    """
    frac = _fractional_min_bytes(plan, target)
    mode = cut_mode(cuts)
    if mode == "free":
        return frac
    exact = _exact_min_bytes(plan, target, max_nodes, even=mode == "even")
    return frac if exact is None else max(exact, frac)


def _items(old: Plan, new: Plan) -> list[tuple[float, float, list[float]]]:
    """``new``'s shards as (bytes, traffic, bytes moved if placed on each PS) against ``old``."""
    by_var: dict[str, list[Shard]] = {}
    for o in old.shards:
        by_var.setdefault(o.variable, []).append(o)
    out = []
    for s in new.shards:
        cost = [0.0] * old.num_ps
        for o in by_var[s.variable]:
            k = min(s.offset + s.rows, o.offset + o.rows) - max(s.offset, o.offset)
            if k > 0:
                for q in range(old.num_ps):
                    if q != o.ps:
                        cost[q] += o.nbytes * k / o.rows
        out.append((s.nbytes, s.traffic, cost))
    return out


def _exact_min_bytes(plan: Plan, target: float, max_nodes: int, even: bool) -> float | None:
    """The exact minimum of :func:`min_bytes_to_move` for ``cuts="none"`` / ``"even"`` (every even
    shard count of every variable, up to one shard per PS), or None past the budget."""
    p = plan.num_ps
    counts, rows = plan.shard_counts(), {v: sum(r) for v, r in plan.rows().items()}
    names = sorted(counts)
    # the current count first: the search finds the no-re-cut answers early and prunes with them
    choices = [
        [counts[v], *(n for n in range(1, min(p, rows[v]) + 1) if n != counts[v])] if even else [counts[v]]
        for v in names
    ]
    if math.prod(len(c) for c in choices) > 4096:
        return None
    mem_cap = target * math.fsum(s.nbytes for s in plan.shards) / p * (1 + 1e-9)
    tr_cap = target * math.fsum(s.traffic for s in plan.shards) / p * (1 + 1e-9)
    best = math.inf
    budget = max_nodes
    for combo in itertools.product(*choices):
        cut = plan
        for v, n in zip(names, combo, strict=True):
            if n != counts[v]:
                cut = _even_cut(cut, v, n)
        items = sorted(_items(plan, cut), key=lambda x: (-x[0], -x[1], min(x[2])))
        found, budget = _branch_and_bound(items, p, mem_cap, tr_cap, best, budget)
        if budget < 0:
            return None
        best = min(best, found)
    return None if math.isinf(best) else best


def _branch_and_bound(
    items: list[tuple[float, float, list[float]]],
    p: int,
    mem_cap: float,
    tr_cap: float,
    best: float,
    budget: int,
) -> tuple[float, int]:
    """The cheapest placement of ``items`` within the caps (inf if none beats ``best``), and
    the node budget left (< 0: it ran out, the answer is not exact)."""
    mem, tr = [0.0] * p, [0.0] * p
    out = best

    def visit(i: int, moved: float) -> bool:
        nonlocal out, budget
        budget -= 1
        if budget < 0:
            return False
        if moved >= out:
            return True
        if i == len(items):
            out = moved
            return True
        m, t, cost = items[i]
        for q in sorted(range(p), key=lambda q: (cost[q], mem[q] + tr[q] / max(tr_cap, 1e-300), q)):
            if mem[q] + m > mem_cap or tr[q] + t > tr_cap:
                continue
            mem[q] += m
            tr[q] += t
            ok = visit(i + 1, moved + cost[q])
            mem[q] -= m
            tr[q] -= t
            if not ok:
                return False
        return True

    visit(0, 0.0)
    return (out if out < best else math.inf), budget


def _fractional_min_bytes(plan: Plan, target: float) -> float:
    mem, tr = plan.memory(), plan.traffic()
    p = plan.num_ps
    m_mean, t_mean = math.fsum(mem) / p, math.fsum(tr) / p
    need = 0.0
    for q in range(p):
        excess_m = max(0.0, mem[q] - target * m_mean)
        excess_t = max(0.0, tr[q] - target * t_mean)
        knap = 0.0
        if excess_t > 0:
            for s in sorted(
                (s for s in plan.shards if s.ps == q),
                key=lambda s: (-s.traffic / max(s.nbytes, 1e-300), s.key),
            ):
                if excess_t <= 0:
                    break
                if s.traffic <= 0:
                    break
                take = min(1.0, excess_t / s.traffic)
                knap += take * s.nbytes
                excess_t -= take * s.traffic
        need += max(excess_m, knap)
    return need


def _objective(mem: list[float], tr: list[float]) -> float:
    return max(max_over_mean(mem), max_over_mean(tr))


def replan(plan: Plan, target: float = 1.05, max_steps: int | None = None, cuts: bool | str = True) -> Plan:
    """A placement of ``plan``'s shards (with their current traffic) within ``target`` x mean, moving few bytes.

    Tries two greedy searches (the cheapest improvement per byte; the largest improvement) and,
    if neither reaches the target, a fresh free-rows plan whose PS are renumbered to keep as many
    bytes in place as possible; returns the candidate within target moving the fewest bytes (or
    the most balanced one if none is). Deterministic.

    With ``cuts="none"`` (False) only whole shards move or swap (no new or resized shards, no
    fresh plan). With ``cuts="even"`` also: a variable holding a shard on a PS over the target
    is re-cut evenly into more shards (up to one per PS, rows as :func:`even_rows`; each new
    shard's traffic is its rows' share of the measured traffic of the old shards it overlaps),
    its new shards start on the PS holding most of their rows, and whole shards then move --
    what a TensorFlow partitioner can express.
    """
    mode = cut_mode(cuts)
    # aim a little under the target: whole rows overshoot the exact residual by a hair
    aim = target - 0.002 * (target - 1.0 + 0.01) / 0.06
    free = mode == "free"
    results = [_greedy(plan, aim, max_steps, "ratio", free), _greedy(plan, aim, max_steps, "gain", free)]
    if free and all(max(r.max_over_mean().values()) > target for r in results):
        results.append(_fresh(plan))
    if mode == "even" and all(max(r.max_over_mean().values()) > target for r in results):
        results.extend(_recut_even(plan, aim, max_steps))
        results.extend(_recut_top(plan, aim, max_steps))
    ok = [r for r in results if max(r.max_over_mean().values()) <= target + 1e-6]
    if ok:  # the fewest bytes moved, then the fewest partitions
        return min(ok, key=lambda r: (bytes_moved(plan, r), len(r.shards)))
    return min(results, key=lambda r: (max(r.max_over_mean().values()), bytes_moved(plan, r)))


def _greedy(plan: Plan, target: float, max_steps: int | None, pick: str, cuts: bool = True) -> Plan:
    """One greedy search: apply the best single action until the target or a standstill."""
    p = plan.num_ps
    pieces: list[list[Any]] = [[s.variable, s.offset, s.rows, s.ps, s.nbytes, s.traffic] for s in plan.shards]
    caps = plan.capacities
    steps = max_steps if max_steps is not None else 4 * len(pieces) + 4 * p
    for _ in range(steps):
        mem = [0.0] * p
        tr = [0.0] * p
        count: dict[str, int] = {}
        holds: set[tuple[str, int]] = set()
        for v, _off, _r, q, m, t in pieces:
            mem[q] += m
            tr[q] += t
            count[v] = count.get(v, 0) + 1
            holds.add((v, q))
        if _objective(mem, tr) <= target:
            break
        m_mean, t_mean = math.fsum(mem) / p, math.fsum(tr) / p
        cur = _score(mem, tr, m_mean, t_mean, caps, target, {}, {})
        # every PS over target is a source: with the max alone, two tied hot PS stall the search
        hot = {
            q
            for q in range(p)
            if max(mem[q] / m_mean if m_mean else 0, tr[q] / t_mean if t_mean else 0) > target
        }

        snap = (list(mem), list(tr), m_mean, t_mean)

        def score(dm: dict[int, float], dt: dict[int, float], snap: tuple[Any, ...] = snap) -> float:
            return _score(snap[0], snap[1], snap[2], snap[3], caps, target, dm, dt)

        cands: list[tuple[float, float, tuple]] = []  # (new objective, bytes, action)
        mine = sorted(
            (i for i, x in enumerate(pieces) if x[3] in hot), key=lambda i: (pieces[i][0], pieces[i][1])
        )
        for i in mine:
            v, _off, r, top, m, t = pieces[i]
            for q in range(p):
                if q == top:
                    continue
                if (v, q) not in holds:
                    cands.append((score({top: -m, q: m}, {top: -t, q: t}), m, ("move", i, q)))
                    if cuts and r > 1 and count[v] < p and t > 0:
                        # cut the shard's tail and move just enough of it: the rows that make q and top meet
                        for d in _cut_sizes(r, m, t, mem, tr, top, q, m_mean, t_mean, target):
                            dm_, dt_ = m * d / r, t * d / r
                            cands.append(
                                (score({top: -dm_, q: dm_}, {top: -dt_, q: dt_}), dm_, ("cut", i, q, d))
                            )
                for k, y in enumerate(pieces):
                    # shift boundary rows into the neighbouring shard of the same variable on q:
                    # the shard count stays, only the rows at the boundary move
                    if (
                        not cuts
                        or y[3] != q
                        or y[0] != v
                        or r < 2
                        or not (y[1] + y[2] == pieces[i][1] or pieces[i][1] + r == y[1])
                    ):
                        continue
                    for d in _cut_sizes(r, m, t, mem, tr, top, q, m_mean, t_mean, target):
                        dm_, dt_ = m * d / r, t * d / r
                        cands.append(
                            (score({top: -dm_, q: dm_}, {top: -dt_, q: dt_}), dm_, ("shift", i, k, d))
                        )
                for k, y in enumerate(pieces):
                    if y[3] != q or ((y[0], top) in holds and y[0] != v) or ((v, q) in holds and y[0] != v):
                        continue
                    dm_, dt_ = y[4] - m, y[5] - t
                    cands.append((score({top: dm_, q: -dm_}, {top: dt_, q: -dt_}), m + y[4], ("swap", i, k)))
                for k, y in enumerate(pieces):
                    # cut rows of both: hot rows from top to q, cold rows from q back to top,
                    # solved so that both dimensions of the two PS meet
                    vy = y[0]
                    if not cuts or y[3] != q or vy == v or (v, q) in holds or (vy, top) in holds:
                        continue
                    for d1, d2 in _cut_pairs(pieces[i], y, mem, tr, top, q, m_mean, t_mean):
                        if (d1 < r and count[v] >= p) or (0 < d2 < y[2] and count[vy] >= p):
                            continue
                        dm_ = m * d1 / r - y[4] * d2 / y[2]
                        dt_ = t * d1 / r - y[5] * d2 / y[2]
                        moved = m * d1 / r + y[4] * d2 / y[2]
                        cands.append(
                            (
                                score({top: -dm_, q: dm_}, {top: -dt_, q: dt_}),
                                moved,
                                ("cutswap", i, k, q, d1, d2),
                            )
                        )
        good = [c for c in cands if c[0] <= 0.0]
        if good:
            choice = min(good, key=lambda c: (c[1], c[0], c[2]))
        else:
            better = [c for c in cands if c[0] < cur - 1e-12]
            if not better:
                break
            if pick == "ratio":
                choice = min(better, key=lambda c: (-(cur - c[0]) / max(c[1], 1e-300), c[1], c[2]))
            else:
                choice = min(better, key=lambda c: (c[0], c[1], c[2]))
        act = choice[2]
        if act[0] == "move":
            pieces[act[1]][3] = act[2]
        elif act[0] == "swap":
            pieces[act[1]][3], pieces[act[2]][3] = pieces[act[2]][3], pieces[act[1]][3]
        elif act[0] == "shift":
            _, i, k, d = act
            x, y = pieces[i], pieces[k]
            dm_, dt_ = x[4] * d / x[2], x[5] * d / x[2]
            if y[1] > x[1]:  # y follows x: x gives its tail
                y[1] -= d
            else:  # y precedes x: x gives its head
                x[1] += d
            x[2] -= d
            y[2] += d
            x[4] -= dm_
            x[5] -= dt_
            y[4] += dm_
            y[5] += dt_
        elif act[0] == "cut":
            _cut(pieces, act[1], act[2], act[3])
        else:
            _, i, k, q, d1, d2 = act
            ps_top = pieces[i][3]
            _cut(pieces, i, q, d1)
            _cut(pieces, k, ps_top, d2)
    return _to_plan(plan, pieces)


def _recut_even(
    plan: Plan, target: float, max_steps: int | None, rounds: int = 3, tries: int = 6
) -> list[Plan]:
    """Candidates of :func:`replan`'s ``"even"`` mode: up to ``rounds`` variables re-cut in turn,
    each time the re-cut (of the ``tries`` variables with most traffic on PS over the target,
    into each larger even count) whose whole-shard placement is best."""
    out: list[Plan] = []
    cur = plan
    for _ in range(rounds):
        mem, tr = cur.memory(), cur.traffic()
        p = cur.num_ps
        m_mean, t_mean = math.fsum(mem) / p, math.fsum(tr) / p
        hot = {
            q
            for q in range(p)
            if (m_mean and mem[q] / m_mean > target) or (t_mean and tr[q] / t_mean > target)
        }
        if not hot:
            break
        counts = cur.shard_counts()
        total_rows = {v: sum(r) for v, r in cur.rows().items()}
        on_hot: dict[str, float] = {}
        for s in cur.shards:
            if s.ps in hot and counts[s.variable] < min(p, total_rows[s.variable]):
                on_hot[s.variable] = on_hot.get(s.variable, 0.0) + s.traffic
        best: tuple[tuple[bool, float, float], Plan] | None = None
        for v in sorted(on_hot, key=lambda v: (-on_hot[v], v))[:tries]:
            for n in range(counts[v] + 1, min(p, total_rows[v]) + 1):
                placed = _greedy(_even_cut(cur, v, n), target, max_steps, "gain", False)
                obj = max(placed.max_over_mean().values())
                key = (obj > target, obj if obj > target else 0.0, bytes_moved(plan, placed))
                if best is None or key < best[0]:
                    best = (key, placed)
        if best is None:
            break
        cur = best[1]
        out.append(cur)
        if not best[0][0]:
            break
    return out


def _recut_top(plan: Plan, target: float, max_steps: int | None, most: int = 8) -> list[Plan]:
    """More candidates of the ``"even"`` mode: the ``k`` variables with most traffic (k = 1 ..
    ``most``) re-cut together, into one more shard each or into one per PS, then placed by
    whole-shard moves. Fixing a hot table often needs a cold one cut too, so that equal halves
    can swap (and memory stays even)."""
    p = plan.num_ps
    counts = plan.shard_counts()
    rows = {v: sum(r) for v, r in plan.rows().items()}
    traffic: dict[str, float] = {}
    for s in plan.shards:
        traffic[s.variable] = traffic.get(s.variable, 0.0) + s.traffic
    order = [v for v in sorted(traffic, key=lambda v: (-traffic[v], v)) if counts[v] < min(p, rows[v])]
    out: list[Plan] = []
    for k in range(1, min(most, len(order)) + 1):
        for widest in (False, True):
            cur = plan
            for v in order[:k]:
                cur = _even_cut(cur, v, min(p, rows[v]) if widest else counts[v] + 1)
            out.append(_uncut_unmoved(plan, _greedy(cur, target, max_steps, "gain", False)))
    return out


def _uncut_unmoved(old: Plan, new: Plan) -> Plan:
    """``new`` with every re-cut variable whose rows all stayed on their PS given back its old
    shards: a cut that moves nothing only adds partitions."""
    keep: set[str] = set()
    olds: dict[str, list[Shard]] = {}
    for s in old.shards:
        olds.setdefault(s.variable, []).append(s)
    news: dict[str, list[Shard]] = {}
    for s in new.shards:
        news.setdefault(s.variable, []).append(s)
    for v, ns in news.items():
        os_ = olds[v]
        if len(ns) != len(os_) and len({s.ps for s in os_}) == 1 and {s.ps for s in ns} == {os_[0].ps}:
            keep.add(v)
    if not keep:
        return new
    pieces = [
        [s.variable, s.offset, s.rows, s.ps, s.nbytes, s.traffic]
        for s in (
            *(x for x in new.shards if x.variable not in keep),
            *(x for x in old.shards if x.variable in keep),
        )
    ]
    return _to_plan(new, pieces)


def _even_cut(plan: Plan, variable: str, n: int) -> Plan:
    """``plan`` with ``variable`` cut evenly into ``n`` shards (bytes and traffic pro rata rows
    of the old shards each overlaps), each on the PS that held most of its rows."""
    old = sorted((s for s in plan.shards if s.variable == variable), key=lambda s: s.offset)
    pieces: list[list[Any]] = [
        [s.variable, s.offset, s.rows, s.ps, s.nbytes, s.traffic]
        for s in plan.shards
        if s.variable != variable
    ]
    off = 0
    for r in even_rows(sum(s.rows for s in old), n):
        m = t = 0.0
        share: dict[int, int] = {}
        for s in old:
            k = min(off + r, s.offset + s.rows) - max(off, s.offset)
            if k > 0:
                m += s.nbytes * k / s.rows
                t += s.traffic * k / s.rows
                share[s.ps] = share.get(s.ps, 0) + k
        ps = min(share, key=lambda q: (-share[q], q))
        pieces.append([variable, off, r, ps, m, t])
        off += r
    return _to_plan(plan, pieces)


def _fresh(plan: Plan) -> Plan:
    """A new free-rows plan of the current shards (each keeps its own measured traffic density),
    its PS renumbered so that the most bytes stay where they are, adjacent pieces on one PS merged."""
    sep = "\x00"
    loads = [
        VariableLoad(
            f"{s.variable}{sep}{s.offset:020d}",
            (s.rows,),
            "float32",
            "dense" if s.rows > 1 else "state",
            s.nbytes,
            s.traffic,
        )
        for s in plan.shards
    ]
    new = Planner(rows="free").plan(loads, plan.num_ps, plan.capacities or None)
    p = plan.num_ps
    kept = [[0.0] * p for _ in range(p)]  # kept[new ps][old ps]
    old_ps = {f"{s.variable}{sep}{s.offset:020d}": s.ps for s in plan.shards}
    for s in new.shards:
        kept[s.ps][old_ps[s.variable]] += s.nbytes
    pairs = sorted((-kept[a][b], a, b) for a in range(p) for b in range(p))
    label: dict[int, int] = {}
    used: set[int] = set()
    for _, a, b in pairs:
        if a not in label and b not in used:
            label[a] = b
            used.add(b)
    pieces: list[list[Any]] = []
    for s in new.shards:
        var, base = s.variable.split(sep)
        pieces.append([var, int(base) + s.offset, s.rows, label[s.ps], s.nbytes, s.traffic])
    pieces.sort(key=lambda x: (x[0], x[1]))
    merged: list[list[Any]] = []
    for x in pieces:
        y = merged[-1] if merged else None
        if y is not None and y[0] == x[0] and y[3] == x[3] and y[1] + y[2] == x[1]:
            y[2] += x[2]
            y[4] += x[4]
            y[5] += x[5]
        else:
            merged.append(list(x))
    return _to_plan(plan, merged)


def _cut(pieces: list[list[Any]], i: int, q: int, d: int) -> None:
    """Move the last ``d`` rows of piece ``i`` to PS ``q`` (the whole piece if ``d`` is all its rows)."""
    v, off, r, ps, m, t = pieces[i]
    if d <= 0:
        return
    if d >= r:
        pieces[i][3] = q
        return
    keep = r - d
    pieces[i] = [v, off, keep, ps, m * keep / r, t * keep / r]
    pieces.append([v, off + keep, d, q, m * d / r, t * d / r])


def _cut_pairs(
    x: list[Any],
    y: list[Any],
    mem: list[float],
    tr: list[float],
    top: int,
    q: int,
    m_mean: float,
    t_mean: float,
) -> list[tuple[int, int]]:
    """Rows (d1 of ``x`` off ``top``, d2 of ``y`` off ``q``) that bring ``top`` to the mean, or the pair level."""
    mm, tm = m_mean or 1.0, t_mean or 1.0
    a1, b1 = x[4] / x[2] / mm, x[5] / x[2] / tm
    a2, b2 = y[4] / y[2] / mm, y[5] / y[2] / tm
    det = a1 * b2 - a2 * b1
    if abs(det) < 1e-300:
        return []
    out: set[tuple[int, int]] = set()
    at, bt, aq, bq = mem[top] / mm, tr[top] / tm, mem[q] / mm, tr[q] / tm
    for ea, eb in ((at - 1.0, bt - 1.0), ((at - aq) / 2, (bt - bq) / 2)):
        # d1*a1 - d2*a2 = ea ; d1*b1 - d2*b2 = eb
        d1 = (ea * b2 - a2 * eb) / det
        d2 = (a1 * eb - b1 * ea) / det
        for c1 in (math.floor(d1), math.ceil(d1)):
            for c2 in (math.floor(d2), math.ceil(d2)):
                if 1 <= c1 <= x[2] and 0 <= c2 <= y[2]:
                    out.add((c1, c2))
    return sorted(out)


def _score(
    mem: list[float],
    tr: list[float],
    m_mean: float,
    t_mean: float,
    caps: tuple[int, ...],
    target: float,
    dm: dict[int, float],
    dt: dict[int, float],
) -> float:
    """The excess after changing a few PS's loads by ``dm`` / ``dt``: the sum over PS and both
    dimensions of ``(load / mean - target)^2`` where positive (0: every PS within target; inf
    if over a capacity). Unlike the max it falls whenever any hot PS cools, so ties between
    two hot PS do not stall the search."""
    phi = 0.0
    for q in range(len(mem)):
        mq, tq = mem[q] + dm.get(q, 0.0), tr[q] + dt.get(q, 0.0)
        if caps and mq > caps[q]:
            return math.inf
        for x in (mq / m_mean if m_mean else 0.0, tq / t_mean if t_mean else 0.0):
            if x > target:
                phi += (x - target) ** 2
    return phi


def _cut_sizes(
    r: int,
    m: float,
    t: float,
    mem: list[float],
    tr: list[float],
    top: int,
    q: int,
    m_mean: float,
    t_mean: float,
    target: float,
) -> list[int]:
    """Row counts worth trying when cutting the tail of a shard off ``top`` onto ``q``."""
    out: set[int] = set()
    per_m, per_t = m / r / (m_mean or 1.0), t / r / (t_mean or 1.0)
    a0, b0 = mem[top] / (m_mean or 1.0), tr[top] / (t_mean or 1.0)
    a1, b1 = mem[q] / (m_mean or 1.0), tr[q] / (t_mean or 1.0)
    for y0, s0 in ((a0, per_m), (b0, per_t)):
        for y1, s1 in ((a1, per_m), (b1, per_t)):
            if s0 + s1 > 0:
                d = (y0 - y1) / (s0 + s1)
                out.update(c for c in (math.floor(d), math.ceil(d)) if 1 <= c <= r - 1)
    # just enough rows to bring top down to the target, the cheapest fix when q has room
    for y0, s0 in ((a0, per_m), (b0, per_t)):
        if s0 > 0 and y0 > target:
            d = (y0 - target) / s0
            out.update(c for c in (math.floor(d), math.ceil(d)) if 1 <= c <= r - 1)
    return sorted(out)


def _to_plan(old: Plan, pieces: list[list[Any]]) -> Plan:
    shards = []
    by_var: dict[str, list[list[Any]]] = {}
    for x in pieces:
        by_var.setdefault(x[0], []).append(x)
    for v in sorted(by_var):
        for i, (name, off, r, q, m, t) in enumerate(sorted(by_var[v], key=lambda x: x[1])):
            shards.append(Shard(name, i, off, r, q, m, t))
    return Plan(
        old.num_ps,
        tuple(shards),
        old.lower_bound,
        old.capacities,
        "rebalanced",
        old.total_bytes,
        math.fsum(s.traffic for s in shards),
    )


class RebalancePolicy:
    """Decides, window by window, whether to re-place shards (see the module docstring).

    Args:
        threshold: traffic max/mean over which a window counts as hot (> 1).
        windows: consecutive hot windows that trigger a re-placement.
        target: the max/mean (memory and traffic) the re-placement aims for.
        cuts: how the re-placement may cut shards (see :func:`replan`): ``"free"`` (True)
            anywhere, ``"even"`` into more even shards, ``"none"`` (False) whole shards only.
    """

    def __init__(
        self, threshold: float = 1.10, windows: int = 3, target: float = 1.05, cuts: bool | str = True
    ) -> None:
        if not threshold > 1.0:
            raise BalanceError(f"threshold must be > 1.0 (a max over mean), got {threshold!r}")
        if not isinstance(windows, int) or windows < 1:
            raise BalanceError(f"windows must be an integer >= 1, got {windows!r}")
        if not 1.0 <= target < threshold:
            raise BalanceError(f"target must be in [1.0, threshold={threshold}), got {target!r}")
        self.threshold, self.windows, self.target = threshold, windows, target
        self.cuts = cut_mode(cuts)
        self.hot = 0

    def reset(self) -> None:
        """Forget the hot windows seen (call after a re-placement is applied)."""
        self.hot = 0

    def observe(
        self, plan: Plan, traffic: Mapping[str, float] | Mapping[tuple[str, int], float]
    ) -> RebalanceDecision:
        """Feed one window's per-shard traffic for the placement in force; returns the decision.

        Raises:
            BalanceError: traffic for a shard the plan does not have, or a negative value.
        """
        now = observed(plan, traffic)
        before = now.max_over_mean()
        self.hot = self.hot + 1 if before["traffic"] > self.threshold else 0
        if self.hot < self.windows:
            why = (
                f"traffic max/mean {before['traffic']:.3f} (threshold {self.threshold}), "
                f"hot windows {self.hot}/{self.windows}"
            )
            return RebalanceDecision(False, why, before=before, hot_windows=self.hot)
        new = replan(now, self.target, cuts=self.cuts)
        moved = bytes_moved(now, new)
        after = new.max_over_mean()
        # worth a pause only if it takes off at least half the traffic excess (or reaches the
        # target) without making memory worse than it is or than the target
        goal = max(self.target, before["traffic"] - 0.5 * (before["traffic"] - self.target))
        better = (
            after["traffic"] <= goal + 1e-9 and after["memory"] <= max(before["memory"], self.target) + 1e-9
        )
        if not better or moved <= 0.0:
            # nothing the allowed cuts can build is better enough: a pause would buy little
            why = (
                f"traffic max/mean {before['traffic']:.3f} > {self.threshold} for {self.hot} windows, "
                f"but no re-placement with cuts={self.cuts!r} takes off half the excess "
                f"(best: traffic {after['traffic']:.3f}, memory {after['memory']:.3f})"
            )
            return RebalanceDecision(False, why, before=before, hot_windows=self.hot)
        why = (
            f"traffic max/mean {before['traffic']:.3f} > {self.threshold} for {self.hot} windows; "
            f"re-placement moves {moved:.0f} bytes, "
            f"max/mean memory {after['memory']:.3f} traffic {after['traffic']:.3f}"
        )
        return RebalanceDecision(
            True, why, new, moved, min_bytes_to_move(now, self.target, self.cuts), before, after, self.hot
        )
