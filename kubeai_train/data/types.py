"""Contracts of the data subsystem: errors, splits, sources and split assignment.

Data flows one way: a :class:`Source` (files through fsspec/pyarrow, ODPS tables through
pyodps) cuts a dataset into :class:`Split` s (row groups, stripes, row ranges); an
:class:`Assignment` decides which splits each reader (a rank, or one DataLoader worker of a
rank) reads in an epoch; the pipeline (``kubeai_train.data.pipeline``) turns the Arrow batches
of those splits into fixed-size dicts of numpy arrays. Implementations live in sibling modules
named after what they are (``files.py``, ``odps.py``, ``assignment.py``); plug-ins are found by
URL scheme through ``kubeai_train.data.registry``.

Everything here is importable without tensorflow or torch.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

__all__ = [
    "Assignment",
    "ColumnNotFoundError",
    "CorruptFileError",
    "DataError",
    "DatasetNotFoundError",
    "EmptyDatasetError",
    "ReadFailedError",
    "ReaderId",
    "SchemaMismatchError",
    "Source",
    "SourceUnavailableError",
    "Split",
    "StateError",
]


# --------------------------------------------------------------------------------------------
# errors


class DataError(Exception):
    """Base of every error the data subsystem raises on purpose.

    Keyword attributes (``path``, ``row_group``, ``column``, ...) are kept on the instance for
    programs that want them; the message already names them for people. Instances pickle
    (they cross DataLoader worker processes), because the only positional argument is the
    message and the attributes travel in ``__dict__``.
    """

    def __init__(self, message: str, **attrs: Any) -> None:
        super().__init__(message)
        for k, v in attrs.items():
            setattr(self, k, v)

    def __str__(self) -> str:  # KeyError subclasses would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class SourceUnavailableError(DataError, ImportError):
    """No source is registered for a URL scheme, or its optional dependency is not installed.

    The message carries the install hint, e.g.
    ``reading odps:// needs pyodps: pip install 'kubeai_train[odps]'``.
    """


class DatasetNotFoundError(DataError, FileNotFoundError):
    """The path, directory, glob or table matched nothing (the message names it)."""


class EmptyDatasetError(DataError, ValueError):
    """The dataset exists but holds no rows (after partition filters); names the source."""


class SchemaMismatchError(DataError, ValueError):
    """Two files (or partitions) of one dataset disagree on a column: names both and the column."""


class ColumnNotFoundError(DataError, KeyError):
    """A selected column does not exist: the message lists the columns that do."""


class CorruptFileError(DataError):
    """A file cannot be decoded (truncated, bad magic, bad page): names the file and row group."""


class ReadFailedError(DataError, OSError):
    """A read kept failing with transient errors after all retries.

    The dataset's state still points at the first unread row, so ``state_dict()`` taken after
    this error resumes without loss or duplication.
    """


class StateError(DataError, ValueError):
    """``load_state_dict`` got a state that does not belong to this dataset / these arguments."""


# --------------------------------------------------------------------------------------------
# splits


@dataclass(frozen=True)
class Split:
    """A unit of work: a row group / stripe / row range of one file, or a row range of a table.

    Attributes:
        key: stable id of the file or table partition the rows belong to (e.g. its path).
        start: first row, counted from the start of that file / table partition.
        stop: one past the last row.
        info: source-specific, JSON-serialisable details (``{"path": ..., "row_group": 3}``).
            Not part of equality or hashing.

    The pipeline may cut a split into row ranges (``dataclasses.replace(split, start=a,
    stop=b)`` with ``split.start <= a <= b <= split.stop``) so that no reader idles when
    there are fewer splits than readers; every :class:`Source` must read such sub-splits.
    """

    key: str
    start: int
    stop: int
    info: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ValueError(f"Split.key must be a non-empty string, got {self.key!r}")
        for name in ("start", "stop"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"Split.{name} must be an integer >= 0, got {v!r}")
        if self.stop < self.start:
            raise ValueError(f"Split.stop must be >= start, got start={self.start} stop={self.stop}")

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; :meth:`from_dict` inverts it."""
        return {"key": self.key, "start": self.start, "stop": self.stop, "info": dict(self.info)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Split:
        return cls(str(d["key"]), int(d["start"]), int(d["stop"]), dict(d.get("info") or {}))

    def __repr__(self) -> str:
        return f"Split({self.key!r}, {self.start}, {self.stop})"


# --------------------------------------------------------------------------------------------
# sources


class Source(ABC):
    """One dataset location, read as Arrow record batches split by split.

    Implementations are constructed as ``SourceClass(url, **options)`` (see the registry) and
    must:

    * pickle cheaply (they are sent to DataLoader worker processes) and never put secrets in
      ``repr``, :meth:`describe` or error messages;
    * return the same :meth:`splits` in the same order on every rank and every call (the
      assignment relies on it), cheaply enough to recompute on every rank at start-up;
    * read any sub-split of a split they returned (same key and info, a narrower row range).
    """

    url: str

    @abstractmethod
    def schema(self) -> pa.Schema:
        """The dataset's columns (including partition columns a source adds)."""

    @abstractmethod
    def splits(self) -> Sequence[Split]:
        """All splits of the dataset in a deterministic order. Empty splits may be omitted."""

    @abstractmethod
    def read(
        self, split: Split, columns: Sequence[str] | None = None, offset: int = 0
    ) -> Iterator[pa.RecordBatch]:
        """Yield rows ``[split.start + offset, split.stop)`` of ``split`` as record batches.

        Args:
            split: a split returned by :meth:`splits`, or a sub-range of one.
            columns: the columns to return, in this order (``None``: all, in schema order).
                The projection is pushed down: unselected columns are not fetched.
            offset: rows of the split to skip (resume inside a split).

        Batches should be large (thousands of rows or more); their schema is
        ``schema()`` projected to ``columns``. Raises :class:`CorruptFileError` for data that
        cannot be decoded, naming the file and row group; transient failures (see
        :meth:`is_transient`) are retried by the caller, which calls ``read`` again with the
        offset of the first row it has not received.
        """

    def describe(self) -> dict[str, Any]:
        """A small JSON-serialisable description for logs; never contains secrets."""
        return {"type": type(self).__name__, "url": getattr(self, "url", None)}

    def is_transient(self, exc: BaseException) -> bool:
        """Whether a failed read is worth retrying (network resets, timeouts, throttling).

        The default says yes for ``ConnectionError``, ``TimeoutError`` and other ``OSError`` s
        except the ones that will not heal by waiting (missing file, permission, directory).
        Sources with their own error types override this; never classify by message text.
        """
        if isinstance(exc, DataError):
            return False
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        return isinstance(exc, OSError)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections / file handles. Optional; reading again reopens them."""


# --------------------------------------------------------------------------------------------
# assignment


@dataclass(frozen=True)
class ReaderId:
    """One reader of a dataset: a rank, or one DataLoader worker of a rank.

    Attributes:
        rank / world_size: the training process among ``world_size`` of them.
        worker / num_workers: the DataLoader worker of that rank (0 / 1 without workers).
    """

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    def __post_init__(self) -> None:
        for name in ("rank", "world_size", "worker", "num_workers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if not 0 <= self.worker < self.num_workers:
            raise ValueError(f"worker must be in [0, num_workers={self.num_workers}), got {self.worker}")


class Assignment(ABC):
    """Decides which splits (or row ranges of splits) a reader reads in an epoch.

    The static assignment (``kubeai_train.data.assignment.StaticAssignment``) is a pure
    function of (splits, reader, epoch, seed); a dynamic dispatcher that hands the next split
    to whichever reader asks (slow-worker mitigation) implements the same method by returning
    a lazy iterator and keeps its progress in :meth:`state_dict`. The pipeline does not care
    which one it has.
    """

    @abstractmethod
    def assign(
        self, splits: Sequence[Split], reader: ReaderId, epoch: int, seed: int | None
    ) -> Iterable[Split]:
        """The splits ``reader`` reads in ``epoch``, in reading order.

        Args:
            splits: every split of the dataset, in the source's order.
            reader: who is asking.
            epoch: 0-based epoch.
            seed: ``None`` for the natural order; otherwise the split order is a function of
                (seed, epoch) only.

        Over all readers of one (world_size, num_workers) configuration, the returned ranges
        cover every row of ``splits`` exactly once. A static assignment returns a Sequence
        (so positions can be recomputed on resume); a dynamic one may return an iterator.
        """

    def state_dict(self) -> dict[str, Any]:
        """Progress a dynamic assignment must persist; a static one has none."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what :meth:`state_dict` returned."""


def splits_fingerprint(splits: Iterable[Split]) -> str:
    """A short stable digest of (key, start, stop) of every split: a state belongs to a dataset."""
    h = hashlib.sha256()
    for s in splits:
        h.update(json.dumps([s.key, s.start, s.stop]).encode())
    return h.hexdigest()[:16]
