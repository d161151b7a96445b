"""Object-based (TF2) checkpoints of the coordinator mode, in any model directory.

The layout is ``tf.train.CheckpointManager``'s for ``directory=<model_dir>/ckpt``: checkpoint
``ckpt-<step>`` is ``ckpt/ckpt-<step>.index`` plus one ``.data-<i>-of-<n>`` file per task that
holds variables (each PS, and the chief for the reader positions), beside TensorFlow's own
``ckpt/checkpoint`` state file (relative names), so ``tf.train.latest_checkpoint``,
``tf.train.CheckpointManager`` and ``tf.train.Checkpoint.restore`` read a copy of the directory
like any other.

* :class:`NativeObjectCheckpoints` (a directory TensorFlow writes, shared by the chief and the
  PS): ``tf.train.CheckpointManager`` itself; each PS writes the shard of the variables it holds.
* :class:`StagedObjectCheckpoints` (an fsspec-only directory, e.g. oss://): the chief writes the
  whole checkpoint into its local staging and uploads it, in the same order and with the same
  guarantees as the between-graph
  :class:`~kubeai_train.tf.between_graph.checkpoints.StagedCheckpoints`: data files first, then
  the index, then the ``checkpoint`` state file with one PUT (the commit).

Restoring tries the newest committed checkpoint first and falls back to older ones, with a
warning naming the checkpoint and the error, when a file is missing or damaged; an error that
means the cluster lost state (``is_lost``) is not damage and propagates, so the job restarts.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from kubeai_train.tf.checkpoint_store import STATE_FILE, StagedStore, parse_state, restore_newest
from kubeai_train.tf.model_dir import ModelDir
from kubeai_train.tf.types import TrainError

__all__ = [
    "CKPT_DIR",
    "NativeObjectCheckpoints",
    "StagedObjectCheckpoints",
    "chief_io_device",
    "object_checkpoints",
]

log = logging.getLogger("kubeai_train.tf")

CKPT_DIR = "ckpt"  # under model_dir, as the coordinator's CheckpointManager always had it
NAME = "ckpt"  # CheckpointManager's default checkpoint_name

# what a damaged checkpoint raises on restore (a lost PS is told apart by ``is_lost``)
_DAMAGED = (
    FileNotFoundError,  # CheckpointCorruptError: a committed file is missing
    ValueError,  # the object graph in the checkpoint does not parse
    tf.errors.DataLossError,  # a checksum does not match
    tf.errors.InvalidArgumentError,
    tf.errors.OutOfRangeError,
    tf.errors.NotFoundError,
)


def chief_io_device(task_index: int = 0) -> str:
    """The chief's CPU: where a staged save reads every variable to and writes every file."""
    return f"/job:chief/replica:0/task:{task_index}/device:CPU:0"


def _never(_: BaseException) -> bool:
    return False


