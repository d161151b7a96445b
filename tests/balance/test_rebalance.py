"""The rebalancing policy on hand-made window sequences: a table's hot set shifts mid-run."""

from __future__ import annotations

import pytest

from kubeai_train.balance import BalanceError, Planner, RebalancePolicy, dense, embedding
from kubeai_train.balance.planner import even_rows
from kubeai_train.balance.rebalance import bytes_moved, min_bytes_to_move, observed, replan
from kubeai_train.balance.types import Plan, Shard


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


def _four_tables_two_hot_on_one_ps():
    # four equal tables on 2 PS (t0, t2 on PS 0; t1, t3 on PS 1); then t0 and t2 turn hot
    plan = Planner(rows="even").plan([embedding(f"t{i}", 10_000, 16, batch_size=512) for i in range(4)], 2)
    assert len(plan.shards) == 4
    on0 = [s.key for s in plan.shards if s.ps == 0]
    traffic = {s.key: s.traffic * (3.0 if s.key in on0 else 1.0) for s in plan.shards}
    return plan, traffic


def test_whole_shard_minimum_is_exact_where_the_fractional_bound_is_loose():
    plan, traffic = _four_tables_two_hot_on_one_ps()
    now = observed(plan, traffic)
    shard = plan.shards[0].nbytes
    # cutting rows, a quarter of one hot table's rows could go; whole shards need a swap
    assert min_bytes_to_move(now, 1.05) < shard
    assert min_bytes_to_move(now, 1.05, cuts=False) == pytest.approx(2 * shard)
    new = replan(now, 1.05, cuts=False)
    assert max(new.max_over_mean().values()) <= 1.05 + 1e-9
    assert bytes_moved(now, new) == pytest.approx(min_bytes_to_move(now, 1.05, cuts=False))
    # a search over its node budget falls back to the fractional bound (still a bound)
    assert min_bytes_to_move(now, 1.05, cuts=False, max_nodes=2) == min_bytes_to_move(now, 1.05)


def test_policy_reports_the_whole_shard_minimum_when_it_may_not_cut():
    plan, traffic = _four_tables_two_hot_on_one_ps()
    policy = RebalancePolicy(windows=1, cuts=False)
    d = policy.observe(plan, traffic)
    assert d.rebalance and d.bytes_moved == pytest.approx(d.min_bytes)


def test_even_recut_splits_a_hot_table_where_no_whole_shard_move_helps():
    # two equal tables, one per PS; t1's lookups collapse onto one row, so t0's PS moves ~all bytes
    nbytes = 2_000 * 16 * 4
    shards = (Shard("t0", 0, 0, 2_000, 0, nbytes, 1.0), Shard("t1", 0, 0, 2_000, 1, nbytes, 1.0))
    plan = Plan(2, shards, 1.0, (), "hand-made", 2 * nbytes, 2.0)
    traffic = {"t0": 1.0, "t1": 0.005}
    now = observed(plan, traffic)
    assert now.max_over_mean()["traffic"] > 1.9
    assert RebalancePolicy(windows=1, cuts="none").observe(plan, traffic).rebalance is False  # nothing helps
    d = RebalancePolicy(windows=1, cuts="even").observe(plan, traffic)
    assert d.rebalance and d.after["traffic"] <= 1.05 and d.after["memory"] <= 1.05, d.reason
    # what TensorFlow's partitioners build: even rows, at most one shard per PS
    for name, rows in d.plan.rows().items():
        assert rows == even_rows(2_000, len(rows)) and len(rows) <= 2, (name, rows)
    assert d.min_bytes <= d.bytes_moved <= 2 * 16_000 * 4  # at most half of each table moves


def test_cut_modes_are_checked():
    with pytest.raises(BalanceError, match="cuts must be one of"):
        RebalancePolicy(cuts="uneven")


def test_even_recut_moves_the_exact_even_minimum_on_a_hand_made_case():
    # the live test's shape: t0 hot on PS 0 with t1; t2, t3 on PS 1; whole moves cannot fix it
    nbytes = 2_000 * 16 * 4 * 2
    shards = tuple(Shard(f"t{i}", 0, 0, 2_000, [0, 0, 1, 1][i], nbytes, 1.0) for i in range(4))
    plan = Plan(2, shards, 1.0, (), "hand-made", 4 * nbytes, 4.0)
    traffic = {"t0": 2.0, "t1": 1.0, "t2": 1.0, "t3": 1.0}
    now = observed(plan, traffic)
    assert min_bytes_to_move(now, 1.05, cuts="none") == min_bytes_to_move(now, 1.05)  # none reaches it
    exact = min_bytes_to_move(now, 1.05, cuts="even")
    assert exact == pytest.approx(nbytes)  # half of t0 out, half of a cold table back
    assert exact > min_bytes_to_move(now, 1.05)  # the fractional bound assumes uneven cuts
    d = RebalancePolicy(windows=1, cuts="even").observe(plan, traffic)
    assert d.rebalance and d.bytes_moved == pytest.approx(exact) and d.min_bytes == pytest.approx(exact)
