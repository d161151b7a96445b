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
import time
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from kubeai_train.tf.model_dir import ModelDir
from kubeai_train.tf.types import TrainError

__all__ = [
    "RETRYABLE_ERRORS",
    "CheckpointCorruptError",
    "NativeCheckpoints",
    "StagedCheckpoints",
    "StagedStore",
    "for_model_dir",
    "parse_state",
    "plan_parts",
    "restore_newest",
    "state_text",
]

log = logging.getLogger("kubeai_train.tf")

#: Errors meaning "a PS (or its state) went away": both modes restart and restore the checkpoint.
RETRYABLE_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.AbortedError,
    tf.errors.CancelledError,
    tf.errors.DeadlineExceededError,
    tf.errors.FailedPreconditionError,
    tf.errors.NotFoundError,
)

STATE_FILE = "checkpoint"  # TensorFlow's own name for the CheckpointState text proto
PREFIX = "model.ckpt"
DEFAULT_PART_BYTES = 64 << 20
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


def state_text(latest: str, names: Sequence[str], times: Sequence[float] | None = None) -> bytes:
    """TensorFlow's ``checkpoint`` state file (CheckpointState in protobuf text format) naming
    ``latest`` and every kept checkpoint; with ``times`` (one save time per name) also the
    timestamps ``tf.train.CheckpointManager`` writes (without them, a manager opened on a copy
    lists no checkpoint: it keeps only those newer than ``last_preserved_timestamp``)."""
    lines = [f"model_checkpoint_path: {_quote(latest)}"]
    lines += [f"all_model_checkpoint_paths: {_quote(n)}" for n in names]
    if times is not None:
        lines += [f"all_model_checkpoint_timestamps: {t!r}" for t in times]
        lines.append(f"last_preserved_timestamp: {min(times, default=time.time()) - 1.0!r}")
    return ("\n".join(lines) + "\n").encode()


_STATE_LINE = re.compile(r'\s*(\w+)\s*:\s*("((?:[^"\\]|\\.)*)"|[-+.\w]+)\s*')


def parse_state(raw: bytes) -> tuple[str | None, list[str]]:
    """(latest, all kept names) from a ``checkpoint`` state file; names relative to the directory.

    (A small text proto, parsed here: protobuf's text parser fails on TensorFlow's
    CheckpointState class in some processes with the upb backend.)

    Raises:
        CheckpointCorruptError: a line that is not a field of the state file.
    """
    latest, names, _ = _parse_state(raw)
    return latest, names


def _parse_state(raw: bytes) -> tuple[str | None, list[str], list[float]]:
    latest: str | None = None
    names: list[str] = []
    times: list[float] = []
    for line in raw.decode("utf-8", "replace").splitlines():
        if not line.strip():
            continue
        m = _STATE_LINE.fullmatch(line)
        if not m:
            raise CheckpointCorruptError(f"checkpoint state file has an unexpected line {line[:120]!r}")
        field, quoted = m.group(1), m.group(3)
        if field == "all_model_checkpoint_timestamps" and quoted is None:
            times.append(float(m.group(2)))
        elif field in ("model_checkpoint_path", "all_model_checkpoint_paths") and quoted is not None:
            value = _relative(codecs.escape_decode(quoted.encode())[0].decode())
            if field == "model_checkpoint_path":
                latest = value
            else:
                names.append(value)
    if latest and latest not in names:
        names.append(latest)
    return latest, names, times


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
        return restore_newest(
            self.committed(),
            lambda name: self.restore(sess, self.dir.join(name)),
            self.dir.join,
            self.dir.display,
        )

    def local_copy(self, path: str) -> str:
        """A prefix a local TensorFlow session can restore ``path`` from (itself)."""
        return path


