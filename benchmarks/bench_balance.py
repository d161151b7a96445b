"""PS placement policies side by side on the same load model: max/mean memory and traffic per PS.

Table sets: the 26 Criteo-Kaggle tables (the cardinalities of facebookresearch/dlrm's Kaggle
preprocessing; dim 16, fp32, Adam's two slots so x3 bytes, DLRM MLPs bottom 13-512-256-64-16 and
top 367-512-256-1, batch 512, ids Zipf(1.05) within each table) and synthetic sets of 10, 100 and
1,000 tables (rows Pareto-distributed between 10 and 20M, ids Zipf(1.05), the same MLPs), each
at P in {2, 4, 8, 16, 64} parameter servers. Policies, all on the same per-variable loads:

* ``round_robin``: whole variables in creation order, variable i on PS i % P (TF's default);
* ``greedy_bytes``: whole variables, largest first onto the PS with the fewest bytes;
* ``tf_fixed+rr``: tables cut by ``fixed_size_partitioner(P)`` (min(P, rows) even shards), every
  variable / shard placed round-robin in creation order, as ``replica_device_setter`` does;
* ``tf_minmax+rr``: tables cut by ``min_max_variable_partitioner(max_partitions=P,
  min_slice_size=256K)`` (max(1, min(rows, P, ceil(table bytes / 256K)))), then round-robin;
* ``balanced`` / ``balanced_even``: :class:`kubeai_train.balance.Planner` with free / even rows.

Printed per row: max/mean memory, max/mean traffic, the planner's lower bound on the normalised
max, the ratio of the worst of the two to that bound, and the time to plan.

    python benchmarks/bench_balance.py [--sets criteo,10,100,1000] [--ps 2,4,8,16,64]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import numpy as np

from kubeai_train.balance import Planner, VariableLoad, dense, embedding, lower_bound
from kubeai_train.balance.types import max_over_mean
from kubeai_train.testing.ctr import CRITEO_KAGGLE_CARDINALITIES

CRITEO_KAGGLE = CRITEO_KAGGLE_CARDINALITIES
MIN_SLICE = 256 << 10
SLOTS = 2  # Adam: m and v


def _mlp(prefix: str, dims: list[int]) -> list[VariableLoad]:
    out = []
    for i, (a, b) in enumerate(zip(dims, dims[1:], strict=False)):
        out += [
            dense(f"{prefix}{i}/kernel", (a, b), slots=SLOTS),
            dense(f"{prefix}{i}/bias", (b,), slots=SLOTS),
        ]
    return out


def model(cardinalities: list[int]) -> list[VariableLoad]:
    """DLRM's variables in creation order: bottom MLP, tables, top MLP."""
    tables = [
        embedding(f"emb_{i:04d}", c, 16, batch_size=512, slots=SLOTS, zipf=1.05)
        for i, c in enumerate(cardinalities)
    ]
    return _mlp("bot", [13, 512, 256, 64, 16]) + tables + _mlp("top", [367, 512, 256, 1])


def synthetic(n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed + n)
    return [int(x) for x in np.clip(10 * (1 + rng.pareto(0.6, n)), 10, 20_000_000)]


def _loads(pieces: list[tuple[VariableLoad, int, int]], p: int) -> tuple[list[float], list[float]]:
    """pieces: (variable, rows of the piece, ps)."""
    mem, tr = [0.0] * p, [0.0] * p
    for v, rows, ps in pieces:
        mem[ps] += v.nbytes * rows / v.rows
        tr[ps] += v.traffic * rows / v.rows
    return mem, tr


def round_robin(vs: list[VariableLoad], p: int) -> list[tuple[VariableLoad, int, int]]:
    return [(v, v.rows, i % p) for i, v in enumerate(vs)]


def greedy_bytes(vs: list[VariableLoad], p: int) -> list[tuple[VariableLoad, int, int]]:
    load = [0.0] * p
    out = []
    for v in sorted(vs, key=lambda v: (-v.nbytes, v.name)):
        q = min(range(p), key=lambda t: (load[t], t))
        load[q] += v.nbytes
        out.append((v, v.rows, q))
    return out


def _tf_rr(shards_of: Callable[[VariableLoad, int], int]) -> Callable[[list[VariableLoad], int], list]:
    def policy(vs: list[VariableLoad], p: int) -> list[tuple[VariableLoad, int, int]]:
        out, i = [], 0
        for v in vs:
            k = shards_of(v, p) if v.kind == "embedding" else 1
            base, extra = divmod(v.rows, k)
            for j in range(k):
                out.append((v, base + (1 if j < extra else 0), i % p))
                i += 1
        return out

    return policy


def _fixed(v: VariableLoad, p: int) -> int:
    return min(p, v.rows)


def _minmax(v: VariableLoad, p: int) -> int:
    table_bytes = v.nbytes / (1 + SLOTS)  # the partitioner sees the variable, not its slots
    return max(1, min(v.rows, p, math.ceil(table_bytes / MIN_SLICE)))


def _balanced(rows: str) -> Callable[[list[VariableLoad], int], list]:
    def policy(vs: list[VariableLoad], p: int) -> list[tuple[VariableLoad, int, int]]:
        plan = Planner(rows=rows).plan(vs, p)
        by = {v.name: v for v in vs}
        return [(by[s.variable], s.rows, s.ps) for s in plan.shards]

    return policy


POLICIES = {
    "round_robin": round_robin,
    "greedy_bytes": greedy_bytes,
    "tf_fixed+rr": _tf_rr(_fixed),
    "tf_minmax+rr": _tf_rr(_minmax),
    "balanced": _balanced("free"),
    "balanced_even": _balanced("even"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="criteo,10,100,1000")
    ap.add_argument("--ps", default="2,4,8,16,64")
    args = ap.parse_args()
    sets = {s: (CRITEO_KAGGLE if s == "criteo" else synthetic(int(s))) for s in args.sets.split(",")}
    print(
        f"{'set':>8} {'P':>3} {'policy':>14} {'mem max/mean':>12} {'traffic max/mean':>16} "
        f"{'bound':>7} {'worst/bound':>11} {'shards':>6} {'plan s':>7}"
    )
    for name, cards in sets.items():
        vs = model(cards)
        for p in (int(x) for x in args.ps.split(",")):
            bound = lower_bound(vs, p)
            for pol, fn in POLICIES.items():
                t0 = time.perf_counter()
                pieces = fn(vs, p)
                dt = time.perf_counter() - t0
                mem, tr = _loads(pieces, p)
                mm, mt = max_over_mean(mem), max_over_mean(tr)
                print(
                    f"{name:>8} {p:>3} {pol:>14} {mm:>12.3f} {mt:>16.3f} {bound:>7.3f} "
                    f"{max(mm, mt) / bound:>11.3f} {len(pieces):>6} {dt:>7.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
