"""Checkpoints of a between-graph job, in any model directory (:class:`~kubeai_train.tf.model_dir.ModelDir`).

Both kinds write standard TensorFlow V2 checkpoints (``model.ckpt-<step>.index`` and
``.data-<i>-of-<n>``) with TensorFlow's own ``checkpoint`` state file beside them, so
``tf.train.latest_checkpoint``, ``tf.train.list_variables`` and a single-process restore read
them (after a download, for fsspec-only directories) like any other.

* :class:`NativeCheckpoints` (a directory TensorFlow writes, shared by the chief and the PS): the
  sharded saver; each PS writes the shard of the variables it holds, the chief writes nothing
  large.
* :class:`StagedCheckpoints` (an fsspec-only directory, e.g. oss://): the chief writes, part by
  part, through local staging; see its docstring for the order of writes that makes a save
  atomic and for the memory and disk it needs.

Restoring tries the newest committed checkpoint first and falls back to older ones when a file is
missing or corrupt (a warning names the checkpoint and the error), so a damaged file costs the
steps since the previous checkpoint, never the job; the reader positions restored with the model
come from the same checkpoint, so no row is lost or read twice by the fallback.
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from kubeai_train.tf.model_dir import ModelDir
from kubeai_train.tf.types import TrainError

__all__ = [
    "CheckpointCorruptError",
    "NativeCheckpoints",
    "StagedCheckpoints",
    "for_model_dir",
    "plan_parts",
]

log = logging.getLogger("kubeai_train.tf")

STATE_FILE = "checkpoint"  # TensorFlow's own name for the CheckpointState text proto
PREFIX = "model.ckpt"
DEFAULT_PART_BYTES = 256 << 20
_STRING_BYTES = 1024  # what a string variable (a reader position) is assumed to take

# what a damaged checkpoint raises on restore; a lost PS (Unavailable, Aborted, ...) is not one
_DAMAGED = (
    FileNotFoundError,
    ValueError,  # Saver.restore: "The passed save_path is not a valid checkpoint"
    tf.errors.DataLossError,
    tf.errors.InvalidArgumentError,
    tf.errors.OutOfRangeError,
    tf.errors.NotFoundError,
)


class CheckpointCorruptError(TrainError, FileNotFoundError):
    """A committed checkpoint lacks a file it needs."""


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def state_text(latest: str, names: Sequence[str]) -> bytes:
    """TensorFlow's ``checkpoint`` state file (CheckpointState in protobuf text format) naming
    ``latest`` and every kept checkpoint."""
    lines = [f"model_checkpoint_path: {_quote(latest)}"]
    lines += [f"all_model_checkpoint_paths: {_quote(n)}" for n in names]
    return ("\n".join(lines) + "\n").encode()


_STATE_LINE = re.compile(r'\s*(\w+)\s*:\s*("((?:[^"\\]|\\.)*)"|[-+.\w]+)\s*')


def parse_state(raw: bytes) -> tuple[str | None, list[str]]:
    """(latest, all kept names) from a ``checkpoint`` state file; names relative to the directory.

    (A two-field text proto, parsed here: protobuf's text parser fails on TensorFlow's
    CheckpointState class in some processes with the upb backend.)

    Raises:
        CheckpointCorruptError: a line that is not one of the two fields.
    """
    latest: str | None = None
    names: list[str] = []
    for line in raw.decode("utf-8", "replace").splitlines():
        if not line.strip():
            continue
        m = _STATE_LINE.fullmatch(line)
        if not m:
            raise CheckpointCorruptError(f"checkpoint state file has an unexpected line {line[:120]!r}")
        if m.group(1) not in ("model_checkpoint_path", "all_model_checkpoint_paths") or m.group(3) is None:
            continue  # TensorFlow's timestamps
        value = _relative(codecs.escape_decode(m.group(3).encode())[0].decode())
        if m.group(1) == "model_checkpoint_path":
            latest = value
        else:
            names.append(value)
    if latest and latest not in names:
        names.append(latest)
    return latest, names


def _relative(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


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
        return _restore_newest(self, sess)

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
    parts, in ``benchmarks/bench_tf_checkpoint.py``), and its local disk holds one part. TensorFlow's
    MergeV2Checkpoints then writes the index of the whole checkpoint from the parts' small index
    files, the index is uploaded, and last the ``checkpoint`` state file is replaced with one PUT:
    that write commits the checkpoint. A chief killed at any moment leaves the previous
    checkpoint the latest; files of an uncommitted save are deleted by the next save.

    Restoring: the index and every data file are downloaded into staging and each part restores
    its own variables (the read on the chief, the assignments on the PS).

    Args:
        model_dir: the (fsspec-only) model directory.
        part_bytes: the most bytes of variables one part reads (default 256 MiB).
        max_to_keep: committed checkpoints kept; older ones are deleted after a commit.
    """

    def __init__(
        self, model_dir: ModelDir, *, part_bytes: int = DEFAULT_PART_BYTES, max_to_keep: int = 3
    ) -> None:
        if part_bytes < 1:
            raise TrainError(f"checkpoint_part_bytes must be >= 1, got {part_bytes}")
        if max_to_keep < 1:
            raise TrainError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.dir = model_dir
        self.part_bytes = part_bytes
        self.max_to_keep = max_to_keep
        self.parts: list[list[Any]] = []
        self._savers: list[Any] = []
        self._names: list[str] | None = None
        self._swept = False
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

    # ------------------------------------------------------------------ state
    def committed(self) -> list[str]:
        """Committed checkpoint names, oldest first (read from the store on first use)."""
        if self._names is None:
            raw = self.dir.read_bytes(STATE_FILE)
            self._names = [] if raw is None else parse_state(raw)[1]
        return list(self._names)

    def _new_name(self, step: int) -> str:
        taken = set(self.committed())
        name, k = f"{PREFIX}-{int(step)}", 0
        while name in taken:  # the final save at the step of the last periodic one
            k += 1
            name = f"{PREFIX}-{int(step)}_{k}"
        return name

    # ------------------------------------------------------------------ save
    def save(self, sess: Any, step: int) -> str:
        """Save every variable as checkpoint ``model.ckpt-<step>`` and commit it; returns its URL."""
        if not self._savers:
            raise TrainError("StagedCheckpoints.build() was not called in the training graph")
        name = self._new_name(step)
        n = len(self._savers)
        # files of a torn save under the same name (its part count may differ) would mix in
        for f in self._files_of({name}, self.dir.listdir()):
            self.dir.remove(f)
        stage = tempfile.mkdtemp(prefix="save-", dir=self.dir.staging)
        try:
            prefixes = []
            for i, saver in enumerate(self._savers):
                prefix = os.path.join(stage, f"part-{i:05d}")
                sess.run(saver.saver_def.save_tensor_name, {saver.saver_def.filename_tensor_name: prefix})
                data = f"{prefix}.data-00000-of-00001"
                self.dir.upload(data, f"{name}.data-{i:05d}-of-{n:05d}")
                os.truncate(data, 0)  # keep the name for the merge, drop the bytes
                prefixes.append(prefix)
            merged = os.path.join(stage, name)
            self._merge_parts(prefixes, merged)
            self.dir.upload(f"{merged}.index", f"{name}.index")
            keep = [*self.committed(), name][-self.max_to_keep :]
            dropped = [old for old in self.committed() if old not in keep]
            self.dir.write_bytes(STATE_FILE, state_text(name, keep))  # the commit
            self._names = keep
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        for old in dropped:
            self._delete(old)
        if not self._swept:
            self._sweep()
        return self.dir.join(name)

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

    def _files_of(self, names: set[str], listing: Sequence[str]) -> list[str]:
        out = []
        for f in listing:
            m = re.fullmatch(rf"({re.escape(PREFIX)}-[0-9_]+)\.(index|data-\d+-of-\d+)", f)
            if m and m.group(1) in names:
                out.append(f)
        return out

    def _delete(self, name: str) -> None:
        files = self._files_of({name}, self.dir.listdir())
        # the index first: a checkpoint without it is no longer one anybody restores
        for f in sorted(files, key=lambda f: not f.endswith(".index")):
            self.dir.remove(f)

    def _sweep(self) -> None:
        """Delete the files of saves that never committed (a chief killed mid-save)."""
        listing = self.dir.listdir()
        kept = set(self.committed())
        stems = {
            m.group(1)
            for f in listing
            if (m := re.fullmatch(rf"({re.escape(PREFIX)}-[0-9_]+)\.(index|data-\d+-of-\d+)", f))
        }
        orphans = stems - kept
        for f in self._files_of(orphans, listing):
            self.dir.remove(f)
        if orphans:
            log.info("deleted files of %d uncommitted checkpoint(s): %s", len(orphans), sorted(orphans)[:5])
        self._swept = True

    # ------------------------------------------------------------------ restore
    def local_copy(self, path: str) -> str:
        """Download checkpoint ``path`` (its URL or name) into staging; returns the local prefix.

        Raises:
            CheckpointCorruptError: its index or one of its data files is missing.
        """
        name = _relative(path)
        listing = self.dir.listdir()
        data = [f for f in self._files_of({name}, listing) if not f.endswith(".index")]
        counts = {int(m.group(1)) for f in data if (m := re.search(r"-of-(\d+)$", f))}
        expected = {f"{name}.data-{i:05d}-of-{c:05d}" for c in counts for i in range(c)}
        if f"{name}.index" not in listing or len(counts) != 1 or not expected <= set(data):
            raise CheckpointCorruptError(
                f"checkpoint {self.dir.display}/{name} is incomplete: has {sorted(data)[:6]} "
                f"{'with' if f'{name}.index' in listing else 'without'} {name}.index"
            )
        target = os.path.join(self.dir.staging, "restore")
        shutil.rmtree(target, ignore_errors=True)  # one downloaded checkpoint at a time
        os.makedirs(target)
        for f in [f"{name}.index", *sorted(expected)]:
            self.dir.download(f, os.path.join(target, f))
        return os.path.join(target, name)

    def restore(self, sess: Any, path: str) -> None:
        """Restore every variable from checkpoint ``path`` (URL or name)."""
        local = self.local_copy(path)
        for saver in self._savers:
            sess.run(saver.saver_def.restore_op_name, {saver.saver_def.filename_tensor_name: local})

    def restore_latest(self, sess: Any) -> str | None:
        return _restore_newest(self, sess)


