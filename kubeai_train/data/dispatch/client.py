"""``DynamicAssignment``: readers ask the job's dispatcher for their next piece of an epoch.

Selected by ``data.read(..., assignment="dynamic")`` (or an instance, for its options). Every
reader (a rank, or each DataLoader worker of a rank: ``ReaderId`` rank.worker) asks the
dispatcher for the next piece when it needs rows, so a slow reader simply reads less and the
epoch ends within a small piece of the slowest reader's time (see ``core``).

The pipeline (``Dataset``) acknowledges a piece when the batch holding its last row is handed
to the trainer, so the dispatcher's *done* rows are exactly the rows the readers delivered, and
a reader's ``state_dict()`` holds the one piece it is partway through (and the rows of it
delivered). A restarted reader loading that state gets the piece back (``hello``) unless its
lease ran out and another reader took it meanwhile. The host's ``Dataset.state_dict()`` also
holds the dispatcher's state (done / in flight per epoch), so a job restarted from its chief's
checkpoint resumes the epoch where it was.

Used directly (not through ``Dataset``), :meth:`DynamicAssignment.assign` returns a lazy
iterator that acknowledges the previous piece when the reader asks for the next one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from kubeai_train.data.dispatch import server as srv
from kubeai_train.data.dispatch.core import Dispatcher, DispatchError, Piece
from kubeai_train.data.types import Assignment, ReaderId, Split, StateError, splits_fingerprint

__all__ = ["SERVE_GRACE", "DynamicAssignment", "reader_name"]

SERVE_GRACE = 2.0  # seconds the host waits for its state to be loaded before serving others
STATE_MAX_AGE = 0.5  # seconds a host's dispatcher state is reused (see state_dict)

log = logging.getLogger("kubeai_train.data.dispatch")


def reader_name(reader: ReaderId) -> str:
    """The dispatcher's id of a reader: ``"<rank>.<worker>"``."""
    return f"{reader.rank}.{reader.worker}"


@dataclasses.dataclass
class _Track:
    """What one reader holds and delivered, as this process saw it (to say hello again to a
    dispatcher restored under it)."""

    epoch: int = 0  # the latest epoch it asked pieces of
    outstanding: dict[Piece, int] = dataclasses.field(default_factory=dict)  # held -> its epoch
    delivered: dict[int, list[Piece]] = dataclasses.field(default_factory=dict)  # per epoch

    def since(self) -> tuple[int, list[Piece]]:
        """The oldest epoch on record and every piece delivered since (this one and the last)."""
        if not self.delivered:
            return self.epoch, []
        first = min(self.delivered)
        return first, [p for n in sorted(self.delivered) for p in self.delivered[n]]


