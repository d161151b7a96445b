"""The dispatcher's state machine: which rows of an epoch are pending, in flight and done.

Pure and thread-safe, no network (``server.py`` wraps it in HTTP). Per epoch the splits are
laid out in the (seed, epoch) order of ``assignment.order`` (the static assignment's order);
readers call :meth:`Dispatcher.request` for their next *piece* (a split, or a row range of
one), read it, and :meth:`Dispatcher.ack` it once every row of it reached their consumer.

Piece sizes are *guided*: a piece is ``max(min_rows, pending_rows / (k * num_readers))`` rows
(never more than the interval at the head of the queue), so pieces are whole splits while
much of the epoch is pending and shrink as it drains; the last piece the slowest reader takes
is then a small fraction of a split, which bounds the epoch tail.

Exactly once: a row is *done* only when the piece holding it is acknowledged. A reader that
stops renewing its lease (``lease`` seconds without a call) or is :meth:`release` d has its
in-flight pieces put back at the head of the queue, to be handed out again. A restarted reader
that resumes a piece from its own checkpoint gets it back with :meth:`hello` (``keep``) if no
other reader has taken it meanwhile; after a restore, each reader's in-flight pieces are kept
for it for one lease, so that a job restarted as a whole resumes without a race.

End of an epoch: with nothing pending, a reader is told the epoch is *drained* for it, even
while other readers still hold pieces: a live reader finishes its own pieces, and a reader that
waited for them could wait forever, since their holder may itself be waiting on it (DataLoader
workers are consumed in turn, DDP ranks meet in every all-reduce). It is told to *wait* only
while a holder looks dead (silent for half a lease: live readers call at least every quarter
lease) or is a restored reader not heard from since (its pieces come back to the queue when the
lease runs out, or it takes them back with :meth:`hello`). Pieces re-queued after the other
readers moved on are handed out first to requests for later epochs (a piece names its epoch),
so they are still read exactly once in the job.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubeai_train.data.assignment import order
from kubeai_train.data.types import DataError, Split, StateError, splits_fingerprint

__all__ = ["DispatchError", "Dispatcher", "Piece", "ReaderStats"]

STATE_VERSION = 2  # 1: done rows merged, without their readers (still loaded)
log = logging.getLogger("kubeai_train.data.dispatch")


class DispatchError(DataError):
    """A dispatcher cannot be reached, or refused a request (the message says which and why)."""


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of split number ``split`` (in the source's order) in ``epoch``."""

    epoch: int
    split: int
    start: int
    stop: int

    @property
    def id(self) -> str:
        return f"{self.epoch}:{self.split}:{self.start}:{self.stop}"

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "split": self.split, "start": self.start, "stop": self.stop}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Piece:
        try:
            return cls(int(d["epoch"]), int(d["split"]), int(d["start"]), int(d["stop"]))
        except (KeyError, TypeError, ValueError) as e:
            raise DispatchError(f"not a piece: {dict(d)!r} ({e})") from None

    @classmethod
    def parse(cls, pid: str) -> Piece:
        try:
            e, s, a, b = (int(x) for x in pid.split(":"))
        except ValueError:
            raise DispatchError(f"not a piece id: {pid!r} (expected epoch:split:start:stop)") from None
        return cls(e, s, a, b)


@dataclass
class ReaderStats:
    """What one reader did in one epoch (rows and pieces acknowledged, timing)."""

    rows: int = 0
    pieces: int = 0
    first: float | None = None  # first request
    last_ack: float | None = None
    tail: float = 0.0  # seconds from the moment nothing was pending to this reader's last ack

    def to_dict(self) -> dict[str, Any]:
        busy = (self.last_ack - self.first) if (self.first is not None and self.last_ack is not None) else 0.0
        return {
            "rows": self.rows,
            "pieces": self.pieces,
            "seconds": round(busy, 6),
            "rows_per_s": round(self.rows / busy, 3) if busy > 0 else None,
            "tail_s": round(self.tail, 6),
        }