class _Base:
    """What both kinds share: the committed names, the restore-with-fallback loop."""

    def __init__(
        self,
        model_dir: ModelDir,
        checkpoint: Any,
        *,
        max_to_keep: int,
        is_lost: Callable[[BaseException], bool] | None,
    ) -> None:
        if max_to_keep < 1:
            raise TrainError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.dir = model_dir
        self.checkpoint = checkpoint
        self.max_to_keep = max_to_keep
        self.is_lost = is_lost or _never

    def _need_checkpoint(self) -> Any:
        if self.checkpoint is None:
            raise TrainError("this checkpoints object was made without a tf.train.Checkpoint; pass one")
        return self.checkpoint

    def url(self, name: str) -> str:
        """The URL of checkpoint ``name`` (a prefix: add ``.index`` for its index file)."""
        return self.dir.join(CKPT_DIR, name)

    def committed(self) -> list[str]:
        """Committed checkpoint names, oldest first, as the state file lists them."""
        raw = self.dir.read_bytes(f"{CKPT_DIR}/{STATE_FILE}")
        return [] if raw is None else parse_state(raw)[1]

    def local_copy(self, path: str) -> str:
        """A prefix this process's TensorFlow reads checkpoint ``path`` (URL or name) from."""
        raise NotImplementedError

    def _restore_options(self) -> Any:
        return None

    def restore(self, path: str) -> None:
        """Restore every object of the checkpoint object from checkpoint ``path`` (URL or name).

        Raises:
            TrainError: the checkpoint does not hold this model's objects (a different model).
            CheckpointCorruptError / tf.errors.OpError: a file is missing or damaged.
        """
        ckpt = self._need_checkpoint()
        status = ckpt.restore(self.local_copy(path), options=self._restore_options())
        try:
            status.assert_existing_objects_matched()
        except AssertionError as e:
            raise TrainError(
                f"checkpoint {self.dir.display}/{CKPT_DIR}/{_relative(path)} does not hold this model "
                f"({' '.join(str(e).split())[:200]}); train it in a new model_dir"
            ) from e

    def restore_latest(self) -> str | None:
        """Restore the newest committed checkpoint that restores; returns its URL, None if none.

        Raises:
            TrainError: checkpoints exist but none restores (each one's error is named).
        """
        return restore_newest(
            self.committed(),
            self.restore,
            self.url,
            f"{self.dir.display}/{CKPT_DIR}",
            damaged=_DAMAGED,
            is_lost=self.is_lost,
        )


class NativeObjectCheckpoints(_Base):
    """``tf.train.CheckpointManager`` in a directory TensorFlow writes (each PS writes its shard).

    Args:
        model_dir: the (TF-native) model directory.
        checkpoint: the ``tf.train.Checkpoint`` to save and restore (None: only ``local_copy``
            and ``committed`` work, e.g. to export a finished job).
        max_to_keep: committed checkpoints kept.
        is_lost: tells errors that mean the cluster lost state (they propagate from restore).
    """

    def __init__(
        self,
        model_dir: ModelDir,
        checkpoint: Any = None,
        *,
        max_to_keep: int = 3,
        is_lost: Callable[[BaseException], bool] | None = None,
    ) -> None:
        super().__init__(model_dir, checkpoint, max_to_keep=max_to_keep, is_lost=is_lost)
        self.manager: Any = None
        if checkpoint is not None:
            self.manager = tf.train.CheckpointManager(
                checkpoint, model_dir.join(CKPT_DIR), max_to_keep=max_to_keep, checkpoint_name=NAME
            )

    def save(self, step: int) -> str:
        """Save as checkpoint ``ckpt-<step>`` (TensorFlow's atomic rename commits it); its URL."""
        self._need_checkpoint()
        return str(self.manager.save(checkpoint_number=int(step)))

    def local_copy(self, path: str) -> str:
        return path if "/" in path else self.url(path)


