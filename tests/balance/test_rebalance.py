"""The rebalancing policy on hand-made window sequences: a table's hot set shifts mid-run."""

from __future__ import annotations

import pytest

from kubeai_train.balance import BalanceError, Planner, RebalancePolicy, dense, embedding
from kubeai_train.balance.rebalance import bytes_moved, min_bytes_to_move, replan


def _model(num_tables: int = 40, mlp: bool = True):
    tables = [
        embedding(f"t{i:02d}", 50_000 * (1 + i % 5), 16, batch_size=512, slots=2, zipf=1.0)
        for i in range(num_tables)
    ]
    if mlp:
        tables += [dense("mlp/k0", (367, 512), slots=2), dense("mlp/k1", (512, 256), slots=2)]
    return tables


def _windows(plan, hot_shard, factor, calm=2, hot=5):
    base = {s.key: s.traffic for s in plan.shards}
    shifted = {k: t * (factor if k == hot_shard else 1.0) for k, t in base.items()}
    return [base] * calm + [shifted] * hot


@pytest.mark.parametrize(
    ("num_ps", "factor", "mlp"), [(4, 8, True), (8, 8, True), (4, 8, False), (8, 4, False)]
)
def test_hot_set_shift_detected_within_three_windows_and_fixed_cheaply(num_ps, factor, mlp):
    plan = Planner(rows="even").plan(_model(mlp=mlp), num_ps)
    policy = RebalancePolicy()
    hot_key = next(s.key for s in plan.shards if s.variable == "t03")
    decisions = [policy.observe(plan, w) for w in _windows(plan, hot_key, factor)]
    assert [d.rebalance for d in decisions[:2]] == [False, False]  # calm windows
    fired = [i for i, d in enumerate(decisions) if d.rebalance]
    assert fired and fired[0] - 2 <= 2  # the third hot window at the latest
    d = decisions[fired[0]]
    assert d.before["traffic"] > 1.10
    assert d.after["traffic"] <= 1.05 + 1e-6 and d.after["memory"] <= 1.05 + 1e-6
    assert d.bytes_moved <= 1.5 * d.min_bytes
    # the new plan still covers every row of every variable exactly once, at most P shards each
    for name, rows in d.plan.rows().items():
        assert sum(rows) == sum(plan.rows()[name]) and len(rows) <= num_ps
    # after applying it, the same load is calm
    policy.reset()
    assert not policy.observe(d.plan, {s.key: s.traffic for s in d.plan.shards}).rebalance


def test_a_short_spike_does_not_trigger():
    plan = Planner(rows="even").plan(_model(), 4)
    policy = RebalancePolicy(windows=3)
    base = {s.key: s.traffic for s in plan.shards}
    spike = {k: t * (6 if k == plan.shards[0].key else 1) for k, t in base.items()}
    for w in [spike, spike, base, spike, spike, base]:
        assert not policy.observe(plan, w).rebalance


def test_replan_keeps_a_balanced_placement_and_bytes_moved_counts_rows():
    plan = Planner().plan(_model(12), 4)
    assert bytes_moved(plan, replan(plan)) == 0.0
    assert min_bytes_to_move(plan) == 0.0


def test_bad_observations_and_settings():
    plan = Planner().plan(_model(4, mlp=False), 2)
    with pytest.raises(BalanceError, match="not a shard"):
        RebalancePolicy().observe(plan, {"nope/part_9": 1.0})
    with pytest.raises(BalanceError, match="finite"):
        RebalancePolicy().observe(plan, {plan.shards[0].key: -1.0})
    with pytest.raises(BalanceError, match="threshold"):
        RebalancePolicy(threshold=0.9)
    with pytest.raises(BalanceError, match="windows"):
        RebalancePolicy(windows=0)


def test_without_cuts_only_whole_shards_move():
    plan = Planner(rows="even").plan(_model(), 8)
    hot_key = next(s.key for s in plan.shards if s.variable == "t03")
    policy = RebalancePolicy(cuts=False)
    decisions = [policy.observe(plan, w) for w in _windows(plan, hot_key, 4)]
    d = next(d for d in decisions if d.rebalance)
    assert d.plan.rows() == plan.rows()  # same shards, same rows: a TF partitioner can express it
    assert d.after["traffic"] < d.before["traffic"]
    assert d.bytes_moved > 0