class StagedStore:
    """The files of checkpoints kept in an fsspec-only model_dir through local staging, shared by
    both modes (:class:`StagedCheckpoints` here, the coordinator's object checkpoints).

    Checkpoint ``<name>-<step>`` is ``<name>-<step>.index`` plus ``.data-<i>-of-<n>`` files in
    ``<model_dir>/<subdir>``, beside TensorFlow's ``checkpoint`` state file (relative names, save
    times). The order of writes makes a save atomic: data files, then the index, then the state
    file with one PUT, which commits it (:meth:`commit`). Files of saves that never committed (a
    process killed mid-save) are deleted before this process first uploads (:meth:`prepare`).

    Args:
        model_dir: the model directory.
        subdir: the folder of the checkpoints under it ("" for the directory itself).
        name: the checkpoint name before ``-<step>``.
        max_to_keep: committed checkpoints kept; older ones are deleted after a commit.
    """

    def __init__(
        self, model_dir: ModelDir, *, subdir: str = "", name: str = PREFIX, max_to_keep: int = 3
    ) -> None:
        if max_to_keep < 1:
            raise TrainError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.dir = model_dir
        self.subdir = subdir.strip("/")
        self.name = name
        self.max_to_keep = max_to_keep
        self._file = re.compile(rf"({re.escape(name)}-[0-9_]+)\.(index|data-(\d+)-of-(\d+))")
        self._names: list[str] | None = None
        self._times: dict[str, float] = {}
        self._swept = False

    @property
    def display(self) -> str:
        """Where the checkpoints are, credentials masked."""
        return "/".join(filter(None, [self.dir.display, self.subdir]))

    def rel(self, filename: str) -> str:
        """``filename``'s path relative to the model directory."""
        return "/".join(filter(None, [self.subdir, filename]))

    def url(self, name: str) -> str:
        """The URL of checkpoint ``name`` (a prefix: add ``.index`` for its index file)."""
        return self.dir.join(self.rel(name))

    def committed(self) -> list[str]:
        """Committed checkpoint names, oldest first (read from the store on first use)."""
        if self._names is None:
            raw = self.dir.read_bytes(self.rel(STATE_FILE))
            _, names, times = _parse_state(raw) if raw else (None, [], [])
            if len(times) != len(names):
                times = [time.time()] * len(names)
            self._names = names
            self._times = dict(zip(names, times, strict=True))
        return list(self._names)

    def new_name(self, step: int) -> str:
        """``<name>-<step>``, or ``<name>-<step>_<k>`` when that step was committed already (the
        final save at the step of the last periodic one): a committed checkpoint is never rewritten."""
        taken = set(self.committed())
        name, k = f"{self.name}-{int(step)}", 0
        while name in taken:
            k += 1
            name = f"{self.name}-{int(step)}_{k}"
        return name

    def _files(self, stems: set[str], listing: Sequence[str]) -> list[str]:
        # the index first: a checkpoint without it is no longer one anybody restores
        out = [f for f in listing if (m := self._file.fullmatch(f)) and m.group(1) in stems]
        return sorted(out, key=lambda f: (not f.endswith(".index"), f))

    def _delete(self, stems: set[str], listing: Sequence[str] | None = None) -> None:
        for f in self._files(stems, self.dir.listdir(self.subdir) if listing is None else listing):
            self.dir.remove(self.rel(f))

    def prepare(self, name: str) -> None:
        """Before a save as ``name``: delete files no committed checkpoint owns (the first time:
        every uncommitted save's; later: ``name``'s), so a torn save with another file count
        never mixes into this one."""
        listing = self.dir.listdir(self.subdir)
        if self._swept:
            self._delete({name}, listing)
            return
        stems = {m.group(1) for f in listing if (m := self._file.fullmatch(f))}
        orphans = stems - set(self.committed())
        if orphans:
            self._delete(orphans, listing)
            log.info("deleted files of %d uncommitted checkpoint(s): %s", len(orphans), sorted(orphans)[:5])
        self._swept = True

    def upload(self, local: str, filename: str) -> None:
        """Upload a local file of the checkpoint being saved."""
        self.dir.upload(local, self.rel(filename))

    def commit(self, name: str) -> None:
        """Replace the state file with one naming ``name`` the latest (one PUT: the commit), then
        delete the checkpoints beyond ``max_to_keep``."""
        before = self.committed()
        keep = [*before, name][-self.max_to_keep :]
        self._times[name] = time.time()
        self.dir.write_bytes(self.rel(STATE_FILE), state_text(name, keep, [self._times[n] for n in keep]))
        self._names = keep
        dropped = {old for old in before if old not in keep}
        if dropped:
            self._delete(dropped)

    def local_copy(self, path: str) -> str:
        """Download checkpoint ``path`` (URL or name) into staging; returns the local prefix.

        The copy stays until the next call (one downloaded checkpoint at a time).

        Raises:
            CheckpointCorruptError: its index or one of its data files is missing.
        """
        name = _relative(path)
        listing = self.dir.listdir(self.subdir)
        data = [f for f in listing if (m := self._file.fullmatch(f)) and m.group(1) == name and m.group(3)]
        counts = {int(m.group(4)) for f in data if (m := self._file.fullmatch(f))}
        expected = {f"{name}.data-{i:05d}-of-{c:05d}" for c in counts for i in range(c)}
        has_index = f"{name}.index" in listing
        if not has_index or len(counts) != 1 or not expected <= set(data):
            raise CheckpointCorruptError(
                f"checkpoint {self.display}/{name} is incomplete: has {sorted(data)[:6]} "
                f"{'with' if has_index else 'without'} {name}.index"
            )
        target = os.path.join(self.dir.staging, "restore")
        shutil.rmtree(target, ignore_errors=True)
        os.makedirs(target)
        for f in [f"{name}.index", *sorted(expected)]:
            self.dir.download(self.rel(f), os.path.join(target, f))
        return os.path.join(target, name)


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


def restore_newest(
    names: Sequence[str],
    restore: Callable[[str], None],
    url: Callable[[str], str],
    where: str,
    *,
    damaged: tuple[type[BaseException], ...] = _DAMAGED,
    is_lost: Callable[[BaseException], bool] | None = None,
) -> str | None:
    """Restore the newest of ``names`` (oldest first) that restores; returns its URL, None if none.

    Args:
        names: committed checkpoint names, oldest first.
        restore: restores one checkpoint by name.
        url: a name's URL.
        where: the directory, for messages (credentials masked).
        damaged: the errors that mean a damaged checkpoint (try the one before).
        is_lost: tells apart errors that mean the cluster lost state: they propagate.

    Raises:
        TrainError: checkpoints exist but none of them restores (each error is named).
    """
    errors = []
    for name in reversed(names):
        try:
            restore(name)
            return url(name)
        except damaged as e:
            if is_lost is not None and is_lost(e):
                raise
            why = f"{type(e).__name__}: {' '.join(str(getattr(e, 'message', e)).split())[:300]}"
            errors.append(f"{name} ({why})")
            log.warning("checkpoint %s/%s does not restore (%s); trying the one before", where, name, why)
    if names:
        raise TrainError(
            f"no checkpoint in {where} restores: {'; '.join(errors)}; remove the damaged "
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