@dataclass
class _Epoch:
    # (split, start, stop, whole) in hand-out order; ``whole``: a re-queued piece, handed out
    # again as it was (same bounds, so the same rows in the same order whoever reads it)
    pending: deque[tuple[int, int, int, bool]]
    inflight: dict[Piece, str] = field(default_factory=dict)  # piece -> reader
    # the reader's epoch when it took a piece (a re-queued piece of an earlier epoch is read
    # in a later one): in flight, and for done pieces with who acknowledged them
    loops: dict[Piece, int] = field(default_factory=dict)
    owners: dict[Piece, tuple[str, int]] = field(default_factory=dict)
    done: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    done_rows: int = 0
    total_rows: int = 0
    drained_at: float | None = None  # first moment nothing was pending
    stats: dict[str, ReaderStats] = field(default_factory=dict)

    @property
    def pending_rows(self) -> int:
        return sum(b - a for _, a, b, _w in self.pending)

    @property
    def complete(self) -> bool:
        return self.done_rows == self.total_rows


def _merge(iv: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(iv):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


class Dispatcher:
    """Hands out the rows of each epoch to whichever reader asks (see module doc).

    Args:
        splits: every split of the dataset, in the source's order (what every reader sees).
        seed: ``None`` for the natural split order, else the order is drawn from (seed, epoch).
        min_rows: the smallest piece cut from a split (a smaller interval is handed out whole).
        k: guided-sizing factor: a piece is ``pending_rows / (k * num_readers)`` rows at most.
        lease: seconds without any call after which a reader is dead and its pieces re-queued.
        clock: monotonic clock (injectable for tests).
    """

    def __init__(
        self,
        splits: Sequence[Split],
        seed: int | None = None,
        *,
        min_rows: int = 1024,
        k: float = 2.0,
        lease: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(min_rows, int) or min_rows < 1:
            raise ValueError(f"min_rows must be an integer >= 1, got {min_rows!r}")
        if not k > 0:
            raise ValueError(f"k must be > 0, got {k!r}")
        if not lease > 0:
            raise ValueError(f"lease must be > 0 seconds, got {lease!r}")
        self.splits = [s for s in splits if s.num_rows > 0]
        self.fingerprint = splits_fingerprint(self.splits)
        self.seed = seed
        self.min_rows, self.k, self.lease = min_rows, float(k), float(lease)
        self._clock = clock
        self._lock = threading.Lock()
        self._epochs: dict[int, _Epoch] = {}
        self._complete: set[int] = set()
        self._seen: dict[str, float] = {}
        self._restored: set[str] = set()  # readers of a loaded state not heard from since
        self._greeted: set[str] = set()  # readers that said hello to this incarnation
        # changes when the state is loaded: a reader that said hello before (to the dispatcher
        # of a chief that has since restarted) says hello again with what it holds
        self.incarnation = uuid.uuid4().hex[:12]
        self._hold_until: float | None = None  # after a restore, see request
        self._index = {id(s): i for i, s in enumerate(self.splits)}
        self._total = sum(s.num_rows for s in self.splits)

    # -- epochs ----------------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[int]:
        idx = list(range(len(self.splits)))
        if self.seed is None:
            return idx
        # the same permutation as the static assignment's order() (drawn over split positions)
        picked = order(self.splits, epoch, self.seed)
        return [self._index[id(s)] for s in picked]

    def _epoch(self, epoch: int) -> _Epoch:
        e = self._epochs.get(epoch)
        if e is None:
            if epoch in self._complete:
                e = _Epoch(pending=deque(), done_rows=self._total, total_rows=self._total)
            else:
                pend = deque(
                    (i, self.splits[i].start, self.splits[i].stop, False) for i in self._order(epoch)
                )
                e = _Epoch(pending=pend, total_rows=self._total)
            self._epochs[epoch] = e
        return e

    def _finish(self, epoch: int) -> None:
        """Forget the details of a complete epoch (its statistics stay until the next one)."""
        e = self._epochs[epoch]
        for r, st in sorted(e.stats.items()):
            d = st.to_dict()
            log.info(
                "dispatch epoch %d reader %s: %d rows in %d pieces, %s rows/s, tail %.3fs",
                epoch,
                r,
                d["rows"],
                d["pieces"],
                d["rows_per_s"],
                d["tail_s"],
            )
        self._complete.add(epoch)
        for old in [n for n in self._epochs if n < epoch - 1 and n in self._complete]:
            del self._epochs[old]

    # -- leases ----------------------------------------------------------------------------------
    def _touch(self, reader: str) -> float:
        now = self._clock()
        self._seen[reader] = now
        self._restored.discard(reader)
        self._expire(now)
        return now

    def _expire(self, now: float) -> None:
        dead = [r for r, t in self._seen.items() if now - t > self.lease]
        for r in dead:
            self._release(r)
            del self._seen[r]
            self._restored.discard(r)

    def _release(self, reader: str, keep: set[Piece] | frozenset[Piece] = frozenset()) -> int:
        n = 0
        for e in self._epochs.values():
            mine = [p for p, r in e.inflight.items() if r == reader and p not in keep]
            # back at the head, in their hand-out order (the dict keeps it), so they go out next
            for p in reversed(mine):
                del e.inflight[p]
                e.loops.pop(p, None)
                e.pending.appendleft((p.split, p.start, p.stop, True))
                n += 1
        return n

    # -- protocol --------------------------------------------------------------------------------
    def hello(self, reader: str, keep: Piece | None = None) -> bool:
        """A reader (re)starts: its in-flight pieces but ``keep`` go back to the queue.

        Returns whether ``keep`` (a piece its checkpoint says it is partway through) is now
        in flight for it: already was, or was pending and is taken back. False means another
        reader has it or it is done: drop it (its delivered rows may be read twice).
        """
        if keep is None:
            self.hello_many(reader, [])
            return True
        return self.hello_many(reader, [keep])[0]

    def hello_many(
        self,
        reader: str,
        keep: Sequence[Piece],
        delivered: Sequence[Piece] | None = None,
        epoch: int | None = None,
    ) -> list[bool]:
        """:meth:`hello` keeping several pieces (the one partway through, and the delivered
        ones whose acknowledgement the reader's checkpoint does not know arrived).

        ``delivered`` / ``epoch``: the pieces the reader's state says it delivered in its epoch
        ``epoch``. On a restored reader's first call they reconcile the two states, whichever
        was taken first (see :meth:`_reconcile`).
        """
        with self._lock:
            first = reader not in self._greeted
            self._greeted.add(reader)
            self._touch(reader)
            if first and delivered is not None and epoch is not None:
                self._reconcile(reader, int(epoch), list(delivered))
            self._release(reader, set(keep))
            return [self._claim(reader, p, epoch) for p in keep]

    def _reconcile(self, reader: str, epoch: int, delivered: list[Piece]) -> None:
        """Make this dispatcher's state agree with a reader's state from the same checkpoint
        (or with a live reader's, when this dispatcher was restored under it).

        A job's checkpoint holds the dispatcher's state and each reader's, taken at slightly
        different moments (asynchronous training has no common step). Pieces the reader
        acknowledged after its own state was taken (taken in its epoch ``epoch`` or later and
        not in ``delivered``) were not delivered as far as its state goes: they are pending
        again. Pieces in ``delivered`` that are not done here (acknowledged after the
        dispatcher's state was taken) are done, unless a live reader holds them.
        """
        listed = set(delivered)
        for n, e in list(self._epochs.items()):
            for p, (owner, loop) in list(e.owners.items()):
                if owner == reader and loop >= epoch and p not in listed:
                    self._undo(n, e, p)
        for p in delivered:
            e = self._epoch(p.epoch)
            if p in e.owners:
                continue
            holder = e.inflight.get(p)
            if holder is None:
                if not self._claim(reader, p, epoch):
                    continue  # done before, or partly in flight elsewhere
            elif holder != reader and holder not in self._restored:
                continue  # a live reader is reading it
            del e.inflight[p]
            e.loops.pop(p, None)
            self._mark_done(p.epoch, e, p, reader, epoch)

    def _undo(self, n: int, e: _Epoch, p: Piece) -> None:
        e.owners.pop(p)
        e.done[p.split].remove((p.start, p.stop))
        e.done_rows -= p.num_rows
        e.pending.appendleft((p.split, p.start, p.stop, True))
        self._complete.discard(n)

    def _mark_done(self, n: int, e: _Epoch, p: Piece, reader: str, loop: int) -> None:
        e.done.setdefault(p.split, []).append((p.start, p.stop))
        e.done_rows += p.num_rows
        e.owners[p] = (reader, loop)
        if e.complete and n not in self._complete:
            self._finish(n)

    def _claim(self, reader: str, p: Piece, loop: int | None = None) -> bool:
        e = self._epoch(p.epoch)
        owner = e.inflight.get(p)
        if owner is not None:
            return owner == reader
        for n, (i, a, b, whole) in enumerate(e.pending):
            if i == p.split and a <= p.start and p.stop <= b:
                del e.pending[n]
                # the rest of the interval goes back where it was
                if p.stop < b:
                    e.pending.insert(n, (i, p.stop, b, whole))
                if a < p.start:
                    e.pending.insert(n, (i, a, p.start, whole))
                e.inflight[p] = reader
                e.loops[p] = p.epoch if loop is None else loop
                return True
        return False

    def request(self, reader: str, epoch: int, num_readers: int) -> Piece | str:
        """The next piece for ``reader`` in ``epoch``, or ``"wait"`` / ``"drained"``.

        Args:
            reader: the reader's id (e.g. ``"3.1"`` for rank 3, DataLoader worker 1).
            epoch: the epoch it reads.
            num_readers: how many readers the job has (rank count x DataLoader workers), for
                the guided piece size.
        """
        if not isinstance(epoch, int) or epoch < 0:
            raise DispatchError(f"epoch must be an integer >= 0, got {epoch!r}")
        with self._lock:
            now = self._touch(reader)
            e = self._epoch(epoch)
            st = e.stats.setdefault(reader, ReaderStats())
            if st.first is None:
                st.first = now
            if self._hold_until is not None:
                # after a restore, readers that lived on (the chief restarted under them) may
                # hold pending pieces: none is handed out until every reader said hello again
                # (each does at its next call, within a quarter lease) or a third of a lease
                if len(self._greeted) < num_readers and now < self._hold_until:
                    if any(x.pending for n, x in self._epochs.items() if n <= epoch):
                        return "wait"
                else:
                    self._hold_until = None
            # pieces of earlier epochs re-queued after their readers moved on go first
            for n in sorted(k for k in self._epochs if k < epoch and self._epochs[k].pending):
                return self._hand_out(self._epochs[n], n, reader, num_readers, now, epoch)
            if e.pending:
                return self._hand_out(e, epoch, reader, num_readers, now, epoch)
            if e.drained_at is None:
                e.drained_at = now
            suspect = now - self.lease / 2
            for n, old in self._epochs.items():
                if n <= epoch:
                    for r in old.inflight.values():
                        if r != reader and (r in self._restored or self._seen.get(r, now) < suspect):
                            return "wait"
            return "drained"

    def _hand_out(self, e: _Epoch, epoch: int, reader: str, num_readers: int, now: float, loop: int) -> Piece:
        i, a, b, whole = e.pending[0]
        size = max(self.min_rows, -(-e.pending_rows // max(1, int(self.k * max(1, num_readers)))))
        if whole or size >= b - a:
            e.pending.popleft()
            p = Piece(epoch, i, a, b)
        else:
            e.pending[0] = (i, a + size, b, False)
            p = Piece(epoch, i, a, a + size)
        e.inflight[p] = reader
        e.loops[p] = loop
        if not e.pending and e.drained_at is None:
            e.drained_at = now
        return p

    def ack(self, reader: str, piece: Piece) -> bool:
        """Every row of ``piece`` reached ``reader``'s consumer: the rows are done.

        Returns False when the piece is not ``reader``'s any more (it was re-queued after its
        lease expired and is in flight for another reader, or done): the rows were read twice.
        A re-queued piece still pending is taken back and counted done.
        """
        with self._lock:
            now = self._touch(reader)
            e = self._epoch(piece.epoch)
            owner = e.inflight.get(piece)
            if owner is None and e.owners.get(piece, ("",))[0] == reader:
                return True  # acknowledged twice (again after a restore reconciled it)
            if owner != reader and (owner is not None or not self._claim(reader, piece)):
                return False
            del e.inflight[piece]
            loop = e.loops.pop(piece, piece.epoch)
            e.done.setdefault(piece.split, []).append((piece.start, piece.stop))
            e.done_rows += piece.num_rows
            e.owners[piece] = (reader, loop)
            st = e.stats.setdefault(reader, ReaderStats(first=now))
            st.rows += piece.num_rows
            st.pieces += 1
            st.last_ack = now
            if e.drained_at is not None:
                st.tail = max(0.0, now - e.drained_at)
            if e.complete and piece.epoch not in self._complete:
                self._finish(piece.epoch)
            return True

    def heartbeat(self, reader: str) -> None:
        """Renew ``reader``'s lease (a reader busy with a long piece calls this)."""
        with self._lock:
            self._touch(reader)

    def release(self, reader: str) -> int:
        """Declare ``reader`` gone: its in-flight pieces are re-queued. Returns how many."""
        with self._lock:
            n = self._release(reader)
            self._seen.pop(reader, None)
            return n

    def expire(self) -> None:
        """Re-queue the pieces of readers whose lease ran out (also done on every call)."""
        with self._lock:
            self._expire(self._clock())

    def busy(self, ignore: Callable[[str], bool] = lambda r: False) -> bool:
        """Whether a reader whose lease is running holds pieces (its acks are still to come),
        readers for which ``ignore`` says True aside."""
        with self._lock:
            self._expire(self._clock())
            return any(not ignore(r) for e in self._epochs.values() for r in e.inflight.values())

    # -- inspection ------------------------------------------------------------------------------
    def epochs_seen(self) -> tuple[str, int, int]:
        """(incarnation, highest epoch asked for, epochs complete): changes at every epoch boundary."""
        with self._lock:
            return self.incarnation, max(self._epochs, default=-1), len(self._complete)

    def stats(self, epoch: int) -> dict[str, Any]:
        """Per-reader statistics of ``epoch`` plus totals (JSON-serialisable)."""
        with self._lock:
            e = self._epochs.get(epoch)
            if e is None:
                return {"epoch": epoch, "complete": epoch in self._complete, "readers": {}}
            return {
                "epoch": epoch,
                "complete": e.complete,
                "done_rows": e.done_rows,
                "total_rows": e.total_rows,
                "pending_rows": e.pending_rows,
                "inflight": len(e.inflight),
                "readers": {r: s.to_dict() for r, s in sorted(e.stats.items())},
            }

    def done_intervals(self, epoch: int) -> dict[int, list[tuple[int, int]]]:
        """Acknowledged rows of ``epoch`` per split number, merged (for checks and state)."""
        with self._lock:
            e = self._epochs.get(epoch)
            if e is None:
                if epoch in self._complete:
                    return {i: [(s.start, s.stop)] for i, s in enumerate(self.splits)}
                return {}
            return {i: _merge(iv) for i, iv in sorted(e.done.items())}

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Done and in-flight rows per epoch, bound to the splits' fingerprint (JSON)."""
        with self._lock:
            epochs: dict[str, Any] = {}
            for n, e in sorted(self._epochs.items()):
                # done pieces one by one with their readers (also of the epoch completed last:
                # a reader's older state may undo its last acknowledgements, see _reconcile)
                unowned = [
                    [i, a, b, "", n]
                    for i, iv in sorted(e.done.items())
                    for a, b in iv
                    if Piece(n, i, a, b) not in e.owners
                ]
                epochs[str(n)] = {
                    "complete": n in self._complete,
                    "done": unowned
                    + [[p.split, p.start, p.stop, r, loop] for p, (r, loop) in e.owners.items()],
                    "inflight": [
                        [p.split, p.start, p.stop, r, e.loops.get(p, n)] for p, r in e.inflight.items()
                    ],
                }
            return {
                "version": STATE_VERSION,
                "fingerprint": self.fingerprint,
                "seed": self.seed,
                "complete": sorted(self._complete),
                "epochs": epochs,
            }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`: done rows stay done; in-flight pieces stay reserved for
        their readers for one lease (a restarted reader resuming its piece gets it back, see
        :meth:`hello`) and are re-queued after it, like any silent reader's.

        Raises:
            StateError: the state is of another dataset (fingerprint), seed or version.
        """
        if not isinstance(state, Mapping) or state.get("version") not in (1, STATE_VERSION):
            raise StateError(f"not a dispatcher state (version {STATE_VERSION}): {str(state)[:200]}")
        if state.get("fingerprint") != self.fingerprint:
            raise StateError(
                f"dispatcher state is of other splits (fingerprint {state.get('fingerprint')!r}, here "
                f"{self.fingerprint!r}); resume with the same source"
            )
        if state.get("seed") != self.seed:
            raise StateError(
                f"dispatcher state was taken with seed={state.get('seed')!r}, here {self.seed!r}; "
                "resume with the same shuffle and seed"
            )
        with self._lock:
            now = self._clock()
            self._epochs.clear()
            self._seen.clear()
            self._restored.clear()
            self._greeted.clear()
            self.incarnation = uuid.uuid4().hex[:12]
            self._hold_until = now + self.lease / 3
            self._complete = {int(n) for n in state.get("complete") or ()}
            for key, es in (state.get("epochs") or {}).items():
                n = int(key)
                if es.get("complete"):
                    self._complete.add(n)
                    if "done" not in es:
                        continue
                done: dict[int, list[tuple[int, int]]] = {}
                owners: dict[Piece, tuple[str, int]] = {}
                for i, a, b, *who in es.get("done") or ():
                    done.setdefault(int(i), []).append((int(a), int(b)))
                    if who and who[0]:
                        owners[Piece(n, int(i), int(a), int(b))] = (str(who[0]), int(who[1]))
                inflight: dict[Piece, str] = {}
                loops: dict[Piece, int] = {}
                for i, a, b, r, *loop in es.get("inflight") or ():
                    p = Piece(n, int(i), int(a), int(b))
                    inflight[p] = str(r)
                    loops[p] = int(loop[0]) if loop else n
                    self._seen[str(r)] = now
                    self._restored.add(str(r))
                for who, _loop in owners.values():
                    # a reader that acknowledged pieces of an open epoch may undo them (its state
                    # may be older than this one): it is heard from first, like one holding pieces
                    self._restored.add(who)
                    self._seen.setdefault(who, now)
                taken: dict[int, list[tuple[int, int]]] = {i: list(iv) for i, iv in done.items()}
                for p in inflight:
                    taken.setdefault(p.split, []).append((p.start, p.stop))
                pend: deque[tuple[int, int, int, bool]] = deque()
                done_rows = sum(b - a for iv in done.values() for a, b in iv)
                for i in self._order(n):
                    s = self.splits[i]
                    pos = s.start
                    for a, b in _merge(taken.get(i, [])):
                        if not (s.start <= a <= b <= s.stop):
                            raise StateError(f"dispatcher state has rows [{a}, {b}) outside split {i} {s!r}")
                        if a > pos:
                            pend.append((i, pos, a, False))
                        pos = max(pos, b)
                    if pos < s.stop:
                        pend.append((i, pos, s.stop, False))
                self._epochs[n] = _Epoch(
                    pending=pend,
                    inflight=inflight,
                    loops=loops,
                    owners=owners,
                    done=done,
                    done_rows=done_rows,
                    total_rows=self._total,
                )