class DynamicAssignment(Assignment):
    """Pieces of each epoch handed to whichever reader asks (see module doc).

    Args:
        address: ``host:port`` of the dispatcher; default: ``KUBEAI_TRAIN_DISPATCHER`` or the one
            derived from the cluster (``server.address``). The chief / rank 0 serves it.
        min_rows / k: guided piece sizing (``core.Dispatcher``); used by the host.
        lease: seconds after which a silent reader's pieces are handed to others (readers
            renew it every ``lease / 4`` while they iterate); used by the host.
        timeout: how long a reader keeps retrying an unreachable dispatcher before failing.
        poll: first wait (seconds) between requests while the epoch's last pieces are read
            by others.
    """

    lazy = True

    def __init__(
        self,
        address: str | None = None,
        *,
        min_rows: int = 1024,
        k: float = 2.0,
        lease: float = 60.0,
        timeout: float = 120.0,
        poll: float = 0.02,
    ) -> None:
        if address is not None:
            srv._split_hostport(address, "address")
        self.address = address
        self.min_rows, self.k, self.lease = min_rows, k, lease
        self.timeout, self.poll = float(timeout), float(poll)
        self._splits: list[Split] = []
        self._dataset: str | None = None
        self._url: str | None = None
        self._client: srv.Client | None = None
        self._host: Dispatcher | None = None
        self._active: set[str] = set()
        self._beat: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._acks: queue.Queue[tuple[ReaderId, Piece]] = queue.Queue()
        self._acker: threading.Thread | None = None
        self._unconfirmed: dict[str, list[Piece]] = {}
        self._inc: dict[str, str] = {}  # the dispatcher incarnation each reader said hello to
        self._track: dict[str, _Track] = {}
        self._state_cache: tuple[float, tuple[str, int, int], dict[str, Any]] | None = None

    # DataLoader workers get a copy without the host's dispatcher and threads: they talk HTTP
    def __getstate__(self) -> dict[str, Any]:
        s = dict(self.__dict__)
        s.update(_host=None, _active=set(), _beat=None, _lock=None, _acks=None, _acker=None, _unconfirmed={})
        s.update(_inc={}, _track={})
        s.pop("_server", None)
        s["_state_cache"] = None
        return s

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._acks = queue.Queue()

    # -- set-up ----------------------------------------------------------------------------------
    def attach(self, splits: Sequence[Split], reader: ReaderId, seed: int | None) -> None:
        """Bind to a dataset (its splits and shuffle seed); the host starts serving it."""
        splits = [s for s in splits if s.num_rows > 0]
        key = f"{splits_fingerprint(splits)}-{'none' if seed is None else int(seed)}"
        if self._dataset == key:
            return
        if self._dataset is not None:
            raise DispatchError(
                "this DynamicAssignment already serves another dataset; give each data.read its own "
                "(a new DynamicAssignment(...) or assignment='dynamic')"
            )
        self._splits, self._dataset = splits, key
        self._pid = os.getpid()
        if self.address is None and reader.rank == 0 and reader.worker == 0 and srv.is_host():
            # rank 0 of the chief process hosts; a new dataset opened there is a new reading
            # session, so it replaces a dispatcher of the same data left by an earlier one
            # served (registered) once this process restores its state or starts reading, or
            # SERVE_GRACE seconds after this (see serve): until then other readers are told
            # "not yet" and retry, so none of them takes pieces of a fresh epoch that the
            # checkpoint being restored has read
            server = srv.serve()
            self._host = Dispatcher(splits, seed, min_rows=self.min_rows, k=self.k, lease=self.lease)
            self._server, self._served = server, False
            server.unregister(key)  # not an earlier reading session's dispatcher meanwhile
            timer = threading.Timer(SERVE_GRACE, self.serve)
            timer.daemon = True
            timer.start()
            self._url = server.url
        elif self.address is not None:
            host, port = srv._split_hostport(self.address, "address")
            self._url = f"http://{host}:{port}"
        elif srv._SERVER is not None:  # another reader of this process hosts (readers as threads)
            self._url = srv._SERVER.url
        else:
            host, port = srv.address()
            if port == 0:
                raise DispatchError(
                    "no dispatcher to reach: rank 0 of this job serves it, and this process has no cluster "
                    f"environment to find it by; open rank 0's dataset first or set {srv.ADDRESS_ENV}=host:port"
                )
            self._url = f"http://{host}:{port}"
        self._client = srv.Client(self._url, timeout=self.timeout)

    def serve(self) -> None:
        """On the host: start answering other readers for this dataset (idempotent). Called
        when the host's reader restores its state or starts reading, hands its reading to
        DataLoader workers (``to_torch``), or ``SERVE_GRACE`` seconds after attaching."""
        host = self._host
        if host is None or os.getpid() != self._pid:
            return
        with self._lock:
            if not getattr(self, "_served", True):
                self._server.register(self._dataset or "", host, replace=True)
                self._served = True

    @property
    def url(self) -> str | None:
        """The dispatcher's URL once attached."""
        return self._url

    def _call(
        self, op: str, reader: ReaderId | None, _timeout: float | None = None, **body: Any
    ) -> dict[str, Any]:
        if self._client is None or self._dataset is None:
            raise DispatchError(
                "DynamicAssignment is not attached to a dataset (call attach or assign first)"
            )
        body["dataset"] = self._dataset
        if reader is not None:
            body["reader"] = reader_name(reader)
        while True:
            if self._host is not None and os.getpid() == self._pid:
                # the host's own readers skip HTTP: same dispatcher, same answers (not in a forked
                # DataLoader worker, whose copy of the dispatcher is not the one served)
                # (and the one this dataset made, even if a newer dataset of the same data replaced
                # it on the server: two datasets open at once on the host do not share rows)
                out = srv.handle(self._host, op, body)
            elif _timeout is not None:
                out = srv.Client(self._client.url, timeout=_timeout).call(op, body)
            else:
                out = self._client.call(op, body)
            if reader is None or op == "hello" or not self._check_incarnation(reader, out):
                return out
            # answered by a dispatcher this reader had not said hello to: ask again now that
            # it has (a piece it handed out before is back in its queue)

    def _check_incarnation(self, reader: ReaderId, out: Mapping[str, Any]) -> bool:
        """A dispatcher answering with another incarnation than the one this reader said hello
        to was restored meanwhile (the chief restarted and loaded its checkpoint): say hello
        again with the pieces this reader holds and those it delivered, which it reconciles."""
        name = reader_name(reader)
        inc = out.get("inc")
        with self._lock:
            seen = self._inc.get(name)
            if inc is None or seen is None or inc == seen:
                return False
            self._inc[name] = str(inc)
            t = self._track.get(name) or _Track()
            keep = list(t.outstanding) + self._unconfirmed.get(name, [])
            loop, delivered = t.since()
        log.warning(
            "reader %s: the dispatcher at %s was restored (its chief restarted); telling it the %d pieces "
            "this reader holds and the %d it delivered",
            name,
            self._url,
            len(keep),
            len(delivered),
        )
        self._call(
            "hello",
            reader,
            keep=[p.to_dict() for p in keep],
            delivered=[p.to_dict() for p in delivered],
            epoch=loop,
        )
        return True

    def split_of(self, piece: Piece) -> Split:
        """The (sub-)split a piece names, with its split's source ``info``."""
        if not 0 <= piece.split < len(self._splits):
            raise DispatchError(
                f"piece {piece.id} names split {piece.split}; this dataset has {len(self._splits)}"
            )
        return dataclasses.replace(self._splits[piece.split], start=piece.start, stop=piece.stop)

    # -- protocol --------------------------------------------------------------------------------
    def hello(
        self,
        reader: ReaderId,
        keep: Sequence[Piece] = (),
        delivered: Sequence[Piece] | None = None,
        epoch: int | None = None,
    ) -> list[bool]:
        """Start iterating: re-queue this reader's old pieces but ``keep``; which it keeps.

        ``delivered`` / ``epoch``: what a resumed reader's state says it delivered in its
        epoch, so that a dispatcher restored from the same checkpoint agrees with it
        (``Dispatcher.hello_many``)."""
        self._fork_check()
        self.serve()
        body: dict[str, Any] = {"keep": [p.to_dict() for p in keep]}
        name = reader_name(reader)
        with self._lock:
            t = self._track.setdefault(name, _Track())
            t.outstanding = {p: t.outstanding.get(p, p.epoch if epoch is None else int(epoch)) for p in keep}
            if delivered is not None and epoch is not None:
                body.update(delivered=[p.to_dict() for p in delivered], epoch=int(epoch))
                t.delivered = {int(epoch): list(delivered)}
        out = self._call("hello", reader, **body)
        with self._lock:
            if out.get("inc") is not None:
                self._inc[name] = str(out["inc"])
        self._start_beating(reader)
        return [bool(x) for x in out["ok"]]

    def leave(self, reader: ReaderId, keep: Sequence[Piece] = ()) -> None:
        """Stop iterating: acknowledgements are sent, pieces read ahead but not delivered go
        back to the queue."""
        self.flush(reader)
        with self._lock:
            self._active.discard(reader_name(reader))
            t = self._track.get(reader_name(reader))
            if t is not None:
                t.outstanding = {}
        try:
            # best effort and quick: at the end of a job the host may be gone already
            self._call("hello", reader, keep=[p.to_dict() for p in keep], _timeout=2.0)
        except DispatchError as e:  # leaving must not hide the error that ended the iteration
            log.warning("could not return unread pieces to the dispatcher: %s", e)

    # acknowledgements go out on a thread of their own, off the trainer's path; until one is
    # confirmed the piece is in unconfirmed(), which the reader's state_dict() carries
    def ack_later(self, reader: ReaderId, piece: Piece) -> None:
        """Acknowledge ``piece`` in the background (see :meth:`unconfirmed`)."""
        with self._lock:
            self._unconfirmed.setdefault(reader_name(reader), []).append(piece)
            self._delivered(reader, piece)
            if self._acker is None or not self._acker.is_alive():
                self._acker = threading.Thread(target=self._acking, name="kubeai-dispatch-acks", daemon=True)
                self._acker.start()
        self._acks.put((reader, piece))

    def unconfirmed(self, reader: ReaderId) -> list[Piece]:
        """Pieces delivered whose acknowledgement has not been confirmed yet."""
        with self._lock:
            return list(self._unconfirmed.get(reader_name(reader), ()))

    def flush(self, reader: ReaderId, timeout: float | None = None) -> None:
        """Wait until this reader's acknowledgements are confirmed (or failed)."""
        deadline = time.monotonic() + (self.timeout + 5.0 if timeout is None else timeout)
        while self.unconfirmed(reader) and time.monotonic() < deadline:
            if self._acker is None or not self._acker.is_alive():
                return
            time.sleep(0.002)

    def _acking(self) -> None:
        while True:
            reader, piece = self._acks.get()
            try:
                self.ack(reader, piece)
            except DispatchError as e:
                log.warning("could not acknowledge piece %s: %s", piece.id, e)
                continue  # it stays unconfirmed: a state taken now resumes with it
            with self._lock:
                mine = self._unconfirmed.get(reader_name(reader), [])
                if piece in mine:
                    mine.remove(piece)

    def _fork_check(self) -> None:
        if os.getpid() != self._pid:
            # a forked DataLoader worker: the parent's dispatcher, lock, threads and readers are
            # not ours (the parent's lock may even have been held at the fork)
            self._host, self._lock, self._active, self._beat = None, threading.Lock(), set(), None
            self._acks, self._acker, self._unconfirmed = queue.Queue(), None, {}
            self._inc, self._track = {}, {}
            self._pid = os.getpid()

    def pieces(self, reader: ReaderId, epoch: int) -> Iterator[Piece]:
        """The pieces ``reader`` reads in ``epoch``, asked for one at a time, until drained."""
        n = reader.world_size * reader.num_workers
        delay = self.poll
        name = reader_name(reader)
        with self._lock:
            t = self._track.setdefault(name, _Track())
            t.epoch = max(t.epoch, epoch)
        while True:
            out = self._call("request", reader, epoch=epoch, num_readers=n)
            status = out.get("status")
            if status == "piece":
                delay = self.poll
                p = Piece.from_dict(out["piece"])
                with self._lock:
                    self._track.setdefault(name, _Track()).outstanding[p] = epoch
                yield p
            elif status == "wait":
                time.sleep(delay)
                delay = min(0.5, delay * 1.5)
            elif status == "drained":
                return
            else:
                raise DispatchError(f"dispatcher at {self._url} answered {out!r} to a request")

    def _delivered(self, reader: ReaderId, piece: Piece) -> None:
        # (under self._lock) the piece moves from held to delivered in this reader's record
        t = self._track.setdefault(reader_name(reader), _Track())
        loop = t.outstanding.pop(piece, t.epoch)
        t.delivered.setdefault(loop, []).append(piece)
        for old in [n for n in t.delivered if n < t.epoch - 1]:
            del t.delivered[old]

    def ack(self, reader: ReaderId, piece: Piece) -> bool:
        """Every row of ``piece`` was delivered; False if it had been re-queued and taken by another."""
        with self._lock:
            t = self._track.get(reader_name(reader))
            if t is not None and piece in t.outstanding:  # not through ack_later
                self._delivered(reader, piece)
        ok = bool(self._call("ack", reader, piece=piece.to_dict())["ok"])
        if not ok:
            log.warning(
                "reader %s acknowledged piece %s after its lease ran out and another reader took it: "
                "its rows were read twice (raise the lease if readers stall that long)",
                reader_name(reader),
                piece.id,
            )
        return ok

    def stats(self, epoch: int) -> dict[str, Any]:
        """The dispatcher's per-reader statistics of ``epoch`` (rows, rows/s, pieces, tail)."""
        return self._call("stats", None, epoch=epoch)

    def _start_beating(self, reader: ReaderId) -> None:
        with self._lock:
            self._active.add(reader_name(reader))
            self._reader_ids = getattr(self, "_reader_ids", {})
            self._reader_ids[reader_name(reader)] = reader
            if self._beat is not None and self._beat.is_alive():
                return
            self._beat = threading.Thread(target=self._beating, name="kubeai-dispatch-lease", daemon=True)
            self._beat.start()

    def _beating(self) -> None:
        period = max(0.05, self.lease / 4)
        while True:
            time.sleep(period)
            with self._lock:
                readers = [self._reader_ids[r] for r in self._active]
            if not readers:
                return
            for r in readers:
                try:
                    self._call("heartbeat", r)
                except DispatchError as e:
                    log.warning("dispatcher heartbeat failed: %s", e)

    # -- Assignment ------------------------------------------------------------------------------
    def assign(
        self, splits: Sequence[Split], reader: ReaderId, epoch: int, seed: int | None
    ) -> Iterator[Split]:
        """A lazy iterator of pieces; the previous one is acknowledged when the next is asked for."""
        self.attach(splits, reader, seed)

        def gen() -> Iterator[Split]:
            self.hello(reader)
            prev: Piece | None = None
            try:
                for p in self.pieces(reader, epoch):
                    if prev is not None:
                        self.ack(reader, prev)
                    prev = None
                    yield self.split_of(p)
                    prev = p
                if prev is not None:
                    self.ack(reader, prev)
                    prev = None
            finally:
                self.leave(reader, [prev] if prev is not None else [])

        return gen()

    def state_dict(self) -> dict[str, Any]:
        """On the host: the dispatcher's state (done / in flight per epoch); elsewhere nothing.

        Taken at most every ``STATE_MAX_AGE`` seconds (a TF chief's position carries it with
        every batch; with thousands of splits it costs about a millisecond): an older
        dispatcher state than the readers' is reconciled exactly on restore (``core``)."""
        if self._host is None:
            return {}
        now = time.monotonic()
        cached, marks = self._state_cache, self._host.epochs_seen()
        # (never across an epoch boundary: a reader's state knows its last two epochs' pieces)
        if cached is None or now - cached[0] > STATE_MAX_AGE or cached[1] != marks:
            cached = (now, marks, {"dispatcher": self._host.state_dict()})
            self._state_cache = cached
        return dict(cached[2])

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """On the host, restore the dispatcher's state (in-flight pieces stay reserved for their readers for one lease)."""
        st = state.get("dispatcher") if isinstance(state, Mapping) else None
        if st is None:
            return
        if self._host is None:
            if self._dataset is None:
                raise StateError("load the dispatcher's state after attaching to the dataset")
            return  # a state taken on the host, loaded elsewhere: the host restores it
        if getattr(self, "_served", False) and self._host.busy(lambda r: r.startswith("0.")):
            log.warning(
                "restoring the dispatcher's state after other readers started reading: they may read "
                "rows twice; load rank 0's state within %.0f s of data.read, before the others read",
                SERVE_GRACE,
            )
        self._host.load_state_dict(st)
        self._state_cache = None
        self.serve()
