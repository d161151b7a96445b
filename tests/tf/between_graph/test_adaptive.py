"""Adaptive local batches in TF sync training: the weighting of the aggregated gradient (through
the same accumulators SyncReplicasOptimizer averages in) and the chief's pure plan bookkeeping."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.training import sync_replicas_optimizer

from kubeai_train.straggler import loss_weight
from kubeai_train.tf.between_graph.adaptive import (
    AdaptiveChief,
    plan_vector,
    scale_sparse,
    summed_sparse_gradients,
    units_for,
    weighted_loss,
)
from kubeai_train.tf.types import AdaptiveBatching, TrainError

ROWS, DIM = 10, 4


def _aggregated(splits: list[tuple[int, int]], weighted: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each replica's gradient of its rows, aggregated over the replicas by a ConditionalAccumulator
    (dense) and a SparseConditionalAccumulator (the embedding table's IndexedSlices) as
    SyncReplicasOptimizer builds them -- TF's defaults, or (``weighted``) as the adaptive trainer
    does: weighted loss, sparse gradients / N, summing sparse accumulator. One replica over all
    rows when ``splits`` has one entry."""
    rng = np.random.default_rng(0)
    n = splits[-1][1]
    ids = rng.integers(0, ROWS, n)
    x = rng.normal(size=n).astype(np.float32)
    y = (rng.random(n) < 0.4).astype(np.float32)
    g = tf.Graph()
    with g.as_default():
        table = tf.compat.v1.get_variable("t", initializer=rng.normal(size=(ROWS, DIM)).astype(np.float32))
        w = tf.compat.v1.get_variable("w", initializer=rng.normal(size=DIM).astype(np.float32))
        dense_acc = tf.compat.v1.ConditionalAccumulator(tf.float32, shape=[DIM])
        with summed_sparse_gradients() if weighted else contextlib.nullcontext():
            # the name SyncReplicasOptimizer.apply_gradients builds its accumulators through
            acc = sync_replicas_optimizer.data_flow_ops.SparseConditionalAccumulator
            sparse_acc = acc(tf.float32, shape=[ROWS, DIM])
        applies = []
        for lo, hi in splits:
            emb = tf.nn.embedding_lookup(table, tf.constant(ids[lo:hi]))
            logits = tf.reduce_sum(emb * w, axis=1) + tf.constant(x[lo:hi])
            rows = tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.constant(y[lo:hi]), logits=logits)
            loss = weighted_loss(rows, len(splits), n) if weighted else tf.reduce_mean(rows)
            g_table, g_w = tf.compat.v1.gradients(loss, [table, w])
            assert isinstance(g_table, tf.IndexedSlices)
            if weighted:
                ((g_table, _),) = scale_sparse([(g_table, table)], len(splits))
            applies += [
                dense_acc.apply_grad(g_w, local_step=0),
                sparse_acc.apply_indexed_slices_grad(g_table, local_step=0),
            ]
        with tf.control_dependencies(applies):
            avg_w = dense_acc.take_grad(len(splits))
            avg_t = sparse_acc.take_indexed_slices_grad(len(splits))
        dense_t = tf.math.unsorted_segment_sum(avg_t.values, avg_t.indices, ROWS)
        with tf.compat.v1.Session(graph=g) as s:
            s.run(tf.compat.v1.global_variables_initializer())
            t, v = s.run([dense_t, avg_w])
    return t, v


def test_weighted_average_of_9_and_3_rows_is_the_12_row_gradient():
    full_t, full_w = _aggregated([(0, 12)], weighted=False)
    t, w = _aggregated([(0, 9), (9, 12)], weighted=True)
    np.testing.assert_allclose(w, full_w, atol=1e-6)
    np.testing.assert_allclose(t, full_t, atol=1e-6)
    # the plain average of the two means over-weights the 3 rows: not the global-batch mean
    t0, w0 = _aggregated([(0, 9), (9, 12)], weighted=False)
    assert np.abs(w0 - full_w).max() > 1e-3 and np.abs(t0 - full_t).max() > 1e-3
    # the factor is the policies' loss weight N n / G on the mean
    assert loss_weight(9, 12, 2) == pytest.approx(1.5) and loss_weight(3, 12, 2) == pytest.approx(0.5)