def _restore_newest(ckpts: NativeCheckpoints | StagedCheckpoints, sess: Any) -> str | None:
    """Restore the newest committed checkpoint that restores; None when there is none.

    Raises:
        TrainError: checkpoints exist but none of them restores (each error is named).
    """
    names = ckpts.committed()
    errors = []
    for name in reversed(names):
        path = ckpts.dir.join(name)
        try:
            ckpts.restore(sess, path)
            return path
        except _DAMAGED as e:
            why = f"{type(e).__name__}: {' '.join(str(getattr(e, 'message', e)).split())[:300]}"
            errors.append(f"{name} ({why})")
            log.warning(
                "checkpoint %s/%s does not restore (%s); trying the one before", ckpts.dir.display, name, why
            )
    if names:
        raise TrainError(
            f"no checkpoint in {ckpts.dir.display} restores: {'; '.join(errors)}; remove the damaged "
            "checkpoint files (or the whole directory to start over)"
        )
    return None


def for_model_dir(
    model_dir: ModelDir, *, part_bytes: int = DEFAULT_PART_BYTES, max_to_keep: int = 3
) -> NativeCheckpoints | StagedCheckpoints:
    """The checkpoints kind for ``model_dir``: native when TensorFlow writes it, staged otherwise."""
    if model_dir.native:
        return NativeCheckpoints(model_dir, max_to_keep=max_to_keep)
    return StagedCheckpoints(model_dir, part_bytes=part_bytes, max_to_keep=max_to_keep)
