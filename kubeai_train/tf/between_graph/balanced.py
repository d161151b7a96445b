"""The ``balanced`` plan's shard counts applied in between-graph mode, through a custom getter.

A between-graph model creates its variables with ``tf.compat.v1.get_variable`` and picks its own
partitioner (``kubeai_train.tf.partitioner(num_ps)``); TF1 partitioners see only
``(shape, dtype)``. A variable scope's ``custom_getter`` sees every ``get_variable`` call with
its full name and its ``partitioner`` argument, so :func:`shard_counts_scope` replaces that
argument: ``None`` for the planning pass (every variable whole, so the planner decides the cuts),
then ``fixed_size_partitioner(n)`` with the plan's count ``n`` (even rows, as the planner assumed
with ``rows="even"``) for the real graph. Optimizer slots of a cut variable are created per shard
and follow it (``PlanStrategy``). Variables created without ``get_variable`` are not cut.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import tensorflow as tf

__all__ = ["TrafficCounter", "resident_bytes", "shard_counts_scope"]


@contextmanager
def shard_counts_scope(counts: Mapping[str, int] | None) -> Iterator[None]:
    """Within: ``get_variable(name, ..., partitioner=...)`` cuts ``name`` into ``counts[name]`` shards.

    Args:
        counts: variable name (with its scopes, as the graph names it) -> shard count; names
            not in it keep no partitioner. ``None``: no variable is cut (the planning pass).
    """

    # TensorFlow calls a custom getter with keyword arguments only: getter=, name=, shape=, ...
    def getter(getter: Any, *args: Any, **kwargs: Any) -> Any:
        name = kwargs.get("name", args[0] if args else "")
        n = 1 if counts is None else int(counts.get(name, 1))
        if counts is None or name in counts or kwargs.get("partitioner") is not None:
            kwargs["partitioner"] = tf.compat.v1.fixed_size_partitioner(n) if n > 1 else None
        return getter(*args, **kwargs)

    with tf.compat.v1.variable_scope(tf.compat.v1.get_variable_scope(), custom_getter=getter):
        yield


def _task(device: str, num_ps: int) -> int | None:
    spec = tf.DeviceSpec.from_string(device or "")
    if spec.job == "ps" and spec.task is not None and 0 <= spec.task < num_ps:
        return int(spec.task)
    return None


def resident_bytes(graph: Any, num_ps: int) -> list[int]:
    """Bytes of every variable of ``graph`` per PS task, by the device it really got (optimizer
    slots and the trainer's state included; strings count 0)."""
    out = [0] * num_ps
    for op in graph.get_operations():
        if op.type not in ("VariableV2", "VarHandleOp"):
            continue
        task = _task(op.device, num_ps)
        if task is None:
            continue
        dtype = tf.as_dtype(op.get_attr("dtype"))
        n = 1
        for d in op.get_attr("shape").dim:
            n *= max(int(d.size), 0)
        out[task] += n * (dtype.size if dtype != tf.string else 0)
    return out


class TrafficCounter:
    """Bytes each step exchanges with each PS, counted in the step from the real batch.

    TF1 optimizers update a variable on its PS in one fused op, so an embedding shard moves
    ``(n + u) x row bytes`` per step (``n`` ids routed to it gathered; its gradient, duplicates
    summed, ``u`` rows sent) and a dense variable ``2 x its bytes`` (read, gradient sent). The
    sums live in a local variable on this trainer (not on a PS, not in the checkpoint).

    Build it in the trainer's graph under its own device (``tf.device("/job:worker/task:i")``),
    group :attr:`update` with the train op, and read :meth:`per_ps` with a session.
    """

    def __init__(self, grads_and_vars: Any, extra: Any = ()) -> None:
        self.devices = [v.device for _, v in grads_and_vars] + [v.device for v, _ in extra]
        parts: list[Any] = [tf.constant(1, tf.int64)]
        for g, v in grads_and_vars:
            size = v.dtype.base_dtype.size
            if g is None:
                parts.append(tf.constant(0, tf.int64))
            elif isinstance(g, tf.IndexedSlices):
                row = 1
                for d in v.shape[1:]:
                    row *= int(d)
                n = tf.size(g.indices, out_type=tf.int64)
                u = tf.size(tf.unique(g.indices)[0], out_type=tf.int64)
                parts.append((n + u) * row * size)
            else:
                parts.append(tf.constant(2 * int(v.shape.num_elements() or 0) * size, tf.int64))
        parts.extend(tf.constant(b, tf.int64) for _, b in extra)
        self.counts = tf.compat.v1.get_variable(
            "kubeai_traffic",
            initializer=tf.zeros([len(parts)], tf.int64),
            trainable=False,
            collections=[tf.compat.v1.GraphKeys.LOCAL_VARIABLES],
        )
        self.update = self.counts.assign_add(tf.stack(parts), read_value=False)

    def per_ps(self, sess: Any, num_ps: int) -> tuple[int, list[float]]:
        """``(steps this trainer counted, mean bytes per step per PS task)``."""
        counts = [int(c) for c in sess.run(self.counts)]
        steps = counts[0]
        out = [0.0] * num_ps
        for dev, c in zip(self.devices, counts[1:], strict=True):
            task = _task(dev, num_ps)
            if task is not None and steps:
                out[task] += c / steps
        return steps, out
