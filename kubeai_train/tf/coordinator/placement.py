"""The placement policy applied under ParameterServerStrategy, which has no public placement hook.

ParameterServerStrategy puts variable ``i`` on PS ``i % num_ps``: its ``_create_variable`` wraps
the rest of the variable-creator chain in ``tf.device("/job:ps/task:<i % num_ps>")`` (see
``parameter_server_strategy_v2.py``, ``_create_variable_round_robin``), once per shard of a
partitioned variable. The narrowest interface that lets a policy decide anyway is a public one:
a ``tf.variable_creator_scope`` entered *before* ``strategy.scope()`` sits *below* the strategy's
creator in the chain, so it runs inside that device scope, once per variable or shard, and its
own inner ``tf.device`` wins. :class:`PlanApplier` is that creator.

The policy needs the whole snapshot before the first variable exists, so :func:`snapshot_build`
runs the user's ``build`` once in a throw-away graph (no memory allocated, nothing initialised),
records every variable with the shards the partitioner will cut, and the plan is matched to the
real creation by order (names and shapes checked). If TensorFlow ever stops calling a creator
below its own, or the order differs, the applier notices, logs one clear warning and leaves the
rest to TensorFlow's round-robin; :func:`verify` compares every variable's real device with the
plan (the integration test asserts it, so a TensorFlow upgrade that breaks this fails there).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from kubeai_train.tf.types import PlacementPlan, VariableInfo

__all__ = ["PlanApplier", "Planned", "snapshot_build", "verify"]

log = logging.getLogger("kubeai_train.tf")


@dataclass(frozen=True)
class Planned:
    """One variable or shard as the planning pass saw it.

    ``name`` is the variable's full name (name scopes included, uniquified), what the policy and
    the report see; ``raw_name`` is the name the creator receives, checked against the real pass.
    """

    name: str
    raw_name: str
    shape: tuple[int, ...]
    dtype: str
    trainable: bool
    partitioned: bool


def _shards(shape: tuple[int, ...], dtype: Any, partitioner: Any) -> list[tuple[int, ...]]:
    """The shard shapes ParameterServerStrategy cuts (its "div" offsets), or ``[shape]``."""
    if partitioner is None or not shape:
        return [shape]
    parts = partitioner(shape=tf.TensorShape(shape), dtype=tf.as_dtype(dtype))
    n = min(int(parts[0]), shape[0]) if parts and parts[0] else 1
    if n <= 1:
        return [shape]
    base, extra = divmod(shape[0], n)
    return [(base + (1 if i < extra else 0), *shape[1:]) for i in range(n)]


def snapshot_build(build: Callable[[], Any], partitioner: Any) -> list[Planned]:
    """Run ``build`` in a throw-away graph and list the variables / shards it creates, in order."""
    seen: dict[str, int] = {}
    out: list[Planned] = []

    def record(next_creator: Callable[..., Any], **kwargs: Any) -> Any:
        var = next_creator(**kwargs)
        if "colocate_with" in kwargs:
            return var  # follows another variable; not the policy's to place
        full = var.name.split(":")[0]  # with the name scopes (Keras layers' "mlp_0/kernel")
        raw = (kwargs.get("name") or full).split(":")[0]
        shape = tuple(int(d) if d is not None else 0 for d in var.shape)
        dtype = var.dtype.base_dtype.name
        shards = _shards(shape, dtype, partitioner)
        for i, s in enumerate(shards):
            raw_i = f"{raw}/part_{i}" if len(shards) > 1 else raw
            shown = f"{full}/part_{i}" if len(shards) > 1 else full
            k = seen.get(shown, 0)
            seen[shown] = k + 1
            name = shown if k == 0 else f"{shown}_{k}"
            out.append(Planned(name, raw_i, s, dtype, bool(var.trainable), len(shards) > 1))
        return var

    with tf.Graph().as_default(), tf.variable_creator_scope(record):
        build()
    return out


def infos(planned: Sequence[Planned], batch_size: int, slots: int = 1) -> list[VariableInfo]:
    """The policy's view: bytes with optimizer slots included, per-step traffic, kind, group."""
    out = []
    for p in planned:
        n = 1
        for d in p.shape:
            n *= d
        size = tf.as_dtype(p.dtype).size
        nbytes = n * size * (1 + (slots if p.trainable else 0))
        kind = "embedding" if p.partitioned or "emb" in p.name.lower() else "dense"
        if not p.trainable:
            kind = "state"
        row = nbytes // p.shape[0] if p.shape and p.shape[0] else nbytes
        traffic = 2.0 * (min(nbytes, batch_size * row) if kind == "embedding" else nbytes)
        group = p.raw_name.rsplit("/part_", 1)[0] if p.partitioned else p.name
        out.append(VariableInfo(p.name, p.shape, p.dtype, nbytes, traffic=traffic, kind=kind, group=group))
    return out