def test_sync_replicas_optimizer_sums_sparse_gradients_only_inside_the_context():
    def reductions(summed: bool) -> set[bytes]:
        g = tf.Graph()
        with g.as_default():
            table = tf.compat.v1.get_variable("t", [ROWS, DIM])
            loss = tf.reduce_sum(tf.nn.embedding_lookup(table, tf.constant([1, 2])))
            opt = tf.compat.v1.train.SyncReplicasOptimizer(
                tf.compat.v1.train.GradientDescentOptimizer(0.1),
                replicas_to_aggregate=2,
                total_num_replicas=2,
            )
            gv = opt.compute_gradients(loss)
            with summed_sparse_gradients() if summed else contextlib.nullcontext():
                opt.apply_gradients(gv, global_step=tf.compat.v1.train.get_or_create_global_step())
        return {
            op.get_attr("reduction_type")
            for op in g.get_operations()
            if op.type == "SparseConditionalAccumulator"
        }

    assert reductions(True) == {b"SUM"}
    assert reductions(False) == {b"MEAN"}  # and the patch is undone afterwards


def test_plan_vector_switches_at_applies_from():
    v = plan_vector(17, [5, 3], [4, 4])
    assert v == [17, 5, 3, 4, 4]
    assert [units_for(v, 16, r, 2) for r in range(2)] == [4, 4]
    assert [units_for(v, 17, r, 2) for r in range(2)] == [5, 3]
    with pytest.raises(TrainError, match="holds 5 values, a job of 3 replicas needs 7"):
        units_for(v, 0, 0, 3)
    with pytest.raises(TrainError, match="cannot follow"):
        plan_vector(0, [1, 2], [3])


def test_chief_flags_replans_and_ignores_stale_slots():
    chief = AdaptiveChief(AdaptiveBatching(micro_batches=4, replan_every=2, slow_steps=2), 2, 32)
    assert chief.vector == [0, 4, 4, 4, 4] and chief.report.plans == [{"step": 0, "sizes": [128, 128]}]
    # a slot not updated since the last read is not a new measurement
    assert chief.observe([[0, 0, 0], [0, 0, 0]], 1) == ("", None)
    line, vec = chief.observe([[1, 128, 0.128], [1, 128, 0.256]], 3)
    assert vec is None and line == ""  # one slow step: m=2 not reached; R=2 not reached
    line, vec = chief.observe([[1, 128, 0.128], [1, 128, 0.256]], 4)  # stale: nothing fed
    assert (line, vec) == ("", None)
    line, vec = chief.observe([[2, 128, 0.128], [2, 128, 0.256]], 5)
    assert "slow worker(s) 1" in line
    assert vec is not None and vec[0] == 6 and vec[1] > vec[2] and vec[1] + vec[2] == 8 and vec[3:] == [4, 4]
    assert chief.report.detections[0]["new"] == [1] and chief.report.detections[0]["reported_at"] == 4
    assert chief.report.plans[-1] == {"step": 6, "sizes": [vec[1] * 32, vec[2] * 32]}
    assert chief.report.flagged == [1] and chief.sizes() == [vec[1] * 32, vec[2] * 32]
    with pytest.raises(TrainError, match="3 timing slots for 2 replicas"):
        chief.observe([[0, 0, 0]] * 3, 6)


def test_chief_state_round_trips_through_json_and_checks_its_shape():
    import json

    opts = AdaptiveBatching(micro_batches=4, replan_every=2, slow_steps=2)
    chief = AdaptiveChief(opts, 2, 32)
    for step in range(1, 4):
        chief.observe([[step, 128, 0.128], [step, 128, 0.384]], step + 2)
    assert chief.report.flagged == [1] and chief.sizes()[1] < chief.sizes()[0]
    state = json.loads(json.dumps(chief.state_dict()))
    again = AdaptiveChief(opts, 2, 32)
    again.load_state_dict(state, 9)
    assert again.vector == chief.vector and again.report.flagged == [1]
    assert again.report.plans == [{"step": 9, "sizes": chief.sizes()}]
    # the resumed policies go on from the saved speeds: the same next decision as the original
    assert again.observe([[9, 128, 0.128], [9, 128, 0.384]], 12) == chief.observe(
        [[9, 128, 0.128], [9, 128, 0.384]], 12
    )
    with pytest.raises(TrainError, match="micro-batches of 32 rows, this run reads 64"):
        AdaptiveChief(opts, 2, 64).load_state_dict(state, 9)
    with pytest.raises(TrainError, match="for 2 replicas, this job has 3"):
        AdaptiveChief(opts, 3, 32).load_state_dict(state, 9)
