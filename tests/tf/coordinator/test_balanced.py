"""Unit tests of the balanced plan under the coordinator mode, without a cluster: the plan's
partitioner, the planning passes, the applier on the cut model, the load report and the
traffic meter's counting, and ``placement="balanced"`` by name."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tensorflow as tf

from kubeai_train.tf import PlacementError, RoundRobinPlacement
from kubeai_train.tf.balanced import BalancedPlacement, load_report, placement_policy
from kubeai_train.tf.cli import PLACEMENTS
from kubeai_train.tf.coordinator import TablesModel
from kubeai_train.tf.coordinator.balanced import (
    PlanPartitioner,
    TrafficMeter,
    plan_build,
    planned_loads,
    resident_bytes,
)
from kubeai_train.tf.coordinator.placement import PlanApplier, infos, snapshot_build, verify
from kubeai_train.tf.export import placement_load

TABLES = {"C1": 8000, "C2": 3000, "C3": 600, "C4": 120}


def test_partitioner_cuts_by_creation_order_and_stops_at_a_shape_it_did_not_plan(caplog):
    part = PlanPartitioner()
    assert part(tf.TensorShape([10, 4])) == [1, 1]  # unbound: no cut
    part.bind([((10, 4), 3), ((7,), 1), ((5, 2), 2)])
    assert part(shape=tf.TensorShape([10, 4]), dtype=tf.float32) == [3, 1]
    assert part(shape=tf.TensorShape([7])) == [1]
    with caplog.at_level(logging.WARNING, logger="kubeai_train.tf"):
        assert part(shape=tf.TensorShape([6, 2])) == [1, 1]  # not (5, 2): not cut, nor later ones
    assert "variable #2 has shape (6, 2)" in part.broken and "balanced partitioner" in caplog.text
    assert part(shape=tf.TensorShape([99, 2])) == [1, 1]
    part.reset()
    assert part.broken is None and part(tf.TensorShape([10, 4])) == [3, 1]


def test_plan_build_cuts_the_big_tables_evenly_and_is_deterministic():
    model = TablesModel(TABLES)
    planned, plan, bplan = plan_build(model.build, BalancedPlacement(), PlanPartitioner(), 2, 256)
    again = plan_build(model.build, BalancedPlacement(), PlanPartitioner(), 2, 256)
    assert again[1].assignment == plan.assignment and again[2].shard_counts() == bplan.shard_counts()
    shapes = {p.name: p.shape for p in planned}
    assert shapes["emb_C1/part_0"] == shapes["emb_C1/part_1"] == (4000, 8)  # TF's even cut
    assert {p.name for p in planned} == set(plan.assignment) and plan.policy == "balanced"
    # dense weights are never cut; no variable gets more shards than PS
    assert all(c == 1 for n, c in bplan.shard_counts().items() if n.startswith("mlp"))
    assert max(bplan.shard_counts().values()) <= 2
    mem, traffic = planned_loads(planned, plan, 256)
    assert mem == pytest.approx(bplan.memory()) and traffic == pytest.approx(bplan.traffic())
    # round-robin of the same model (nothing cut by MinSize at 256 KiB) is far less even
    cut = tf.distribute.experimental.partitioners.MinSizePartitioner(256 << 10, max_shards=2)
    rr_planned = snapshot_build(model.build, cut)
    rr = RoundRobinPlacement().plan(infos(rr_planned, 256), 2)
    rr_mem, _ = planned_loads(rr_planned, rr, 256)
    assert max(rr_mem) / (sum(rr_mem) / 2) > 1.4 > 1.05 > max(mem) / (sum(mem) / 2)


def test_applier_places_the_cut_model_where_the_plan_says_and_resident_bytes_follow():
    model = TablesModel(TABLES)
    part = PlanPartitioner()
    planned, plan, _ = plan_build(model.build, BalancedPlacement(), part, 2, 256)
    applier = PlanApplier(planned, plan)
    with tf.Graph().as_default():
        # no strategy here: cut as the strategy would, shard by shard, below the applier
        def cutter(next_creator, **kwargs):
            shape = kwargs.get("shape")
            if shape is None:
                init = kwargs["initial_value"]
                shape = tf.convert_to_tensor(init() if callable(init) else init).shape
            shape = tuple(shape)
            n = part(tf.TensorShape(shape))[0] if shape else 1
            if n == 1:
                return next_creator(**kwargs)
            rows = [shape[0] // n + (1 if i < shape[0] % n else 0) for i in range(n)]
            parts = []
            for i, r in enumerate(rows):
                part_shape = (r, *shape[1:])
                parts.append(
                    next_creator(
                        **{
                            **kwargs,
                            "name": f"{kwargs['name']}/part_{i}",
                            "shape": part_shape,
                            "initial_value": lambda s=part_shape: tf.zeros(s),
                        }
                    )
                )
            return parts[0]

        with tf.variable_creator_scope(applier), tf.variable_creator_scope(cutter):
            model.build()
        applier.finish()
        report = verify(applier)
        assert report["applied"], report
        per_ps = resident_bytes([v for _, v in applier.created], 2)
    expected = [0, 0]
    for p in planned:
        expected[plan.assignment[p.name]] += int(np.prod(p.shape)) * 4
    assert per_ps == expected and sum(per_ps) == 4 * (
        sum(r * 8 for r in TABLES.values()) + 33 * 64 + 64 + 64 + 1
    )


def test_traffic_meter_counts_gathered_ids_and_distinct_rows_per_device():
    table = tf.Variable(tf.zeros([10, 4]), name="emb")
    dense = tf.Variable(tf.zeros([3, 2]), name="w")
    step = tf.Variable(0, dtype=tf.int64, name="step")
    meter = TrafficMeter([table, dense], extra=[(step, 16)])
    meter.record([tf.IndexedSlices(tf.ones([5, 4]), tf.constant([1, 1, 2, 7, 7])), tf.ones([3, 2])])
    meter.record([tf.IndexedSlices(tf.ones([1, 4]), tf.constant([3])), None])
    # the table on PS 1, the rest on PS 0 (as the variables' devices would say on a cluster)
    steps, per_ps = meter.per_ps(2, devices=["/job:ps/task:1", "/job:ps/task:0", "/job:ps/task:0"])
    assert steps == 2
    row = 16
    # step 1: 5 ids gathered + 3 x 3 distinct rows; step 2: 1 + 3 x 1
    assert per_ps[1] == pytest.approx(((5 + 9) * row + (1 + 3) * row) / 2)
    # the dense weight 4 x its 24 bytes in step 1, nothing in step 2; the step counter 16 a step
    assert per_ps[0] == pytest.approx(4 * 24 / 2 + 16)
    # local variables are on no PS: nothing counted
    assert meter.per_ps(2)[1] == [0.0, 0.0]


def test_load_report_and_published_summary():
    base = {"policy": "balanced", "num_ps": 2, "ps": [{"task": 0, "bytes": 1}, {"task": 1, "bytes": 1}]}
    planned = load_report(base, ([10.0, 30.0], [5.0, 5.0]), None)
    assert "measured" not in planned and planned["ps"][0]["planned_bytes"] == 10.0
    assert planned["max_over_mean"]["planned"] == {"memory": 1.5, "traffic": 1.0}
    measured = load_report(planned, ([10.0, 30.0], [5.0, 5.0]), ([12, 28], [4.0, 6.0]), steps=7)
    assert measured["measured"]["steps"] == 7
    assert measured["max_over_mean"]["measured"] == {"memory": 1.4, "traffic": 1.2}
    summary = placement_load(measured)
    assert summary["policy"] == "balanced" and summary["num_ps"] == 2
    assert summary["ps"][1] == {
        "task": 1,
        "planned_bytes": 30.0,
        "planned_traffic": 5.0,
        "measured_bytes": 28.0,
        "measured_traffic": 6.0,
    }
    assert placement_load(None) is None and placement_load(base) is None


def test_policies_by_name():
    assert "balanced" in PLACEMENTS
    assert isinstance(placement_policy("balanced"), BalancedPlacement)
    assert isinstance(placement_policy(None), RoundRobinPlacement)
    policy = BalancedPlacement()
    assert placement_policy(policy) is policy
    with pytest.raises(PlacementError, match="placement must be one of round_robin, greedy_bytes, balanced"):
        placement_policy("hot_spot")


def test_balanced_plan_over_a_snapshot_names_the_cut_shards():
    cut = tf.distribute.experimental.partitioners.FixedShardsPartitioner(2)
    snap = infos(snapshot_build(TablesModel(TABLES).build, cut), 256)
    policy = BalancedPlacement()
    plan = policy.plan(snap, 2)
    counts = policy.last.shard_counts()
    for name, task in plan.assignment.items():
        base = name.rsplit("/part_", 1)[0]
        assert 0 <= task < 2 and (counts[base] > 1) == ("/part_" in name)
    with pytest.raises(PlacementError, match="num_ps must be an integer >= 1, got 0"):
        policy.plan(snap, 0)
