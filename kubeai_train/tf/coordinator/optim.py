"""Adagrad for the coordinator mode: sparse-aware, with its accumulators beside their variables.

Why our own: the update must run inside a closure on any worker against variables on the PS,
embedding gradients arrive as ``IndexedSlices`` per shard, and every accumulator must sit on the
PS of its variable (the placement policy places the variable; the slot follows it). A small
``tf.Module`` does exactly that and is checkpointed with the model. The math is
``tf.compat.v1.train.AdagradOptimizer``'s (the between-graph DeepFM's optimizer):
``acc += g^2; var -= lr * g / sqrt(acc)``, on the touched rows only for sparse gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

__all__ = ["Adagrad"]


class Adagrad(tf.Module):
    """Adagrad over a fixed list of variables (ShardedVariable components count one by one).

    Args:
        variables: the trainable variables, in a fixed order (gradients come in that order).
        learning_rate: the step size.
        initial_accumulator_value: the accumulators' start (0.1 as TF1's Adagrad).
        slot_scope: ``slot_scope(var)`` is entered while creating ``var``'s accumulator, so that
            it sits with the variable (the coordinator passes the strategy's
            ``extended.colocate_vars_with``, which also keeps the partitioner off slots).
    """

    def __init__(
        self,
        variables: Sequence[Any],
        learning_rate: float,
        initial_accumulator_value: float = 0.1,
        slot_scope: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__(name="adagrad")
        self.learning_rate = float(learning_rate)
        self.accumulators = []
        for i, var in enumerate(variables):
            scope = slot_scope(var) if slot_scope is not None else contextlib.nullcontext()
            with scope:
                self.accumulators.append(
                    tf.Variable(
                        lambda var=var: tf.fill(var.shape, tf.cast(initial_accumulator_value, var.dtype)),
                        trainable=False,
                        name=f"adagrad_acc_{i}",
                        shape=var.shape,
                        dtype=var.dtype,
                    )
                )

    def apply(self, grads: Sequence[Any], variables: Sequence[Any]) -> Any:
        """Apply one step; ``grads[i]`` (a Tensor, IndexedSlices or None) belongs to ``variables[i]``."""
        updates = []
        lr = tf.constant(self.learning_rate)
        for grad, var, acc in zip(grads, variables, self.accumulators, strict=True):
            if grad is None:
                continue
            if isinstance(grad, tf.IndexedSlices):
                # sum duplicate rows first so that each touched row is updated once per step
                rows, pos = tf.unique(grad.indices)
                values = tf.math.unsorted_segment_sum(grad.values, pos, tf.shape(rows)[0])
                acc_op = acc.scatter_add(tf.IndexedSlices(tf.square(values), rows))
                with tf.control_dependencies([acc_op]):
                    acc_rows = tf.gather(acc, rows)
                    step = lr * values * tf.math.rsqrt(acc_rows)
                    updates.append(var.scatter_sub(tf.IndexedSlices(step, rows)))
            else:
                acc_op = acc.assign_add(tf.square(grad))
                with tf.control_dependencies([acc_op]):
                    updates.append(var.assign_sub(lr * grad * tf.math.rsqrt(acc.read_value())))
        return tf.group(*updates)
