"""The dispatcher state machine: guided pieces, exactly-once under death / release / restore."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kubeai_train.data.assignment import order
from kubeai_train.data.dispatch.core import Dispatcher, Piece
from kubeai_train.data.types import Split, StateError


def make_splits(sizes: list[int]) -> list[Split]:
    return [Split(f"f{i}", 100, 100 + n, {"path": f"f{i}"}) for i, n in enumerate(sizes)]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def rows_of(d: Dispatcher, epoch: int) -> list[tuple[int, int]]:
    out = []
    for i, iv in d.done_intervals(epoch).items():
        for a, b in iv:
            out.extend((i, r) for r in range(a, b))
    return sorted(out)


def all_rows(splits: list[Split]) -> list[tuple[int, int]]:
    return sorted((i, r) for i, s in enumerate(splits) for r in range(s.start, s.stop))


def test_whole_splits_first_then_guided_smaller_pieces() -> None:
    splits = make_splits([1000] * 20)
    d = Dispatcher(splits, seed=None, min_rows=10, k=2)
    sizes = []
    while True:
        p = d.request("0.0", 0, 4)
        if isinstance(p, str):
            break
        sizes.append(p.num_rows)
        assert d.ack("0.0", p)
    assert sizes[:5] == [1000] * 5  # pending/(k*N) >= a split early on
    assert sizes[-1] <= 10 + 1 and min(sizes) >= 1
    # guided: a piece is at most max(min_rows, pending / (k * readers)) rows
    for n, size in enumerate(sizes):
        pending = 20000 - sum(sizes[:n])
        assert size <= max(10, -(-pending // 8)), (n, size, pending)
    assert sum(sizes) == 20000 and rows_of(d, 0) == all_rows(splits)
    assert d.stats(0)["complete"] is True


def test_order_is_the_static_assignments_seed_epoch_order() -> None:
    splits = make_splits([10] * 30)
    d = Dispatcher(splits, seed=7, min_rows=1000)
    got = []
    for _ in range(30):
        p = d.request("a", 3, 1)
        assert isinstance(p, Piece)
        got.append(splits[p.split])
    assert got == order(splits, 3, 7)
    assert got != order(splits, 4, 7)


def test_drained_while_a_live_reader_holds_the_last_pieces() -> None:
    # b must not wait for a's piece: a may itself wait on b (DataLoader workers are consumed in
    # turn, DDP ranks meet in every all-reduce), and a live reader finishes its own pieces
    d = Dispatcher(make_splits([10, 10]), min_rows=100)
    pa, pb = d.request("a", 0, 2), d.request("b", 0, 2)
    assert isinstance(pa, Piece) and isinstance(pb, Piece)
    assert d.request("a", 0, 2) == "drained"
    assert d.request("b", 0, 2) == "drained"
    assert d.ack("a", pa) and d.ack("b", pb)
    assert sorted(rows_of(d, 0)) == all_rows(make_splits([10, 10])) or 0 in d.state_dict()["complete"]


def test_wait_while_a_holder_looks_dead_then_its_pieces_come_back() -> None:
    clock = Clock()
    d = Dispatcher(make_splits([10, 10]), min_rows=100, lease=4.0, clock=clock)
    pa = d.request("a", 0, 2)
    pb = d.request("b", 0, 2)
    assert isinstance(pa, Piece) and isinstance(pb, Piece)
    clock.t = 1.0
    assert d.request("b", 0, 2) == "drained"  # a was heard from 1 s ago: alive
    clock.t = 2.5
    assert d.request("b", 0, 2) == "wait"  # a silent for over half a lease: maybe dead
    clock.t = 3.0
    d.heartbeat("a")  # it was only slow: alive again
    assert d.request("b", 0, 2) == "drained"
    clock.t = 7.5  # a silent for 4.5 s > lease: its piece is re-queued and b takes it
    assert d.request("b", 0, 2) == pa


def test_a_dead_readers_pieces_go_to_a_later_epochs_requests() -> None:
    # b dies holding a piece after a drained epoch 0: the piece is read in a's epoch 1 requests
    clock = Clock()
    splits = make_splits([10, 10])
    d = Dispatcher(splits, min_rows=100, lease=4.0, clock=clock)
    pa, pb = d.request("a", 0, 2), d.request("b", 0, 2)
    assert isinstance(pa, Piece) and isinstance(pb, Piece)
    assert d.ack("a", pa) and d.request("a", 0, 2) == "drained"
    clock.t = 5.0
    late = d.request("a", 1, 2)
    assert late == pb  # epoch 0's piece, handed out first
    assert d.ack("a", late)
    assert 0 in d.state_dict()["complete"]
    p = d.request("a", 1, 2)
    assert isinstance(p, Piece) and p.epoch == 1


def test_lease_expiry_requeues_and_a_stale_ack_is_refused() -> None:
    clock = Clock()
    d = Dispatcher(make_splits([10, 10]), min_rows=100, lease=5.0, clock=clock)
    pa = d.request("a", 0, 2)
    assert isinstance(pa, Piece)
    clock.t = 3.0
    pb = d.request("b", 0, 2)
    assert isinstance(pb, Piece)
    assert d.request("b", 0, 2) == "wait"  # a silent for 3 s (over half its lease): maybe dead
    clock.t = 7.0  # a silent for 7 s > lease
    again = d.request("b", 0, 2)
    assert again == pa
    assert d.ack("b", again) and d.ack("b", pb)
    assert not d.ack("a", pa)  # a came back too late: b already read those rows
    assert rows_of(d, 0) == all_rows(make_splits([10, 10]))


def test_ack_of_a_requeued_piece_still_pending_takes_it_back() -> None:
    d = Dispatcher(make_splits([10, 10]), min_rows=100)
    p = d.request("a", 0, 1)
    assert isinstance(p, Piece)
    assert d.release("a") == 1
    assert d.ack("a", p)  # nobody took it meanwhile: done once
    q = d.request("b", 0, 1)
    assert isinstance(q, Piece) and q.split != p.split


def test_hello_keeps_the_resumed_piece_and_requeues_the_rest() -> None:
    d = Dispatcher(make_splits([10, 10, 10]), min_rows=100)
    p1, p2 = d.request("a", 0, 1), d.request("a", 0, 1)
    assert isinstance(p1, Piece) and isinstance(p2, Piece)
    assert d.hello("a", keep=p1)
    assert d.request("b", 0, 2) == p2  # a's prefetched piece went back first
    # a piece re-queued and still pending is claimed back out of a merged interval
    assert d.release("a") == 1
    assert d.hello("a", keep=Piece(0, p1.split, p1.start + 2, p1.stop - 2))
    st = d.state_dict()
    assert st["epochs"]["0"]["inflight"]


@pytest.mark.parametrize("comes_back", [True, False])
def test_state_restore_keeps_inflight_for_its_reader_for_one_lease(comes_back: bool) -> None:
    splits = make_splits([50, 50, 50])
    clock = Clock()
    d = Dispatcher(splits, seed=1, min_rows=7, k=1, lease=5.0, clock=clock)
    done = d.request("a", 0, 2)
    held = d.request("b", 0, 2)
    assert isinstance(done, Piece) and isinstance(held, Piece)
    d.ack("a", done)
    state = json.loads(json.dumps(d.state_dict()))
    d2 = Dispatcher(splits, seed=1, min_rows=7, k=1, lease=5.0, clock=clock)
    d2.load_state_dict(state)
    d2.hello("c")  # every reader says hello first (pieces are held back until all have)
    while True:
        p = d2.request("c", 0, 1)
        if isinstance(p, str):
            break
        assert p.split != held.split or p.stop <= held.start or p.start >= held.stop  # reserved for b
        d2.ack("c", p)
    assert p == "wait"  # b holds a piece and may come back
    if comes_back:
        assert d2.hello("b", keep=held) and d2.ack("b", held)
    else:
        clock.t += 6.0
        again = d2.request("c", 0, 1)
        assert again == held
        d2.ack("c", again)
    assert d2.request("c", 0, 1) == "drained"
    assert sorted(rows_of(d2, 0)) == all_rows(splits)
    with pytest.raises(StateError, match="fingerprint"):
        Dispatcher(make_splits([50, 50]), seed=1).load_state_dict(state)
    with pytest.raises(StateError, match="seed"):
        Dispatcher(splits, seed=2).load_state_dict(state)


def test_stats_per_reader() -> None:
    clock = Clock()
    d = Dispatcher(make_splits([100] * 4), min_rows=10, clock=clock)
    for t, r in ((0.0, "fast"), (0.0, "slow")):
        clock.t = t
        p = d.request(r, 0, 2)
        assert isinstance(p, Piece)
        clock.t += 1.0 if r == "fast" else 4.0
        d.ack(r, p)
    s = d.stats(0)["readers"]
    assert s["fast"]["rows"] == 100 and s["fast"]["pieces"] == 1 and s["fast"]["rows_per_s"] == 100.0
    assert s["slow"]["rows_per_s"] == s["slow"]["rows"] / 4.0 and s["slow"]["seconds"] == 4.0


# -------------------------------------------------------------------------------------------
# random interleavings: every row acknowledged exactly once per epoch


def finish_epoch(d: Dispatcher, clock: Clock, epoch: int, take: Callable[[Piece], None]) -> None:
    """One more reader ("final") reads what is left of ``epoch``; quiet holders' leases run out."""
    for _ in range(10_000):
        p = d.request("final", epoch, 4)
        if not isinstance(p, str):
            take(p)
        elif p == "drained":
            return
        else:
            clock.t += 11.0  # a quiet reader's pieces come back after its lease (10 s)
    raise AssertionError(f"epoch {epoch} never drained")


