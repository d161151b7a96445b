"""Runtime rebalancing on simulated drift: a table's hot set shifts onto one shard mid-run.

For table sets of 12 and 40 embedding tables (rows 50K..250K, dim 16, Adam slots, Zipf(1.0) ids,
optionally two DLRM-sized dense kernels) planned with ``Planner(rows="even")`` at P in {4, 8},
the per-shard traffic of windows is the plan's own for 2 windows, then shard 0 of one table gets
F x its traffic (F in {2, 4, 8}) for 5 windows. :class:`kubeai_train.balance.RebalancePolicy`
(threshold 1.10, 3 windows, target 1.05) sees the windows one by one. Printed: the traffic
max/mean once hot, the window (counted from the shift) at which it re-plans, the max/mean
memory and traffic after, the bytes it moves, the lower bound on bytes to move and their ratio,
and the re-plan time. Rows without a trigger stayed under the threshold. ``cuts`` says how the
re-placement may cut shards: ``free`` anywhere (the planner's own), ``even`` into more even shards
(what TensorFlow's partitioners build, so what the TF trainer applies), ``none`` whole shards only
(its minimum is then exact, by search, where the search is small enough).

    python benchmarks/bench_balance_drift.py
"""

from __future__ import annotations

import itertools
import time

from kubeai_train.balance import Planner, RebalancePolicy, dense, embedding
from kubeai_train.balance.rebalance import observed


def main() -> None:
    print(
        f"{'cuts':>5} {'tables':>6} {'mlp':>4} {'P':>2} {'F':>2} {'hot max/mean':>12} {'fired at':>8} "
        f"{'mem after':>9} {'traffic after':>13} {'MB moved':>9} {'MB min':>7} {'ratio':>6} {'s':>6}"
    )
    for cuts, ntab, mlp, p, f in itertools.product(
        ("free", "even", "none"), (12, 40), (False, True), (4, 8), (2, 4, 8)
    ):
        vs = [
            embedding(f"t{i:02d}", 50_000 * (1 + i % 5), 16, batch_size=512, slots=2, zipf=1.0)
            for i in range(ntab)
        ]
        if mlp:
            vs += [dense("mlp/k0", (367, 512), slots=2), dense("mlp/k1", (512, 256), slots=2)]
        plan = Planner(rows="even").plan(vs, p)
        base = {s.key: s.traffic for s in plan.shards}
        hot_key = next(s.key for s in plan.shards if s.variable == "t03")
        hot = {k: t * (f if k == hot_key else 1.0) for k, t in base.items()}
        policy = RebalancePolicy(cuts=cuts)
        fired = None
        for w, window in enumerate([base] * 2 + [hot] * 5):
            t0 = time.perf_counter()
            d = policy.observe(plan, window)
            dt = time.perf_counter() - t0
            if d.rebalance:
                fired = (w - 1, d, dt)
                break
        before = observed(plan, hot).max_over_mean()["traffic"]
        if fired is None:
            print(f"{cuts:>5} {ntab:>6} {mlp!s:>4} {p:>2} {f:>2} {before:>12.3f} {'-':>8}")
            continue
        w, d, dt = fired
        ratio = d.bytes_moved / d.min_bytes if d.min_bytes else float("nan")
        print(
            f"{cuts:>5} {ntab:>6} {mlp!s:>4} {p:>2} {f:>2} {before:>12.3f} {w:>8} {d.after['memory']:>9.3f} "
            f"{d.after['traffic']:>13.3f} {d.bytes_moved / 1e6:>9.2f} {d.min_bytes / 1e6:>7.2f} {ratio:>6.2f} {dt:>6.2f}"
        )


if __name__ == "__main__":
    main()
