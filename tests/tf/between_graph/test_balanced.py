"""The balanced plan in between-graph mode without a cluster: the custom getter cuts each
``get_variable`` table at the plan's count, and ``PlanStrategy`` puts every shard (and its
optimizer slots) on the planned PS of a graph built the trainer's way."""

from __future__ import annotations

import tensorflow as tf

from kubeai_train.tf import CtrFeatures, DeepFM
from kubeai_train.tf.balanced import BalancedPlacement
from kubeai_train.tf.between_graph.balanced import shard_counts_scope
from kubeai_train.tf.between_graph.placement import PlanStrategy, placement_report, snapshot
from kubeai_train.tf.between_graph.trainer import _cut_snapshot
from kubeai_train.tf.placement_policies import check_plan


def _graph(model, counts, setter=None):
    g = tf.Graph()
    with g.as_default(), tf.compat.v1.device(setter), shard_counts_scope(counts):
        feats = {
            n: tf.compat.v1.placeholder(tf.string if k == "string" else tf.float32, [None])
            for n, k in model.raw_features().items()
        }
        labels = tf.compat.v1.placeholder(tf.float32, [None])
        step = tf.compat.v1.train.get_or_create_global_step()
        logits = model.logits(feats, num_ps=3, training=True)
        loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))
        model.optimizer().minimize(loss, global_step=step)
    return g


def test_whole_planning_pass_then_the_real_graph_cut_and_placed_at_the_plan():
    model = DeepFM(features=CtrFeatures(hash_buckets=3000), embedding_dim=8)
    # the planning pass: the model asks for partitioner(3), the getter makes every variable whole
    whole = snapshot(_graph(model, None), 512)
    assert not any("/part_" in v.name for v in whole)
    policy = BalancedPlacement()
    plan = policy.plan(whole, 3)
    counts = policy.last.shard_counts()
    table = next(v.name for v in whole if v.name.endswith("emb_v"))
    assert counts[table] == 3  # the big shared table is cut over all three PS
    assert all(c == 1 for n, c in counts.items() if "emb" not in n)
    cut = _cut_snapshot(whole, policy.last)
    check_plan(plan, cut, 3)
    strategy = PlanStrategy(plan)
    setter = tf.compat.v1.train.replica_device_setter(ps_tasks=3, ps_strategy=strategy)
    g = _graph(model, counts, setter)
    # raises PlacementError if any variable is not where the plan put it
    report = placement_report(plan, cut, g)
    assert not strategy.unplanned, strategy.unplanned
    shards = sorted(n for n in report["devices"] if n.startswith(table + "/part_") and n.count("/part_") == 1)
    shards = [n for n in shards if n.rsplit("/part_", 1)[1].isdigit()]
    assert len(shards) == 3
    assert {report["devices"][n] for n in shards} == {f"/job:ps/task:{t}" for t in range(3)}
    shapes = {
        op.name: tuple(d.size for d in op.get_attr("shape").dim)
        for op in g.get_operations()
        if op.type == "VariableV2" or op.type == "VarHandleOp"
    }
    assert [shapes[n][0] for n in shards] == [26000, 26000, 26000]
    # the Adagrad slots of each shard sit with it
    for n, dev in report["devices"].items():
        if n.endswith("/Adagrad"):
            assert dev == report["devices"][n[: -len("/Adagrad")]], n


def test_the_getter_overrides_the_models_own_partitioner():
    model = DeepFM(features=CtrFeatures(hash_buckets=100), embedding_dim=4)
    g = _graph(model, {"deepfm/emb_v": 2})  # the model asks for partitioner(3)
    names = {op.name for op in g.get_operations() if op.type in ("VariableV2", "VarHandleOp")}
    assert {"deepfm/emb_v/part_0", "deepfm/emb_v/part_1"} <= names and "deepfm/emb_v/part_2" not in names
    assert "deepfm/emb_w" in names  # not in the counts: not cut, although the model asked