OPS = st.lists(
    st.tuples(
        st.sampled_from(["request", "ack", "die", "hello", "restore", "tick"]),
        st.integers(0, 3),  # reader
        st.integers(0, 1),  # epoch
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    ops=OPS,
    seed=st.one_of(st.none(), st.integers(0, 5)),
    min_rows=st.integers(1, 16),
)
def test_random_interleavings_ack_every_row_exactly_once(sizes, ops, seed, min_rows) -> None:
    splits = make_splits(sizes)
    clock = Clock()
    d = Dispatcher(splits, seed=seed, min_rows=min_rows, k=2, lease=10.0, clock=clock)
    held: dict[str, list[Piece]] = {f"r{i}": [] for i in range(4)}
    acked: dict[int, list[tuple[int, int]]] = {0: [], 1: []}

    def ack(r: str, p: Piece) -> None:
        if d.ack(r, p):
            acked[p.epoch].extend((p.split, x) for x in range(p.start, p.stop))

    fresh: set[str] = set()  # restarted readers: their first call is hello (the protocol)
    for op, ri, ep in ops:
        r = f"r{ri}"
        if r in fresh and op in ("request", "ack"):
            fresh.discard(r)
            keep = held[r][0] if held[r] else None
            if keep is not None and not d.hello(r, keep):
                keep = None
            elif keep is None:
                d.hello(r)
            held[r] = [keep] if keep else []
        if op == "request":
            p = d.request(r, ep, 4)
            if isinstance(p, Piece):
                held[r].append(p)
        elif op == "ack" and held[r]:
            ack(r, held[r].pop(0))
        elif op == "die":
            d.release(r)
            held[r] = []  # gone: never acks what it held
        elif op == "hello":
            keep = held[r][0] if held[r] else None
            if keep is not None and not d.hello(r, keep):
                keep = None
            elif keep is None:
                d.hello(r)
            held[r] = [keep] if keep else []
        elif op == "tick":
            clock.t += 6.0  # two ticks without a call: the lease runs out
        elif op == "restore":
            state = json.loads(json.dumps(d.state_dict()))
            d = Dispatcher(splits, seed=seed, min_rows=min_rows, k=2, lease=10.0, clock=clock)
            d.load_state_dict(state)
            # the whole job restarted: each reader's checkpoint holds the piece it was partway
            # through (its first); what it had read ahead is gone
            held = {k: v[:1] for k, v in held.items()}
            fresh = set(held)
    # drain: survivors ack what they hold (refused if re-queued meanwhile; a restarted reader
    # says hello first, as the protocol has it), then one reader finishes
    for r, ps in held.items():
        if r in fresh:
            keep = ps[0] if ps else None
            ps = [keep] if keep is not None and d.hello(r, keep) else []
            if keep is None:
                d.hello(r)
        for p in ps:
            ack(r, p)
    for ep in (0, 1):
        finish_epoch(d, clock, ep, lambda p: ack("final", p))
        assert sorted(acked[ep]) == all_rows(splits), f"epoch {ep}"
        assert sorted(rows_of(d, ep)) == all_rows(splits) or ep in d.state_dict()["complete"]


# -------------------------------------------------------------------------------------------
# a job's checkpoint whose states were taken at different moments (asynchronous training):
# each reader's state and the dispatcher's, in any order; after a restore every row is still
# acknowledged exactly once counting only what the readers' states say they delivered

CUT_OPS = st.lists(
    st.tuples(
        st.sampled_from(["request", "ack", "ack", "snap", "dsnap", "restore", "tick", "die"]),
        st.integers(0, 3),
    ),
    max_size=150,
)


@settings(max_examples=300, deadline=None)
# the dispatcher's state taken before a reader acknowledged the last piece of epoch 0, the
# reader's in epoch 1: that piece is still delivered (its state lists the epoch before too)
@example(
    sizes=[10],
    ops=[("request", 0), ("dsnap", 0), ("ack", 0), ("request", 0), ("snap", 0), ("restore", 0)],
    seed=None,
    min_rows=16,
)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    ops=CUT_OPS,
    seed=st.one_of(st.none(), st.integers(0, 5)),
    min_rows=st.integers(1, 16),
)
def test_restore_from_states_taken_at_different_moments(sizes, ops, seed, min_rows) -> None:
    splits = make_splits(sizes)
    clock = Clock()

    def new() -> Dispatcher:
        return Dispatcher(splits, seed=seed, min_rows=min_rows, k=2, lease=10.0, clock=clock)

    d = new()
    names = [f"r{i}" for i in range(4)]
    epoch = dict.fromkeys(names, 0)  # each reader's epoch (it moves on when drained)
    held: dict[str, list[Piece]] = {r: [] for r in names}
    delivered: dict[str, list[Piece]] = {r: [] for r in names}  # in its current epoch
    prev: dict[str, list[Piece]] = {r: [] for r in names}  # in the epoch before (as data.Dataset keeps)
    log: list[tuple[str, Piece]] = []  # acknowledged, in order
    # each reader's last state: (epoch, delivered since (epoch), delivered, partway piece,
    # len(log) when taken)
    snaps: dict[str, tuple[int, int, list[Piece], Piece | None, int]] = {
        r: (0, 0, [], None, 0) for r in names
    }
    dstate: dict[str, Any] | None = None
    fresh: set[str] = set()

    def hello(r: str) -> None:
        _e, since, dl, keep, _ = snaps[r]
        oks = d.hello_many(r, [keep] if keep else [], dl, since)
        held[r] = [keep] if keep is not None and oks[0] else []
        fresh.discard(r)

    for op, ri in ops:
        r = names[ri]
        if r in fresh and op in ("request", "ack"):
            hello(r)
        if op == "request":
            p = d.request(r, epoch[r], 4)
            if isinstance(p, Piece):
                held[r].append(p)
            elif p == "drained" and epoch[r] == 0:
                epoch[r], prev[r], delivered[r] = 1, delivered[r], []
        elif op == "ack" and held[r]:
            p = held[r].pop(0)
            delivered[r].append(p)
            if d.ack(r, p):
                log.append((r, p))
        elif op == "snap" and r not in fresh:
            since = epoch[r] - 1 if prev[r] else epoch[r]
            dl = prev[r] + delivered[r]
            snaps[r] = (epoch[r], since, dl, held[r][0] if held[r] else None, len(log))
        elif op == "dsnap":
            dstate = json.loads(json.dumps(d.state_dict()))
        elif op == "tick":
            clock.t += 6.0
        elif op == "die":
            d.release(r)
            held[r] = []
        elif op == "restore":
            state = dstate if dstate is not None else json.loads(json.dumps(d.state_dict()))
            d, dstate = new(), None
            d.load_state_dict(state)
            # every reader resumes from its own last state: what it acknowledged after that
            # was not delivered as far as the job's checkpoint goes
            keep_log = []
            for i, (who, p) in enumerate(log):
                if i < snaps[who][4]:
                    keep_log.append((who, p))
            log = keep_log
            for rr in names:
                e, since, dl, _keep, _n = snaps[rr]
                epoch[rr], held[rr] = e, []
                prev[rr], delivered[rr] = ([], list(dl)) if since == e else (list(dl), [])
                snaps[rr] = (e, since, list(dl), _keep, len(log))
            fresh = set(names)
    for r in names:
        if r in fresh:
            hello(r)
        for p in held[r]:
            if d.ack(r, p):
                log.append((r, p))
    for ep in (0, 1):
        finish_epoch(d, clock, ep, lambda p: log.append(("final", p)) if d.ack("final", p) else None)
        rows = sorted((p.split, x) for _, p in log if p.epoch == ep for x in range(p.start, p.stop))
        assert rows == all_rows(splits), f"epoch {ep}"


def test_after_a_restore_pieces_wait_for_every_reader_or_a_third_of_a_lease() -> None:
    clock = Clock()
    splits = make_splits([10, 10, 10])
    d = Dispatcher(splits, min_rows=100, lease=9.0, clock=clock)
    state = d.state_dict()
    for comes in (True, False):
        d2 = Dispatcher(splits, min_rows=100, lease=9.0, clock=clock)
        before = d2.incarnation
        d2.load_state_dict(state)
        assert d2.incarnation != before  # readers that said hello before say it again
        d2.hello("a")
        assert d2.request("a", 0, 2) == "wait"  # b may live on holding pending pieces
        if comes:
            d2.hello_many("b", [], delivered=[], epoch=0)
        else:
            clock.t += 3.5
        assert isinstance(d2.request("a", 0, 2), Piece)
