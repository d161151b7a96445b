"""The between-graph placement bridge (kubeai_train.tf.between_graph.placement): the snapshot of
a real graph, the ps_strategy that applies a plan, and the report of where variables went."""

from __future__ import annotations

import pytest
import tensorflow as tf

from kubeai_train.tf.between_graph.placement import PlanStrategy, actual_placement, placement_report, snapshot
from kubeai_train.tf.features import CtrFeatures
from kubeai_train.tf.models import DeepFM
from kubeai_train.tf.placement_policies import GreedyBytesPlacement
from kubeai_train.tf.types import PlacementError, PlacementPlan, VariableInfo


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