class StagedObjectCheckpoints(_Base):
    """Checkpoints in an fsspec-only directory, written and read by the chief through staging.

    Saving: ``checkpoint.write`` with ``CheckpointOptions(experimental_io_device=io_device)``
    (the chief's CPU, :func:`chief_io_device`), so the save ops of every shard run on the chief:
    each PS's variables are read over the network and written into the chief's local staging,
    nothing is written on the PS. Then every data file is uploaded (and its local copy deleted),
    then the index, and last the ``checkpoint`` state file is replaced with one PUT: that write
    commits the checkpoint. A chief killed at any moment leaves the previous checkpoint the latest;
    the files of an uncommitted save are deleted when this process first saves (before it
    uploads anything). A save at a step
    that already has a committed checkpoint gets a new name (``ckpt-<step>_1``) rather than
    overwriting it.

    Cost: TensorFlow's saver reads all shards in one function, so during a save the chief holds
    up to the whole checkpoint (every variable and optimizer slot of every PS) in memory, and
    staging needs room for all of it on local disk until it is uploaded. Restoring downloads the
    whole checkpoint into staging and reads it on the chief (the assignments run on the PS).
    Between-graph checkpoints (:mod:`kubeai_train.tf.between_graph.checkpoints`) bound this by part size; the
    object-based saver cannot be split that way.

    Args:
        model_dir: the (fsspec-only) model directory.
        checkpoint: the ``tf.train.Checkpoint`` (None: only ``local_copy`` / ``committed``).
        io_device: the device that does all checkpoint I/O (None in a single process).
        max_to_keep: committed checkpoints kept; older ones are deleted after a commit.
        is_lost: tells errors that mean the cluster lost state (they propagate from restore).
    """

    def __init__(
        self,
        model_dir: ModelDir,
        checkpoint: Any = None,
        *,
        io_device: str | None = None,
        max_to_keep: int = 3,
        is_lost: Callable[[BaseException], bool] | None = None,
    ) -> None:
        super().__init__(model_dir, checkpoint, max_to_keep=max_to_keep, is_lost=is_lost)
        self.io_device = io_device
        self.options = tf.train.CheckpointOptions(experimental_io_device=io_device)
        self.store = StagedStore(model_dir, subdir=CKPT_DIR, name=NAME, max_to_keep=max_to_keep)

    def _restore_options(self) -> Any:
        return self.options

    def committed(self) -> list[str]:
        return self.store.committed()

    def write_local(self, prefix: str) -> list[str]:
        """Write the checkpoint at ``prefix`` (a path this process's TensorFlow writes) with all
        I/O on ``io_device``; returns the names of the files written."""
        ckpt = self._need_checkpoint()
        # counted as CheckpointManager.save counts (restore creates the counter, so a checkpoint
        # without it would not match the objects of the process that restores it)
        ckpt.save_counter.assign_add(1)
        ckpt.write(prefix, options=self.options)
        folder, _, stem = prefix.rpartition("/")
        return sorted(f for f in tf.io.gfile.listdir(folder or ".") if f.startswith(f"{stem}."))

    def save(self, step: int) -> str:
        """Save as checkpoint ``ckpt-<step>`` and commit it (see the class doc); returns its URL."""
        name = self.store.new_name(step)
        self.store.prepare(name)
        stage = tempfile.mkdtemp(prefix="save-", dir=self.dir.staging)
        try:
            files = self.write_local(os.path.join(stage, name))
            data = [f for f in files if ".data-" in f]
            if f"{name}.index" not in files or not data:
                raise TrainError(
                    f"TensorFlow wrote {files} for checkpoint {name}, expected an index and data"
                )
            for f in data:
                self.store.upload(os.path.join(stage, f), f)
                os.remove(os.path.join(stage, f))  # staging holds what is not uploaded yet
            self.store.upload(os.path.join(stage, f"{name}.index"), f"{name}.index")
            self.store.commit(name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return self.url(name)

    def local_copy(self, path: str) -> str:
        """Download checkpoint ``path`` (URL or name) into staging; returns the local prefix.

        Raises:
            CheckpointCorruptError: its index or one of its data files is missing.
        """
        return self.store.local_copy(path)


def _relative(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def object_checkpoints(
    model_dir: ModelDir,
    checkpoint: Any = None,
    *,
    io_device: str | None = None,
    max_to_keep: int = 3,
    is_lost: Callable[[BaseException], bool] | None = None,
) -> NativeObjectCheckpoints | StagedObjectCheckpoints:
    """The checkpoints kind for ``model_dir``: native when TensorFlow writes it, staged otherwise
    (``io_device`` applies to staged only: a native directory is shared, each PS writes its shard)."""
    if model_dir.native:
        return NativeObjectCheckpoints(model_dir, checkpoint, max_to_keep=max_to_keep, is_lost=is_lost)
    return StagedObjectCheckpoints(
        model_dir, checkpoint, io_device=io_device, max_to_keep=max_to_keep, is_lost=is_lost
    )
