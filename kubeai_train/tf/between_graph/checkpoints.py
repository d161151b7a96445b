"""Checkpoints of a between-graph job, in any model directory (:class:`~kubeai_train.tf.model_dir.ModelDir`).

Both kinds write standard TensorFlow V2 checkpoints (``model.ckpt-<step>.index`` and
``.data-<i>-of-<n>``) with TensorFlow's own ``checkpoint`` state file beside them
(:mod:`kubeai_train.tf.checkpoint_store`).

* :class:`NativeCheckpoints` (a directory TensorFlow writes, shared by the chief and the PS): the
  sharded saver; each PS writes the shard of the variables it holds, the chief writes nothing
  large.
* :class:`StagedCheckpoints` (an fsspec-only directory, e.g. oss://): the chief writes, part by
  part, through local staging; see its docstring for the order of writes that makes a save
  atomic and for the memory and disk it needs.

Restoring tries the newest committed checkpoint first and falls back to older ones when a file is
missing or corrupt (:func:`~kubeai_train.tf.checkpoint_store.restore_newest`); the reader
positions restored with the model come from the same checkpoint, so no row is lost or read twice
by the fallback.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from kubeai_train.tf.checkpoint_store import PREFIX, STATE_FILE, StagedStore, parse_state, restore_newest
from kubeai_train.tf.model_dir import ModelDir
from kubeai_train.tf.types import TrainError

__all__ = [
    "DEFAULT_PART_BYTES",
    "NativeCheckpoints",
    "StagedCheckpoints",
    "for_model_dir",
    "plan_parts",
]

DEFAULT_PART_BYTES = 64 << 20
_STRING_BYTES = 1024  # what a string variable (a reader position) is assumed to take


def _var_bytes(v: Any) -> int:
    shape = getattr(v, "shape", None)  # saveable objects (lookup tables) have none: count them as 0
    if shape is None or not shape.is_fully_defined():
        return 0
    n = shape.num_elements()
    return int(n) * (_STRING_BYTES if v.dtype.base_dtype == tf.string else v.dtype.base_dtype.size)


def plan_parts(variables: Sequence[Any], part_bytes: int) -> list[list[Any]]:
    """Split ``variables`` into save parts of at most ``part_bytes`` each.

    Variables stay whole (a partitioned table is already split by its partitioner; a single
    variable larger than ``part_bytes`` is a part of its own) and grouped by the device that holds
    them, in the given order within a device, so one part is read from one PS.
    """
    if part_bytes < 1:
        raise TrainError(f"checkpoint_part_bytes must be >= 1, got {part_bytes}")
    by_device: dict[str, list[Any]] = {}
    for v in variables:
        by_device.setdefault(str(getattr(v, "device", "")), []).append(v)
    parts: list[list[Any]] = []
    for device in sorted(by_device):
        current: list[Any] = []
        size = 0
        for v in by_device[device]:
            b = _var_bytes(v)
            if current and size + b > part_bytes:
                parts.append(current)
                current, size = [], 0
            current.append(v)
            size += b
        if current:
            parts.append(current)
    return parts


def _checkpoint_variables() -> list[Any]:
    return list(tf.compat.v1.global_variables()) + list(
        tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.SAVEABLE_OBJECTS)
    )


class NativeCheckpoints:
    """The sharded saver in a directory TensorFlow writes (see the module docstring)."""

    def __init__(self, model_dir: ModelDir, *, max_to_keep: int = 3) -> None:
        self.dir = model_dir
        self.max_to_keep = max_to_keep
        self.saver: Any = None

    def build(self, *, sharded: bool) -> None:
        """Add the save / restore ops to the current graph (before it is finalised)."""
        self.saver = tf.compat.v1.train.Saver(
            sharded=sharded, max_to_keep=self.max_to_keep, save_relative_paths=True
        )

    def committed(self) -> list[str]:
        """Committed checkpoint names, oldest first."""
        raw = self.dir.read_bytes(STATE_FILE)
        return [] if raw is None else parse_state(raw)[1]

    def save(self, sess: Any, step: int) -> str:
        self.dir.makedirs()  # the saver refuses a missing parent directory
        with sess.graph.as_default():
            path = self.saver.save(
                sess, self.dir.join(f"{PREFIX}-{int(step)}"), global_step=None, write_meta_graph=False
            )
        return str(path)

    def restore(self, sess: Any, path: str) -> None:
        with sess.graph.as_default():
            self.saver.restore(sess, path)

    def restore_latest(self, sess: Any) -> str | None:
        return restore_newest(
            self.committed(),
            lambda name: self.restore(sess, self.dir.join(name)),
            self.dir.join,
            self.dir.display,
        )

    def local_copy(self, path: str) -> str:
        """A prefix a local TensorFlow session can restore ``path`` from (itself)."""
        return path


class StagedCheckpoints:
    """Checkpoints in an fsspec-only directory, written and read by the chief through staging.

    Saving: the variables are split into parts of at most ``part_bytes`` (:func:`plan_parts`).
    For each part, a save op on the chief reads the part's variables from their PS into a local
    file; the data file is uploaded as ``<name>.data-<i>-of-<n>`` and its local copy emptied, so
    the chief holds one part at a time: its peak memory grows by about twice the largest part
    (the tensors and their file buffers; 113-138 MiB for 61 MiB table shards, 444 MiB for 244 MiB
    parts, in ``benchmarks/bench_tf_checkpoint.py``), and its local disk holds one part.
    TensorFlow's MergeV2Checkpoints then writes the index of the whole checkpoint from the parts'
    small index files, the index is uploaded, and last the ``checkpoint`` state file is replaced
    with one PUT: that write commits the checkpoint (:class:`StagedStore`). A chief killed at any
    moment leaves the previous checkpoint the latest.

    Restoring: the index and every data file are downloaded into staging and each part restores
    its own variables (the read on the chief, the assignments on the PS).

    Args:
        model_dir: the (fsspec-only) model directory.
        part_bytes: the most bytes of variables one part reads (default 64 MiB).
        max_to_keep: committed checkpoints kept; older ones are deleted after a commit.
    """

    def __init__(
        self, model_dir: ModelDir, *, part_bytes: int = DEFAULT_PART_BYTES, max_to_keep: int = 3
    ) -> None:
        if part_bytes < 1:
            raise TrainError(f"checkpoint_part_bytes must be >= 1, got {part_bytes}")
        self.dir = model_dir
        self.store = StagedStore(model_dir, max_to_keep=max_to_keep)
        self.part_bytes = part_bytes
        self.parts: list[list[Any]] = []
        self._savers: list[Any] = []
        self._merge: tuple[Any, Any, Any, Any] | None = None

    def build(self, *, sharded: bool = False) -> None:
        """Add one save / restore op pair per part to the current graph (before it is finalised).

        ``sharded`` is accepted for symmetry with :class:`NativeCheckpoints` and ignored: the
        chief does all the I/O here.
        """
        del sharded
        self.parts = plan_parts(_checkpoint_variables(), self.part_bytes)
        self._savers = [
            tf.compat.v1.train.Saver(var_list=part, sharded=False, name=f"kubeai_ckpt_part_{i}")
            for i, part in enumerate(self.parts)
        ]

    def committed(self) -> list[str]:
        """Committed checkpoint names, oldest first."""
        return self.store.committed()

    def save(self, sess: Any, step: int) -> str:
        """Save every variable as checkpoint ``model.ckpt-<step>`` and commit it; returns its URL."""
        if not self._savers:
            raise TrainError("StagedCheckpoints.build() was not called in the training graph")
        name = self.store.new_name(step)
        n = len(self._savers)
        self.store.prepare(name)
        stage = tempfile.mkdtemp(prefix="save-", dir=self.dir.staging)
        try:
            prefixes = []
            for i, saver in enumerate(self._savers):
                prefix = os.path.join(stage, f"part-{i:05d}")
                sess.run(saver.saver_def.save_tensor_name, {saver.saver_def.filename_tensor_name: prefix})
                data = f"{prefix}.data-00000-of-00001"
                self.store.upload(data, f"{name}.data-{i:05d}-of-{n:05d}")
                os.truncate(data, 0)  # keep the name for the merge, drop the bytes
                prefixes.append(prefix)
            merged = os.path.join(stage, name)
            self._merge_parts(prefixes, merged)
            self.store.upload(f"{merged}.index", f"{name}.index")
            self.store.commit(name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return self.store.url(name)

    def _merge_parts(self, prefixes: list[str], destination: str) -> None:
        if self._merge is None:
            g = tf.Graph()
            with g.as_default():
                src = tf.compat.v1.placeholder(tf.string, [None])
                dst = tf.compat.v1.placeholder(tf.string, [])
                op = tf.raw_ops.MergeV2Checkpoints(
                    checkpoint_prefixes=src, destination_prefix=dst, delete_old_dirs=False
                )
            self._merge = (tf.compat.v1.Session(graph=g), src, dst, op)
        sess, src, dst, op = self._merge
        sess.run(op, {src: prefixes, dst: destination})

    def local_copy(self, path: str) -> str:
        """Download checkpoint ``path`` (its URL or name) into staging; returns the local prefix."""
        return self.store.local_copy(path)

    def restore(self, sess: Any, path: str) -> None:
        """Restore every variable from checkpoint ``path`` (URL or name)."""
        local = self.local_copy(path)
        for saver in self._savers:
            sess.run(saver.saver_def.restore_op_name, {saver.saver_def.filename_tensor_name: local})

    def restore_latest(self, sess: Any) -> str | None:
        return restore_newest(
            self.committed(), lambda name: self.restore(sess, name), self.store.url, self.dir.display
        )


def for_model_dir(
    model_dir: ModelDir, *, part_bytes: int = DEFAULT_PART_BYTES, max_to_keep: int = 3
) -> NativeCheckpoints | StagedCheckpoints:
    """The checkpoints kind for ``model_dir``: native when TensorFlow writes it, staged otherwise."""
    if model_dir.native:
        return NativeCheckpoints(model_dir, max_to_keep=max_to_keep)
    return StagedCheckpoints(model_dir, part_bytes=part_bytes, max_to_keep=max_to_keep)
