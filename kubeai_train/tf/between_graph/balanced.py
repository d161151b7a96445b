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

__all__ = ["shard_counts_scope"]


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
