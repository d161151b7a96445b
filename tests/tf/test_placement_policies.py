"""Placement policies (kubeai_train.tf.placement_policies) on hand-made snapshots."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kubeai_train.tf.placement_policies import GreedyBytesPlacement, RoundRobinPlacement
from kubeai_train.tf.types import VariableInfo

sizes = st.lists(st.integers(0, 10_000), min_size=1, max_size=30)


def _vars(nbytes):
    return [VariableInfo(f"v{i}", (n,), "float32", n * 4) for i, n in enumerate(nbytes)]


@settings(max_examples=50, deadline=None)
@given(sizes, st.integers(1, 5))
def test_policies_place_every_variable_deterministically(nbytes, num_ps):
    vs = _vars(nbytes)
    for policy in (RoundRobinPlacement(), GreedyBytesPlacement()):
        plan = policy.plan(vs, num_ps)
        plan.validate(vs)
        assert plan == policy.plan(vs, num_ps)
        assert all(0 <= t < num_ps for t in plan.assignment.values())


@settings(max_examples=50, deadline=None)
@given(sizes, st.integers(1, 5))
def test_greedy_bytes_is_within_one_variable_of_even(nbytes, num_ps):
    vs = _vars(nbytes)
    rep = GreedyBytesPlacement().plan(vs, num_ps).report(vs)
    loads = [p["bytes"] for p in rep["ps"]]
    # LPT bound: the most loaded PS exceeds the least by at most the largest variable
    assert max(loads) - min(loads) <= max(v.nbytes for v in vs)


def test_round_robin_order_and_greedy_beats_it_on_a_skewed_snapshot():
    vs = _vars([1000, 1, 1000, 1])
    rr = RoundRobinPlacement().plan(vs, 2)
    assert [rr.assignment[f"v{i}"] for i in range(4)] == [0, 1, 0, 1]
    assert rr.report(vs)["bytes_max_over_mean"] > 1.9
    assert GreedyBytesPlacement().plan(vs, 2).report(vs)["bytes_max_over_mean"] < 1.01
