"""The pipeline: a reader's splits -> a deterministic row stream -> exact batches of numpy arrays.

For one reader (rank, DataLoader worker) and one epoch, the assignment gives an ordered list
of (sub-)splits whose row counts are known up front; laid end to end they form the reader's
*row stream* for that epoch. Everything else is a function of positions in that stream:

* without shuffle, rows are emitted in stream order;
* with shuffle, the stream is cut into fixed windows of ``shuffle_buffer`` rows (window ``w``
  holds stream rows ``[w * W, (w + 1) * W)``) and each window is permuted by a generator seeded
  from (seed, epoch, reader, w), on top of the split order already drawn from (seed, epoch).
  Memory for shuffling is bounded by one window.

So the emitted sequence of an epoch is a pure function of (seed, epoch, reader), and the
state is just ``(epoch, rows emitted)``: resuming re-reads the current window from its first
row (at most ``shuffle_buffer`` rows of extra reading), permutes it identically and skips the
rows already emitted. No bookkeeping of which rows were seen is needed, and the state is a few
integers whatever the dataset size.

Batches are exactly ``batch_size`` rows across split, file and window boundaries; the last
batch of an epoch is short unless ``drop_last``. Each source record batch is converted to
numpy once, whole (nulls filled, strings hashed); a batch that lies inside one is a set of
numpy views of it, and only a batch that straddles two is concatenated. Two background
threads overlap the stages: one decodes the source's record batches ``read_ahead`` ahead of
their conversion (decoding releases the GIL), another converts and cuts batches into a queue
of ``prefetch`` batches; both stop, and are joined, when the iteration ends, fails or is
closed, and an error in either reaches the caller as the same exception the synchronous path
(``prefetch=0, read_ahead=0``) raises, after the same batches. Peak memory does not grow with
the dataset: it is about ``(prefetch + 3) x batch bytes`` (the queue, one batch waiting to be
put, one being built, the one the caller holds; a batch that is a view keeps its converted
source batch alive) plus a constant of the source's (for Parquet files: ``read_ahead + 2``
source record batches (the read-ahead queue, one waiting to be put, one being converted; one
with ``read_ahead=0``) and a 1 MiB stream buffer per selected column; remote files pre-buffer
the selected column chunks of one row group), plus, when shuffling, one window of
``shuffle_buffer`` rows (two for the moment the window is permuted; string columns that are
hashed are hashed before the window, so a window holds 8-byte ids). Measured by
``tests/data/test_dataset.py::test_peak_memory_does_not_grow_with_dataset_size``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import zlib
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from kubeai_train import cluster
from kubeai_train.data import adapters
from kubeai_train.data._background import background
from kubeai_train.data._retry import RetryPolicy
from kubeai_train.data.assignment import StaticAssignment, share_bounds, slice_rows
from kubeai_train.data.convert import (
    OFFSETS_SUFFIX,
    ColumnPlan,
    HashMemo,
    convert,
    plan_columns,
    prehash,
)
from kubeai_train.data.registry import open_source
from kubeai_train.data.types import (
    Assignment,
    ColumnNotFoundError,
    DataError,
    EmptyDatasetError,
    ReaderId,
    ReadFailedError,
    Source,
    Split,
    StateError,
    splits_fingerprint,
)

__all__ = ["Dataset", "ReadOptions", "read"]

log = logging.getLogger("kubeai_train.data")
STATE_VERSION = 1
_END = object()


@dataclass(frozen=True)
class ReadOptions:
    """How a dataset is read (everything but the source). Validated on construction.

    Attributes:
        columns: columns to read, in output order (None: all).
        batch_size: rows per batch.
        shuffle / seed: deterministic shuffle from (seed, epoch): split order + window shuffle.
        shuffle_buffer: rows per shuffle window (memory bound of shuffling); default
            ``max(8 * batch_size, 65536)``.
        num_epochs: epochs per iteration (``None``: iterate forever).
        drop_last: drop each epoch's short last batch.
        prefetch: batches converted ahead by a background thread (0: in the caller's thread).
        read_ahead: source record batches decoded ahead of their conversion by another
            background thread (0: decode in the thread that converts). Decoding releases the
            GIL, so it overlaps with conversion and hashing.
        hash_buckets: ``{column: buckets}`` string columns -> int64 ids (see ``convert``).
        fill_null: ``{column: value}`` per-column null replacement (defaults in ``convert``).
        retries / backoff: transient read errors are retried this many times with
            exponential backoff starting at ``backoff`` seconds.
        allow_empty: an empty dataset iterates as nothing instead of raising EmptyDatasetError.
    """

    columns: tuple[str, ...] | None = None
    batch_size: int = 4096
    shuffle: bool = False
    seed: int = 0
    shuffle_buffer: int | None = None
    num_epochs: int | None = 1
    drop_last: bool = False
    prefetch: int = 4
    read_ahead: int = 2
    hash_buckets: Mapping[str, int] = field(default_factory=dict)
    fill_null: Mapping[str, Any] = field(default_factory=dict)
    retries: int = 3
    backoff: float = 0.2
    allow_empty: bool = False

    def __post_init__(self) -> None:
        def check_int(name: str, v: Any, lo: int) -> None:
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")

        check_int("batch_size", self.batch_size, 1)
        check_int("seed", self.seed, 0)
        check_int("prefetch", self.prefetch, 0)
        check_int("read_ahead", self.read_ahead, 0)
        check_int("retries", self.retries, 0)
        if self.shuffle_buffer is not None:
            check_int("shuffle_buffer", self.shuffle_buffer, 1)
        if self.num_epochs is not None:
            check_int("num_epochs", self.num_epochs, 1)
        if self.columns is not None:
            if isinstance(self.columns, str) or not all(isinstance(c, str) for c in self.columns):
                raise ValueError(f"columns must be a list of column names, got {self.columns!r}")
            if not self.columns:
                raise ValueError("columns must name at least one column (None reads all)")
            if len(set(self.columns)) != len(self.columns):
                raise ValueError(f"columns has duplicates: {list(self.columns)}")
        if self.backoff < 0:
            raise ValueError(f"backoff must be >= 0, got {self.backoff!r}")

    @property
    def window(self) -> int:
        return self.shuffle_buffer or max(8 * self.batch_size, 65536)


_PIPELINE_OPTIONS = {
    "shuffle_buffer",
    "prefetch",
    "read_ahead",
    "hash_buckets",
    "fill_null",
    "retries",
    "backoff",
    "allow_empty",
}


def read(
    source: str | Source,
    columns: Sequence[str] | None = None,
    batch_size: int = 4096,
    shuffle: bool = False,
    seed: int = 0,
    num_epochs: int | None = 1,
    drop_last: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    *,
    assignment: Assignment | None = None,
    **options: Any,
) -> Dataset:
    """Open ``source`` for batched, exactly-once, resumable reading by this rank.

    Args:
        source: a local path / directory / glob, an fsspec URL, ``odps://...``, or a Source.
        columns: columns to read, in this order (None: all). Pushed down to the source.
        batch_size: rows per batch; batches are exact across split and file boundaries.
        shuffle / seed: deterministic shuffle, a function of (seed, epoch) only.
        num_epochs: epochs per iteration of the dataset (None: forever).
        drop_last: drop the short last batch of each epoch.
        rank / world_size: this reader among the readers; default ``cluster.current()``.
        assignment: which splits each reader reads: an ``Assignment``, or ``"static"`` (the
            default, ``StaticAssignment()``), or ``"dynamic"`` (``DynamicAssignment()``: readers
            ask the job's dispatcher for their next piece, so slow readers read less).
        **options: pipeline options (``shuffle_buffer``, ``prefetch``, ``read_ahead``, ``hash_buckets``,
            ``fill_null``, ``retries``, ``backoff``, ``allow_empty``); the rest go to the
            source (files: ``format``, ``storage_options``, ``partition_filter``,
            ``cache_dir``, ``split_rows``, ...).

    Guarantees: every row is read exactly once per epoch across all ranks (and DataLoader
    workers with ``to_torch``); ``state_dict()`` resumes at the next unread row.

    Raises:
        DatasetNotFoundError / SchemaMismatchError / CorruptFileError: from the source.
        ColumnNotFoundError: a selected column does not exist (the message lists those that do).
        EmptyDatasetError: the dataset has no rows (unless ``allow_empty=True``).
        ValueError: a bad argument, named.
    """
    assignment = resolve_assignment(assignment)
    pipe = {k: options.pop(k) for k in list(options) if k in _PIPELINE_OPTIONS}
    opts = ReadOptions(
        columns=tuple(columns) if columns is not None and not isinstance(columns, str) else columns,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        num_epochs=num_epochs,
        drop_last=drop_last,
        **pipe,
    )
    if rank is None or world_size is None:
        info = cluster.current()
        rank = info.rank if rank is None else rank
        world_size = info.world_size if world_size is None else world_size
    src = open_source(source, **options)
    return Dataset(src, opts, ReaderId(rank=rank, world_size=world_size), assignment=assignment)


def _dynamic() -> Assignment:
    # imported on use: the dispatcher's HTTP machinery is not needed by static readers
    from kubeai_train.data.dispatch.client import DynamicAssignment

    return DynamicAssignment()


ASSIGNMENTS: dict[str, Any] = {"static": StaticAssignment, "dynamic": _dynamic}


def resolve_assignment(assignment: Assignment | str | None) -> Assignment:
    """``assignment`` as an ``Assignment`` instance: None and ``"static"`` give
    ``StaticAssignment()``, ``"dynamic"`` a ``DynamicAssignment()``.

    Raises:
        ValueError: anything else, in one line naming the value and what is accepted.
    """
    if assignment is None:
        return StaticAssignment()
    if isinstance(assignment, Assignment):
        return assignment
    if isinstance(assignment, str) and assignment in ASSIGNMENTS:
        return ASSIGNMENTS[assignment]()
    names = ", ".join(repr(n) for n in ASSIGNMENTS)
    raise ValueError(
        f"assignment must be a kubeai_train.data.Assignment instance or one of {names}, got {assignment!r} "
        f"({type(assignment).__name__})"
    )


class _Rows:
    """Rows ``[lo, hi)`` of one converted record batch (``arrays``: its numpy outputs).

    Quacks like the record batches it replaces in the batch cutters (``num_rows``,
    ``slice``), so cutting a batch out of it costs no copy.
    """

    __slots__ = ("arrays", "hi", "lo")

    def __init__(self, arrays: dict[str, np.ndarray], lo: int, hi: int) -> None:
        self.arrays, self.lo, self.hi = arrays, lo, hi

    @property
    def num_rows(self) -> int:
        return self.hi - self.lo

    def slice(self, offset: int, length: int | None = None) -> _Rows:
        lo = min(self.hi, self.lo + offset)
        return _Rows(self.arrays, lo, self.hi if length is None else min(self.hi, lo + length))

    def view(self, plans: Sequence[ColumnPlan]) -> dict[str, np.ndarray]:
        """The rows as numpy arrays: views, but for list offsets (rebased to start at 0)."""
        a, lo, hi = self.arrays, self.lo, self.hi
        out: dict[str, np.ndarray] = {}
        for plan in plans:
            if plan.kind.startswith("list_"):
                name = plan.name + OFFSETS_SUFFIX
                offsets = a[name]
                first, last = int(offsets[lo]), int(offsets[hi])
                out[plan.name] = a[plan.name][first:last]
                out[name] = offsets[lo : hi + 1] - first if first else offsets[lo : hi + 1]
            else:
                out[plan.name] = a[plan.name][lo:hi]
        return out


class Dataset:
    """A rank's batched view of a source. Iterate it for ``dict[str, numpy.ndarray]`` batches.

    Each iteration runs from the current state to the end of the current block of
    ``num_epochs`` epochs (so ``for epoch in range(3): for b in ds`` with ``num_epochs=1``
    reads epochs 0, 1, 2, each shuffled differently). :meth:`set_epoch` jumps to an epoch.

    If a read fails after all retries, iteration raises :class:`ReadFailedError` (or the
    source's ``CorruptFileError``) after delivering every batch read before the failure, and
    ``state_dict()`` still points at the first row not delivered.

    One iteration at a time: iterating a Dataset twice concurrently would interleave their
    positions in one state (make a second ``data.read`` for a second reader).
    """

    def __init__(
        self,
        source: Source,
        options: ReadOptions,
        reader: ReaderId,
        *,
        assignment: Assignment | None = None,
    ) -> None:
        self.source = source
        self.options = options
        self.reader = reader
        self.assignment = resolve_assignment(assignment)
        schema = source.schema()
        names = list(schema.names)
        cols = list(options.columns) if options.columns is not None else names
        missing = [c for c in cols if c not in names]
        if missing:
            raise ColumnNotFoundError(
                f"column {missing[0]!r} not in {source.url}; columns: {', '.join(names)}", column=missing[0]
            )
        self.columns = cols
        self.plans: list[ColumnPlan] = plan_columns(schema, cols, options.hash_buckets, options.fill_null)
        self._splits: list[Split] = [s for s in source.splits() if s.num_rows > 0]
        self.total_rows = sum(s.num_rows for s in self._splits)
        if self.total_rows == 0 and not options.allow_empty:
            raise EmptyDatasetError(
                f"{source.url} has no rows (after filters); check the path / partition filter, "
                "or pass allow_empty=True to iterate nothing",
                path=source.url,
            )
        self.fingerprint = splits_fingerprint(self._splits)
        self._epoch = 0
        self._rows = 0
        # a lazy (dynamic) assignment: the piece this reader is partway through, rows of it
        # delivered, and whether the epoch's last batch was delivered
        self.lazy = bool(getattr(self.assignment, "lazy", False))
        self._piece: Any = None
        self._piece_rows = 0
        self._epoch_done = False
        self._unacked: list[Any] = []  # from a loaded state: delivered, acknowledgement unknown
        # pieces delivered in this epoch and the one before (a dispatcher state taken before this
        # reader's may not know the last pieces of the previous epoch either)
        self._delivered: list[Any] = []
        self._delivered_prev: list[Any] = []
        self._resumed = False  # a state was loaded: the next hello reconciles with it
        if self.lazy:
            self.assignment.attach(  # type: ignore[attr-defined]
                self._splits, reader, options.seed if options.shuffle else None
            )
        self._retry = RetryPolicy(retries=options.retries, backoff=options.backoff)
        log.info(
            "data.read: rank %d/%d, %d rows in %d splits, this rank %s; batch_size=%d shuffle=%s seed=%d source=%s",
            reader.rank,
            reader.world_size,
            self.total_rows,
            len(self._splits),
            f"pieces from the dispatcher at {getattr(self.assignment, 'url', None)}"
            if self.lazy
            else f"{self.num_rows} rows",
            options.batch_size,
            options.shuffle,
            options.seed,
            source.describe(),
        )

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        """Rows this reader reads per epoch (the same every epoch). With a dynamic assignment
        this is not known in advance: it is the even share, what a reader reads at equal speed."""
        r = self.reader
        lo, hi = share_bounds(self.total_rows, r.world_size, r.rank)
        lo2, hi2 = share_bounds(hi - lo, r.num_workers, r.worker)
        return hi2 - lo2

    def _epoch_rows(self) -> int:
        n = self.num_rows
        return n - n % self.options.batch_size if self.options.drop_last else n

    def __len__(self) -> int:
        """Batches per epoch for this reader.

        Raises:
            TypeError: with a dynamic assignment, where a reader's share is decided while reading.
        """
        if self.lazy:
            raise TypeError(
                "a dataset read with a dynamic assignment has no length: readers take pieces as they go"
            )
        n, b = self.num_rows, self.options.batch_size
        return n // b if self.options.drop_last else -(-n // b)

    def splits(self, epoch: int | None = None) -> list[Split]:
        """The (sub-)splits this reader reads in ``epoch`` (default: the current one), in order.

        Raises:
            TypeError: with a dynamic assignment, which decides while reading.
        """
        if self.lazy:
            raise TypeError("a dynamic assignment hands out pieces while reading; there is no split list")
        e = self._epoch if epoch is None else epoch
        seed = self.options.seed if self.options.shuffle else None
        return list(self.assignment.assign(self._splits, self.reader, e, seed))

    # -- state ---------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of ``epoch`` (like DistributedSampler)."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        if epoch == self._epoch + 1:
            self._next_delivered()
        elif epoch != self._epoch:  # a jump: what was delivered before is of no other epoch's use
            self._delivered, self._delivered_prev = [], []
        self._epoch, self._rows = epoch, 0
        self._piece, self._piece_rows, self._epoch_done = None, 0, False

    def _next_delivered(self) -> None:
        self._delivered_prev, self._delivered = self._delivered, []

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: the epoch and the rows of it this reader has delivered."""
        o = self.options
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "rows": self._rows,
            "rank": self.reader.rank,
            "world_size": self.reader.world_size,
            "worker": self.reader.worker,
            "num_workers": self.reader.num_workers,
            "shuffle": o.shuffle,
            "seed": o.seed,
            "shuffle_buffer": o.window if o.shuffle else None,
            "fingerprint": self.fingerprint,
            "assignment": self._assignment_state(),
        }

    def _assignment_state(self) -> dict[str, Any]:
        st = dict(self.assignment.state_dict())
        if self.lazy:
            st["piece"] = self._piece.to_dict() if self._piece is not None else None
            st["piece_rows"] = self._piece_rows
            st["epoch_done"] = self._epoch_done
            pending = self.assignment.unconfirmed(self.reader) + self._unacked  # type: ignore[attr-defined]
            st["unacked"] = [p.to_dict() for p in pending]
            st["delivered"] = [p.to_dict() for p in self._delivered]
            st["delivered_prev"] = [p.to_dict() for p in self._delivered_prev]
        return st

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of a dataset read with the same
        source, columns, shuffle settings and reader).

        Raises:
            StateError: the state belongs to other data or other reading arguments (named).
        """
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise StateError(f"not a data state (version {STATE_VERSION}): {str(state)[:200]}")
        mine = self.state_dict()
        for k in (
            "rank",
            "world_size",
            "worker",
            "num_workers",
            "shuffle",
            "seed",
            "shuffle_buffer",
            "fingerprint",
        ):
            if state.get(k) != mine[k]:
                what = "the dataset's splits changed" if k == "fingerprint" else f"{k} differs"
                raise StateError(
                    f"state does not match this dataset: {what} (state {k}={state.get(k)!r}, here {mine[k]!r}); "
                    "resume with the same source and arguments"
                )
        epoch, rows = state.get("epoch"), state.get("rows")
        if (
            not isinstance(epoch, int)
            or not isinstance(rows, int)
            or epoch < 0
            or not 0 <= rows <= (self.total_rows if self.lazy else self.num_rows)
        ):
            raise StateError(
                f"state has a bad position epoch={epoch!r} rows={rows!r} (this reader has {self.num_rows} rows)"
            )
        self._epoch, self._rows = epoch, rows
        ast = state.get("assignment") or {}
        self.assignment.load_state_dict(ast)
        if self.lazy:
            from kubeai_train.data.dispatch.core import Piece

            self._piece = Piece.from_dict(ast["piece"]) if ast.get("piece") else None
            self._piece_rows = int(ast.get("piece_rows") or 0)
            self._epoch_done = bool(ast.get("epoch_done"))
            self._unacked = [Piece.from_dict(p) for p in ast.get("unacked") or ()]
            self._delivered = [Piece.from_dict(p) for p in ast.get("delivered") or ()]
            self._delivered_prev = [Piece.from_dict(p) for p in ast.get("delivered_prev") or ()]
            self._resumed = "delivered" in ast

    # -- iteration -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if self.lazy:
            yield from self._iter_dynamic()
            return
        n = self.options.num_epochs
        if 0 < self._epoch_rows() <= self._rows:
            # a finished epoch (a state taken after its last batch, before the iteration ended)
            self._epoch, self._rows = self._epoch + 1, 0
            if n is not None and self._epoch % n == 0:
                # ... the last of its block: that iteration is complete, and this one (the
                # interrupted iteration resumed) has nothing left; the next one reads the next block
                return
        end = None if n is None else (self._epoch // n + 1) * n
        if end is None and self._epoch_rows() == 0:
            # nothing to read, forever: iterate nothing rather than spin
            log.warning("rank %d reads no rows; num_epochs=None iterates nothing", self.reader.rank)
            return
        if self.options.prefetch == 0:
            with contextlib.closing(self._produce(self._epoch, self._rows, end)) as items:
                for item in items:
                    if item[0] is _END:
                        self._epoch, self._rows = item[1] + 1, 0
                        continue
                    batch, epoch, rows = item
                    self._epoch, self._rows = epoch, rows
                    yield batch
            return
        yield from self._prefetched(end)

    def _prefetched(
        self,
        end: int | None,
        produce: Callable[[int, int, int | None], Iterator[tuple[Any, ...]]] | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        produce = produce or self._produce
        items = background(
            functools.partial(produce, self._epoch, self._rows, end),
            self.options.prefetch,
            "kubeai-data-prefetch",
        )
        try:
            for item in items:
                if item[0] is _END:
                    self._epoch, self._rows = item[1] + 1, 0
                    self._piece, self._piece_rows, self._epoch_done = None, 0, False
                    self._next_delivered()
                    continue
                if len(item) == 5:  # dynamic: (batch or None, epoch, rows, position, acks)
                    batch = self._deliver(item)
                    if batch is not None:
                        yield batch
                    continue
                batch, epoch, rows = item
                self._epoch, self._rows = epoch, rows
                yield batch
        finally:
            items.close()  # stops and joins the producer (and its read-ahead)

    # -- dynamic assignment ------------------------------------------------------------------------
    def _iter_dynamic(self) -> Iterator[dict[str, np.ndarray]]:
        n = self.options.num_epochs
        a: Any = self.assignment
        # the piece this reader is partway through, and those delivered whose acknowledgement
        # its state did not see confirmed: kept for it (and the latter acknowledged now)
        keep = [self._piece] if self._piece is not None else []
        unacked, self._unacked = self._unacked, []
        if self._resumed:  # the first iteration after a restore: the dispatcher reconciles
            self._resumed = False
            if self._delivered_prev and self._epoch > 0:
                delivered, since = self._delivered_prev + self._delivered, self._epoch - 1
            else:
                delivered, since = self._delivered, self._epoch
            oks = a.hello(self.reader, keep + unacked, delivered, since)
        else:
            oks = a.hello(self.reader, keep + unacked)
        if keep and not oks[0]:
            log.warning(
                "reader %d.%d: piece %s of its state was handed to another reader meanwhile; %d rows of it "
                "already delivered may be read again",
                self.reader.rank,
                self.reader.worker,
                keep[0].id,
                self._piece_rows,
            )
            self._piece, self._piece_rows = None, 0
        for p, ok in zip(unacked, oks[len(keep) :], strict=True):
            if ok:
                a.ack_later(self.reader, p)
        if self._epoch_done:
            # a state taken after an epoch's last batch: that epoch is complete
            self._epoch, self._rows = self._epoch + 1, 0
            self._piece, self._piece_rows, self._epoch_done = None, 0, False
            self._next_delivered()
            if n is not None and self._epoch % n == 0:
                a.leave(self.reader)
                return
        end = None if n is None else (self._epoch // n + 1) * n
        try:
            if self.options.prefetch == 0:
                with contextlib.closing(self._produce_dynamic(self._epoch, end)) as items:
                    for item in items:
                        if item[0] is _END:
                            self._epoch, self._rows = item[1] + 1, 0
                            self._piece, self._piece_rows, self._epoch_done = None, 0, False
                            self._next_delivered()
                            continue
                        batch = self._deliver(item)
                        if batch is not None:
                            yield batch
            else:
                yield from self._prefetched_dynamic(end)
        finally:
            a.leave(self.reader, [self._piece] if self._piece is not None else [])

    def _prefetched_dynamic(self, end: int | None) -> Iterator[dict[str, np.ndarray]]:
        # the prefetch machinery (queue, stop, errors) with the dynamic producer
        yield from self._prefetched(end, lambda epoch, rows, end_: self._produce_dynamic(epoch, end_))

    def _deliver(self, item: tuple[Any, ...]) -> dict[str, np.ndarray] | None:
        """Acknowledge the pieces an item completes, then move the position past it."""
        batch, epoch, rows, pos, acks = item
        if epoch != self._epoch:
            self._next_delivered()
        for p in acks:
            self.assignment.ack_later(self.reader, p)  # type: ignore[attr-defined]
            self._delivered.append(p)
        self._epoch, self._rows = epoch, rows
        self._piece, self._piece_rows, self._epoch_done = pos
        return batch  # type: ignore[no-any-return]

    def _produce_dynamic(self, epoch: int, end: int | None) -> Generator[tuple[Any, ...], None, None]:
        keep, keep_rows, rows = self._piece, self._piece_rows, self._rows
        while end is None or epoch < end:
            yield from self._dynamic_epoch(epoch, rows, keep, keep_rows)
            yield (_END, epoch)
            epoch, rows, keep, keep_rows = epoch + 1, 0, None, 0

    def _dynamic_epoch(
        self, epoch: int, rows: int, keep: Any, keep_rows: int
    ) -> Iterator[tuple[Any, int, int, tuple[Any, int, bool], list[Any]]]:
        """Items ``(batch, epoch, rows delivered, (piece, rows of it, epoch done), pieces done)``.

        Batches are exact across pieces; a piece is reported done with the batch holding its
        last row (or with the epoch's end marker when that batch is dropped or empty).
        """
        o = self.options
        a: Any = self.assignment

        def stream() -> Iterator[tuple[Any, int]]:
            # (a piece of an earlier epoch: re-queued after its reader died, handed out late)
            if keep is not None and keep.epoch <= epoch:
                yield keep, keep_rows
            for p in a.pieces(self.reader, epoch):
                yield p, 0

        pending: list[_Rows] = []
        have = 0
        finished: list[Any] = []
        for piece, start in stream():
            got = start
            if got >= piece.num_rows:
                finished.append(piece)
                continue
            for rb in self._converted(self._piece_rows_from(a.split_of(piece), piece.epoch, start)):
                while rb.num_rows:
                    take = min(o.batch_size - have, rb.num_rows)
                    pending.append(rb.slice(0, take) if take < rb.num_rows else rb)
                    rb = rb.slice(take)
                    have += take
                    got += take
                    if have == o.batch_size:
                        rows += have
                        if got >= piece.num_rows:
                            yield self._to_numpy(pending), epoch, rows, (None, 0, False), [*finished, piece]
                        else:
                            yield self._to_numpy(pending), epoch, rows, (piece, got, False), finished
                        pending, have, finished = [], 0, []
            if got != piece.num_rows:
                raise DataError(
                    f"{self.source.url}: piece {piece.id} returned {got} of {piece.num_rows} rows; "
                    "the source changed while reading"
                )
            if have:  # the batch being built holds the piece's last rows
                finished.append(piece)
        if have and not o.drop_last:
            rows += have
            yield self._to_numpy(pending), epoch, rows, (None, 0, True), finished
        else:
            yield None, epoch, rows, (None, 0, True), finished

    def _piece_rows_from(self, split: Split, epoch: int, start: int) -> Iterator[pa.RecordBatch]:
        """A piece's rows from its row ``start`` on; shuffled in windows seeded by the piece
        itself (not the reader), so whoever reads it, or resumes it, emits the same order."""
        if not self.options.shuffle:
            yield from self._read_range([split], start, split.num_rows)
            return
        w = self.options.window
        total = split.num_rows
        first = start // w
        for win in range(first, -(-total // w)):
            lo, hi = win * w, min(total, (win + 1) * w)
            window = self._window([split], lo, hi, epoch)
            key = zlib.crc32(split.key.encode())
            rng = np.random.default_rng([self.options.seed, epoch, key, split.start, split.stop, win])
            perm = rng.permutation(hi - lo)
            skip = start - lo if win == first else 0
            shuffled = pa.Table.from_batches([window]).take(pa.array(perm[skip:])).combine_chunks()
            del window
            yield from shuffled.to_batches(max_chunksize=self.options.batch_size)
            del shuffled

    def _produce(self, epoch: int, rows: int, end: int | None) -> Generator[tuple[Any, ...], None, None]:
        """(batch, epoch, rows delivered after it) items, and (_END, epoch) after each epoch."""
        while end is None or epoch < end:
            yield from self._epoch_batches(epoch, rows)
            yield (_END, epoch)
            epoch, rows = epoch + 1, 0

    def _epoch_batches(self, epoch: int, start: int) -> Iterator[tuple[dict[str, np.ndarray], int, int]]:
        o = self.options
        limit = self._epoch_rows()
        if start >= limit:
            return
        splits = self.splits(epoch)
        pos = start
        pending: list[_Rows] = []
        have = 0
        for rb in self._converted(self._rows_from(splits, epoch, start)):
            while rb.num_rows:
                take = min(o.batch_size - have, rb.num_rows, limit - pos - have)
                if take <= 0:
                    break
                pending.append(rb.slice(0, take) if take < rb.num_rows else rb)
                rb = rb.slice(take)
                have += take
                if have == o.batch_size or pos + have >= limit:
                    pos += have
                    yield self._to_numpy(pending), epoch, pos
                    pending, have = [], 0
            if pos >= limit:
                return
        if have:
            pos += have
            yield self._to_numpy(pending), epoch, pos

    def _converted(self, batches: Iterator[pa.RecordBatch]) -> Iterator[_Rows]:
        """Each record batch converted to numpy once, whole: batches are then cut from it as
        views (a copy only for a batch that straddles two of them)."""
        try:
            for rb in batches:
                yield _Rows(convert(rb, self.plans), 0, rb.num_rows)
        finally:
            close = getattr(batches, "close", None)
            if close is not None:  # at once, not when collected: it may own a read-ahead thread
                close()

    def _to_numpy(self, pieces: list[_Rows]) -> dict[str, np.ndarray]:
        """One batch from consecutive row ranges of converted record batches."""
        if len(pieces) == 1:
            return pieces[0].view(self.plans)
        views = [p.view(self.plans) for p in pieces]
        out: dict[str, np.ndarray] = {}
        for plan in self.plans:
            out[plan.name] = np.concatenate([v[plan.name] for v in views])
            if plan.kind.startswith("list_"):
                name = plan.name + OFFSETS_SUFFIX
                parts, shift = [views[0][name]], int(views[0][name][-1])
                for v in views[1:]:
                    parts.append(v[name][1:] + shift)
                    shift += int(v[name][-1])
                out[name] = np.concatenate(parts)
        return out

    def _rows_from(self, splits: Sequence[Split], epoch: int, start: int) -> Iterator[pa.RecordBatch]:
        """Record batches of the epoch's emitted row sequence from row ``start`` on."""
        total = sum(s.num_rows for s in splits)
        if not self.options.shuffle:
            yield from self._read_range(splits, start, total)
            return
        w = self.options.window
        first = start // w
        step = self.options.batch_size
        for win in range(first, -(-total // w)):
            lo, hi = win * w, min(total, (win + 1) * w)
            window = self._window(splits, lo, hi, epoch)
            r = self.reader
            rng = np.random.default_rng(
                [self.options.seed, epoch, r.rank, r.world_size, r.worker, r.num_workers, win]
            )
            perm = rng.permutation(hi - lo)
            skip = start - lo if win == first else 0
            # one take for the whole window (2-3x faster than a take per batch, measured), and
            # the unpermuted rows released at once: two windows only during the take, one while
            # it is served, none of this window left when the next one is read
            # (a Table's take runs its columns on Arrow's thread pool; a RecordBatch's does not)
            shuffled = pa.Table.from_batches([window]).take(pa.array(perm[skip:])).combine_chunks()
            del window
            yield from shuffled.to_batches(max_chunksize=step)
            del shuffled

    def _window(self, splits: Sequence[Split], lo: int, hi: int, epoch: int) -> pa.RecordBatch:
        """Stream rows [lo, hi) as one record batch, assembled column by column so that the
        source batches' memory is released as the window's grows (peak: one window plus one
        column of it)."""
        pieces = list(self._read_range(splits, lo, hi))
        got = sum(p.num_rows for p in pieces)
        if got != hi - lo:
            raise DataError(
                f"{self.source.url}: window rows [{lo}, {hi}) of epoch {epoch} returned "
                f"{got} rows; the source changed while reading"
            )
        names = pieces[0].schema.names
        columns: list[list[pa.Array] | None] = [[p.column(i) for p in pieces] for i in range(len(names))]
        del pieces
        arrays = []
        for i in range(len(names)):
            parts = columns[i] or []
            columns[i] = None
            try:
                arrays.append(parts[0] if len(parts) == 1 else pa.concat_arrays(parts))
            except pa.ArrowInvalid:  # e.g. dictionary arrays with different dictionaries
                arrays.append(pa.concat_arrays([a.dictionary_decode() for a in parts]))
            del parts
        return pa.RecordBatch.from_arrays(arrays, names=names)

    def _read_range(self, splits: Sequence[Split], lo: int, hi: int) -> Iterator[pa.RecordBatch]:
        """Source record batches of stream rows [lo, hi), string columns already hashed."""
        hashing = any(p.kind in ("hash", "list_hash") for p in self.plans)
        memo = HashMemo() if hashing else None
        with contextlib.closing(self._decoded(slice_rows(splits, lo, hi))) as batches:
            for rb in batches:
                yield prehash(rb, self.plans, memo) if hashing else rb

    def _decoded(self, splits: Sequence[Split]) -> Generator[pa.RecordBatch, None, None]:
        """The source's record batches of ``splits``, decoded ``read_ahead`` batches ahead on a
        background thread; its errors (a ReadFailedError after the retries, a CorruptFileError)
        are raised here unchanged, after the batches before them."""

        def decode() -> Iterator[pa.RecordBatch]:
            for split in splits:
                yield from self._read_split(split)

        if self.options.read_ahead == 0 or not splits:
            return (rb for rb in decode())
        return background(decode, self.options.read_ahead, "kubeai-data-readahead")

    def _read_split(self, split: Split) -> Iterator[pa.RecordBatch]:
        """All rows of ``split``, retrying transient errors from the first row not received."""
        got = 0
        attempt = 0
        while True:
            try:
                for rb in self.source.read(split, self.columns, got):
                    if rb.num_rows > split.num_rows - got:
                        rb = rb.slice(0, split.num_rows - got)
                    got += rb.num_rows
                    if rb.num_rows:
                        yield rb
                if got != split.num_rows:
                    raise DataError(
                        f"{split.key}: rows [{split.start}, {split.stop}) returned {got} rows; "
                        "the source changed while reading"
                    )
                return
            except Exception as e:
                if not self.source.is_transient(e):
                    raise
                if attempt >= self._retry.retries:
                    raise ReadFailedError(
                        f"reading {split.key} rows [{split.start + got}, {split.stop}) ({dict(split.info)}) failed "
                        f"{attempt + 1} times, last with {type(e).__name__}: {e}; the dataset state still points at "
                        "the first undelivered row: fix the storage / network and resume from state_dict()",
                        path=split.key,
                        split=split.to_dict(),
                    ) from e
                log.warning(
                    "transient %s reading %s at row %d; retry %d/%d",
                    type(e).__name__,
                    split.key,
                    split.start + got,
                    attempt + 1,
                    self._retry.retries,
                )
                time.sleep(self._retry.delay(attempt))
                attempt += 1

    # -- adapters --------------------------------------------------------------------------------
    def output_spec(self) -> dict[str, np.dtype[Any]]:
        """Output name -> numpy dtype of every array a batch holds (lists add ``.offsets``)."""
        spec: dict[str, np.dtype[Any]] = {}
        for p in self.plans:
            spec[p.name] = p.dtype
            if p.kind.startswith("list_"):
                spec[p.outputs[1]] = np.dtype(np.int64)
        return spec

    def with_reader(self, reader: ReaderId) -> Dataset:
        """The same dataset read by another reader (e.g. one DataLoader worker), at epoch start."""
        ds = Dataset.__new__(Dataset)
        ds.__dict__.update(self.__dict__)
        ds.reader = reader
        ds._rows = 0
        ds._piece, ds._piece_rows, ds._epoch_done, ds._unacked = None, 0, False, []
        ds._delivered, ds._delivered_prev, ds._resumed = [], [], False
        return ds

    def to_tf(self, with_state: bool = False) -> Any:
        """A ``tf.data.Dataset`` of this rank's batches (see ``kubeai_train.data.adapters``).

        Args:
            with_state: make elements ``(batch, state)``, ``state`` being the JSON position
                after the batch (a scalar ``tf.string``), exact however much tf.data buffers
                ahead; resume with ``load_state_dict(data.state_from_tf(state))``.
        """
        return adapters.to_tf(self, with_state=with_state)

    def to_torch(self) -> Any:
        """A ``torch.utils.data.IterableDataset`` splitting this rank's share across workers."""
        if self.lazy:  # rank 0's DataLoader workers read; this process serves them from now on
            self.assignment.serve()  # type: ignore[attr-defined]
        return adapters.to_torch(self)
