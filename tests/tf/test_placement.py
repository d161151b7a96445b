"""Placement policies on hand-made snapshots, the snapshot of a real graph, and the ps_strategy bridge."""

from __future__ import annotations

import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from kubeai_train.tf.between_graph.placement import PlanStrategy, actual_placement, placement_report, snapshot
from kubeai_train.tf.features import CtrFeatures
from kubeai_train.tf.models import DeepFM
from kubeai_train.tf.placement_policies import GreedyBytesPlacement, RoundRobinPlacement
from kubeai_train.tf.types import PlacementError, PlacementPlan, VariableInfo

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


def _deepfm_graph(num_ps):
    g = tf.Graph()
    with g.as_default():
        m = DeepFM(features=CtrFeatures(hash_buckets=100), embedding_dim=4, hidden=(8,))
        feats = {
            n: tf.compat.v1.placeholder(tf.string if k == "string" else tf.float32, [None])
            for n, k in m.raw_features().items()
        }
        loss = tf.reduce_mean(m.logits(feats, num_ps=num_ps, training=True))
        m.optimizer().minimize(loss, global_step=tf.compat.v1.train.get_or_create_global_step())
    return g


def test_snapshot_of_a_real_graph_folds_slots_into_their_variables():
    vs = snapshot(_deepfm_graph(num_ps=2), batch_size=64)
    names = [v.name for v in vs]
    assert "deepfm/emb_v/part_0" in names and "deepfm/emb_v/part_1" in names
    assert not any("Adagrad" in n for n in names)  # slots follow their primary
    emb = next(v for v in vs if v.name == "deepfm/emb_v/part_0")
    # 26*100/2 rows x 4 floats, plus the Adagrad accumulator of the same size
    assert emb.shape == (1300, 4) and emb.nbytes == 2 * 1300 * 4 * 4
    assert emb.kind == "embedding" and emb.group == "deepfm/emb_v"
    assert emb.traffic == 2 * 2 * 64 * 4 * 4  # read + update of 64 rows, variable and slot
    dense = next(v for v in vs if v.name == "deepfm/mlp_0/kernel")
    assert dense.kind == "dense" and dense.traffic == 2 * dense.nbytes


def test_plan_applied_through_replica_device_setter_and_reported():
    vs = snapshot(_deepfm_graph(num_ps=2))
    plan = GreedyBytesPlacement().plan(vs, 2)
    g = tf.Graph()
    with g.as_default():
        strategy = PlanStrategy(plan, pinned=lambda n: 1 if n == "pinned_var" else None)
        setter = tf.compat.v1.train.replica_device_setter(
            ps_tasks=2, worker_device="/job:worker/task:0", ps_strategy=strategy
        )
        with tf.compat.v1.device(setter):
            m = DeepFM(features=CtrFeatures(hash_buckets=100), embedding_dim=4, hidden=(8,))
            feats = {
                n: tf.compat.v1.placeholder(tf.string if k == "string" else tf.float32, [None])
                for n, k in m.raw_features().items()
            }
            loss = tf.reduce_mean(m.logits(feats, num_ps=2, training=True))
            m.optimizer().minimize(loss, global_step=tf.compat.v1.train.get_or_create_global_step())
            tf.compat.v1.get_variable("pinned_var", [], initializer=tf.compat.v1.zeros_initializer())
            tf.compat.v1.get_variable("late_var", [3], initializer=tf.compat.v1.zeros_initializer())
    devices = actual_placement(g)
    for name, task in plan.assignment.items():
        assert devices[name].endswith(f"/job:ps/task:{task}")
    assert devices["deepfm/emb_v/part_0/Adagrad"] == devices["deepfm/emb_v/part_0"]
    assert devices["pinned_var"].endswith("task:1")
    assert strategy.unplanned == ["late_var"]
    rep = placement_report(plan, vs, g)
    assert set(rep["groups"]["deepfm/emb_v"]["shards"].values()) == {0, 1}
    assert sum(p["bytes"] for p in rep["ps"]) == sum(v.nbytes for v in vs)


def test_report_detects_a_plan_that_was_not_applied():
    g = _deepfm_graph(num_ps=2)  # built without a device setter: nothing is on a PS
    with g.as_default(), tf.compat.v1.device("/job:ps/task:0"):
        tf.compat.v1.get_variable("x", [2])
    vs = [VariableInfo("x", (2,), "float32", 8)]
    with pytest.raises(PlacementError, match="not where the plan put them"):
        placement_report(PlacementPlan({"x": 1}, 2, "p"), vs, g)
