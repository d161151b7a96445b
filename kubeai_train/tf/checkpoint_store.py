"""What checkpoints of both modes share: TensorFlow's ``checkpoint`` state file, the staged store
of an fsspec-only model directory, and restoring the newest checkpoint that restores.

Every checkpoint is a standard TensorFlow V2 checkpoint (``<name>-<step>.index`` and
``.data-<i>-of-<n>``) with TensorFlow's own ``checkpoint`` state file beside it, so
``tf.train.latest_checkpoint``, ``tf.train.list_variables`` and a single-process restore read
them (after a download, for fsspec-only directories) like any other. :class:`StagedStore` keeps
those files in a directory TensorFlow cannot write, with an order of writes that makes a save
atomic. :func:`restore_newest` tries the newest committed checkpoint first and falls back to
older ones when a file is missing or corrupt (a warning names the checkpoint and the error), so
a damaged file costs the steps since the previous checkpoint, never the job.

The modes build on this: :mod:`kubeai_train.tf.between_graph.checkpoints` (graph savers) and
:mod:`kubeai_train.tf.coordinator.checkpoints` (object checkpoints).
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence

import tensorflow as tf

from kubeai_train.tf.model_dir import ModelDir
from kubeai_train.tf.types import TrainError

__all__ = [
    "PREFIX",
    "RETRYABLE_ERRORS",
    "STATE_FILE",
    "CheckpointCorruptError",
    "StagedStore",
    "parse_state",
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


class StagedStore:
    """The files of checkpoints kept in an fsspec-only model_dir through local staging, shared by
    both modes (the between-graph :class:`~kubeai_train.tf.between_graph.checkpoints.StagedCheckpoints`,
    the coordinator's object checkpoints).

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