class PlanApplier:
    """The variable creator that puts each variable / shard where the plan says.

    Enter it with ``tf.variable_creator_scope(applier)`` *before* ``strategy.scope()``.
    ``pinned(task)`` places the variables created inside on ``task`` whatever the plan (the
    trainer's own state: step counter, reader positions).
    """

    def __init__(self, planned: Sequence[Planned], plan: PlacementPlan) -> None:
        self.planned = list(planned)
        self.plan = plan
        self.created: list[tuple[str, Any]] = []  # (planned name, variable)
        self.broken: str | None = None
        self._next = 0
        self._pin: int | None = None
        self.calls = 0

    @contextlib.contextmanager
    def pinned(self, task: int) -> Iterator[None]:
        old, self._pin = self._pin, task
        try:
            yield
        finally:
            self._pin = old

    def _fail(self, why: str) -> None:
        if self.broken is None:
            self.broken = why
            log.warning(
                "placement policy %r cannot be applied under ParameterServerStrategy (%s); the "
                "remaining variables are placed by TensorFlow's round-robin. The placement report "
                "shows where every variable really is.",
                self.plan.policy,
                why,
            )

    def __call__(self, next_creator: Callable[..., Any], **kwargs: Any) -> Any:
        self.calls += 1
        if "colocate_with" in kwargs:
            return next_creator(**kwargs)  # optimizer slots: TensorFlow colocates them
        if self._pin is not None:
            with tf.device(f"/job:ps/task:{self._pin}/device:CPU:0"):
                return next_creator(**kwargs)
        if self.broken is not None or self._next >= len(self.planned):
            if self.broken is None:
                self._fail(f"more variables were created than the planning pass saw ({len(self.planned)})")
            return next_creator(**kwargs)
        expect = self.planned[self._next]
        raw = (kwargs.get("name") or "").split(":")[0]
        if raw and raw != expect.raw_name:
            self._fail(f"variable #{self._next} is {raw!r}, the planning pass saw {expect.raw_name!r}")
            return next_creator(**kwargs)
        self._next += 1
        task = self.plan.assignment[expect.name]
        with tf.device(f"/job:ps/task:{task}/device:CPU:0"):
            var = next_creator(**kwargs)
        shape = tuple(int(d) if d is not None else 0 for d in var.shape)
        if shape != expect.shape:
            self._fail(f"{expect.name!r} has shape {shape}, the planning pass saw {expect.shape}")
        self.created.append((expect.name, var))
        return var

    def finish(self) -> None:
        """Call after building: warns if the strategy never called this creator."""
        if self.planned and self._next == 0 and self.broken is None:
            self._fail("ParameterServerStrategy did not call a variable creator below its own")
        elif self._next < len(self.planned) and self.broken is None:
            self._fail(f"only {self._next} of {len(self.planned)} planned variables were created")


def verify(applier: PlanApplier) -> dict[str, Any]:
    """Where every planned variable really is, against the plan.

    Returns:
        ``{"devices": {name: device}, "mismatched": [[name, planned task, device], ...],
        "applied": bool, "warning": str | None}``.
    """
    devices = {name: var.device for name, var in applier.created}
    mismatched = []
    for name, dev in devices.items():
        task = applier.plan.assignment[name]
        spec = tf.DeviceSpec.from_string(dev)
        if spec.job != "ps" or spec.task != task:
            mismatched.append([name, task, dev])
    applied = applier.broken is None and not mismatched and len(devices) == len(applier.planned)
    if mismatched and applier.broken is None:
        log.warning(
            "placement policy %r: %d variables are not where the plan put them, e.g. %s",
            applier.plan.policy,
            len(mismatched),
            mismatched[:2],
        )
    return {"devices": devices, "mismatched": mismatched, "applied": applied, "warning": applier.broken}
