"""Epoch time with slow readers: static vs dynamic split assignment, side by side, against T*.

Readers consume the batches of one epoch with *compute-proportional sleeps*: a batch of ``b``
rows costs ``b * cost`` seconds of work at speed 1, and a reader with slowdown ``s(t)`` does
that work at rate ``1 / s(t)`` (sleeps, not CPU, so the 2-core machine's contention does not
blur the schedule). Schedules, all deterministic:

* ``none``: every reader at speed 1 (the no-straggler time T0, and the dispatcher's overhead);
* ``one3x``: the last reader 3x slower throughout;
* ``burst``: the last reader 3x slower for 20% of the epoch (from 40% to 60% of T0);
* ``jitter``: every reader's slowdown log-normal (sigma 0.3), redrawn every 20 ms (seeded).

T* is the capacity bound: the time at which the readers' summed capacity ``sum_i int 1/s_i``
equals the epoch's work (``N / sum(1/s_i)`` x T0 for constant slowdowns). Real runs: N reader
threads of one process, each a ``data.read`` rank over a Parquet dataset, the dynamic ones
against the real HTTP dispatcher (rank 0 hosts it); each cell is the median of ``--repeats``.
Then a simulator (the real ``Dispatcher`` on a virtual clock, readers as events, request
latency and read-ahead calibrated on the real runs) for N up to 64, work per reader fixed.

    python benchmarks/bench_straggler.py [--repeats 3] [--rows 409600] [--cost-us 8]

Goal: dynamic <= 1.05 T* (4 readers, one 3x slower); overhead <= 2% with no straggler.
"""

from __future__ import annotations

import argparse
import heapq
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kubeai_train import data
from kubeai_train.data.dispatch.client import DynamicAssignment
from kubeai_train.data.dispatch.core import Dispatcher, Piece
from kubeai_train.data.types import Split

SCENARIOS = ("none", "one3x", "burst", "jitter")


class Schedule:
    """A reader's slowdown as a piecewise-constant function of time since the epoch start."""

    def __init__(self, breaks: list[float], slow: list[float]) -> None:
        self.breaks, self.slow = breaks, slow  # slow[k] holds on [breaks[k], breaks[k+1])

    @classmethod
    def constant(cls, s: float) -> Schedule:
        return cls([0.0], [s])

    def finish(self, t: float, work: float) -> float:
        """When ``work`` seconds of speed-1 work started at ``t`` are done."""
        k = max(0, int(np.searchsorted(self.breaks, t, side="right")) - 1)
        while True:
            end = self.breaks[k + 1] if k + 1 < len(self.breaks) else float("inf")
            cap = (end - t) / self.slow[k]
            if work <= cap:
                return t + work * self.slow[k]
            work -= cap
            t, k = end, k + 1

    def capacity(self, t: float) -> float:
        """Speed-1 work this reader can do in ``[0, t)``."""
        done, k = 0.0, 0
        while k < len(self.breaks) and self.breaks[k] < t:
            end = min(t, self.breaks[k + 1] if k + 1 < len(self.breaks) else t)
            done += (end - self.breaks[k]) / self.slow[k]
            k += 1
        return done


def schedules(name: str, n: int, t0: float, seed: int = 0) -> list[Schedule]:
    if name == "none":
        return [Schedule.constant(1.0) for _ in range(n)]
    if name == "one3x":
        return [Schedule.constant(1.0) for _ in range(n - 1)] + [Schedule.constant(3.0)]
    if name == "burst":
        return [Schedule.constant(1.0) for _ in range(n - 1)] + [
            Schedule([0.0, 0.4 * t0, 0.6 * t0], [1.0, 3.0, 1.0])
        ]
    if name == "jitter":
        rng = np.random.default_rng(seed)
        step = 0.02 * max(1.0, t0)  # 20 ms for an epoch of T0 ~ 1 s
        k = int(20 * t0 / step) + 10
        return [Schedule(list(np.arange(k) * step), list(rng.lognormal(0.0, 0.3, size=k))) for _ in range(n)]
    raise ValueError(f"unknown scenario {name!r}")


def t_star(scheds: list[Schedule], work: float) -> float:
    """The earliest time the readers' summed capacity covers ``work`` (bisection)."""
    lo, hi = 0.0, 1.0
    while sum(s.capacity(hi) for s in scheds) < work:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(s.capacity(mid) for s in scheds) < work else (lo, mid)
    return hi


# --------------------------------------------------------------------------------------------
# real runs


def write_dataset(root: Path, rows: int, row_group: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    files = 4
    per = rows // files
    for f in range(files):
        ids = np.arange(f * per, (f + 1) * per, dtype=np.int64)
        t = pa.table({"id": ids, "x": (ids % 97).astype(np.float32)})
        pq.write_table(t, root / f"part-{f}.parquet", row_group_size=row_group)


def real_epoch(
    root: Path, n: int, assignment: str, scheds: list[Schedule], cost: float, batch: int, prefetch: int
) -> tuple[float, int]:
    """Wall time of one epoch read by ``n`` reader threads, and the rows they read in all."""
    dss = []
    for r in range(n):  # rank 0 first: it hosts the dispatcher
        a = DynamicAssignment(min_rows=batch) if assignment == "dynamic" else "static"
        dss.append(
            data.read(str(root), rank=r, world_size=n, batch_size=batch, assignment=a, prefetch=prefetch)
        )
    barrier = threading.Barrier(n + 1)
    start = [0.0]
    done = [0.0] * n
    ids: list[list[np.ndarray]] = [[] for _ in range(n)]

    def reader(i: int) -> None:
        it = iter(dss[i])
        barrier.wait()
        t0 = start[0]
        for b in it:
            ids[i].append(b["id"])
            now = time.perf_counter() - t0
            end = scheds[i].finish(now, len(b["id"]) * cost)
            time.sleep(max(0.0, end - (time.perf_counter() - t0)))
        done[i] = time.perf_counter() - t0

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start[0] = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    every = np.concatenate([np.concatenate(x) for x in ids if x])
    if len(every) != len(np.unique(every)):
        raise SystemExit(f"{assignment} N={n}: a row was read twice")
    LAST_SPREAD[0] = (max(done) - min(done)) / max(done)
    return max(done), len(every)


LAST_SPREAD = [0.0]  # (last - first reader's finish) / epoch of the latest run: the tail


def request_latency(samples: int = 300) -> float:
    """Mean seconds of one request + ack round trip over HTTP (for the simulator)."""
    from kubeai_train.data.dispatch import server as srv

    splits = [Split("k", 0, 10_000_000)]
    s = srv.DispatchServer("127.0.0.1", 0)
    try:
        s.register("bench", Dispatcher(splits, min_rows=1))
        c = srv.Client(s.url)
        t0 = time.perf_counter()
        for _ in range(samples):
            out = c.call("request", {"dataset": "bench", "reader": "0.0", "epoch": 0, "num_readers": 10_000})
            c.call("ack", {"dataset": "bench", "reader": "0.0", "piece": out["piece"]})
        return (time.perf_counter() - t0) / samples
    finally:
        s.close()


# --------------------------------------------------------------------------------------------
# simulator


def simulate(
    n: int,
    splits: list[Split],
    assignment: str,
    scheds: list[Schedule],
    cost: float,
    batch: int,
    readahead: int,
    latency: float,
) -> float:
    """Epoch time of ``n`` readers on a virtual clock (pieces from the real Dispatcher).

    A reader keeps ``readahead`` batches of rows asked for (the prefetch queue plus the batch
    being built), computes one batch at a time at its schedule's speed, and acknowledges off
    its path (the pipeline sends acknowledgements from a thread of its own).
    """
    total = sum(s.num_rows for s in splits)
    if assignment == "static":
        return max(scheds[i].finish(0.0, (total // n + (1 if i < total % n else 0)) * cost) for i in range(n))
    now = [0.0]
    clock: Callable[[], float] = lambda: now[0]  # noqa: E731
    d = Dispatcher(splits, None, min_rows=batch, k=2.0, lease=1e9, clock=clock)
    backlog: list[list[list[int | Piece]]] = [[] for _ in range(n)]  # [piece, rows left]
    drained = [False] * n
    events = [(0.0, i) for i in range(n)]
    heapq.heapify(events)
    end = 0.0
    while events:
        t, i = heapq.heappop(events)
        now[0] = t
        name = f"{i}.0"
        # top up the read-ahead: the pipeline asks for the next piece while it holds less than
        # (prefetch + 1) batches of unconsumed rows
        waited = False
        while not drained[i] and sum(int(x[1]) for x in backlog[i]) < readahead * batch:
            # the pipeline's producer thread asks while the trainer computes: the round trip
            # costs the reader time only when it has nothing left to compute
            if not backlog[i]:
                t += latency
                now[0] = t
            got = d.request(name, 0, n)
            if isinstance(got, Piece):
                backlog[i].append([got, got.num_rows])
            elif got == "wait":
                waited = True
                break
            else:
                drained[i] = True
        if not backlog[i]:
            if drained[i]:
                end = max(end, t)
                continue
            heapq.heappush(events, (t + 0.005 if waited else t, i))
            continue
        # one batch across pieces
        take, rows = batch, 0
        finished = []
        for x in backlog[i]:
            k = min(take, int(x[1]))
            x[1] = int(x[1]) - k
            take -= k
            rows += k
            if x[1] == 0:
                finished.append(x)
            if take == 0:
                break
        t = scheds[i].finish(t, rows * cost)
        now[0] = t
        for x in finished:
            backlog[i].remove(x)
            piece = x[0]
            assert isinstance(piece, Piece)
            d.ack(name, piece)
        heapq.heappush(events, (t, i))
    return end


# --------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=409_600)
    p.add_argument("--row-group", type=int, default=8192)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--cost-us", type=float, default=8.0, help="speed-1 compute per row, microseconds")
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sim-max", type=int, default=64)
    args = p.parse_args()
    cost = args.cost_us * 1e-6
    print(
        f"rows={args.rows} row_group={args.row_group} batch={args.batch} cost={args.cost_us}us/row "
        f"prefetch={args.prefetch} repeats={args.repeats}"
    )
    runs: dict[tuple[int, str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "d"
        write_dataset(root, args.rows, args.row_group)
        print("\nreal readers (threads, real HTTP dispatcher); times are epoch / T0, T0 = work / N")
        print("  o = static with no straggler / T0 (sleep overshoot and reading on this machine);")
        print("  dyn/T*o = dynamic / (T* x o); tail = (last - first reader's finish) / epoch, dynamic")
        print(
            f"{'N':>3} {'scenario':>8} {'T*':>6} {'static':>7} {'dynamic':>8} {'dyn/T*':>7} {'dyn/T*o':>8} "
            f"{'static/T*':>9} {'tail':>6}"
        )
        for n in (2, 4):
            work = args.rows * cost
            t0 = work / n
            base: dict[str, float] = {}
            for sc in SCENARIOS:
                scheds = schedules(sc, n, t0)
                ts = t_star(scheds, work)
                tails = []
                for _ in range(args.repeats):
                    for a in ("static", "dynamic"):  # alternated, so drifts in load hit both
                        el, rows = real_epoch(root, n, a, scheds, cost, args.batch, args.prefetch)
                        if rows != args.rows:
                            raise SystemExit(f"{a} N={n} {sc}: read {rows} of {args.rows} rows")
                        runs.setdefault((n, sc, a), []).append(el)
                        if a == "dynamic":
                            tails.append(LAST_SPREAD[0])
                st = statistics.median(runs[(n, sc, "static")])
                dy = statistics.median(runs[(n, sc, "dynamic")])
                if sc == "none":
                    base = {"static": st, "dynamic": dy}
                o = base["static"] / t0
                print(
                    f"{n:>3} {sc:>8} {ts / t0:6.3f} {st / t0:7.3f} {dy / t0:8.3f} {dy / ts:7.3f} "
                    f"{dy / (ts * o):8.3f} {st / ts:9.3f} {statistics.median(tails):6.3f}"
                )
            print(
                f"{n:>3} overhead with no straggler: dynamic / static = {base['dynamic'] / base['static']:.4f} "
                f"(o = {base['static'] / t0:.3f})"
            )
    lat = request_latency()
    print(
        f"\nsimulator: request+ack round trip {lat * 1e3:.3f} ms (measured), read-ahead {args.prefetch + 1} batches"
    )
    print(f"{'N':>3} {'scenario':>8} {'T*':>6} {'static':>7} {'dynamic':>8} {'dyn/T*':>7}")
    per_reader = args.rows // 4
    n = 2
    while n <= args.sim_max:
        rows = per_reader * n
        splits = [Split(f"s{i}", 0, args.row_group) for i in range(rows // args.row_group)]
        rows = sum(s.num_rows for s in splits)
        work = rows * cost
        t0 = work / n
        for sc in SCENARIOS[1:]:
            scheds = schedules(sc, n, t0)
            ts = t_star(scheds, work)
            st = simulate(n, splits, "static", scheds, cost, args.batch, args.prefetch + 1, lat)
            dy = simulate(n, splits, "dynamic", scheds, cost, args.batch, args.prefetch + 1, lat)
            print(f"{n:>3} {sc:>8} {ts / t0:6.3f} {st / t0:7.3f} {dy / t0:8.3f} {dy / ts:7.3f}")
        n *= 2


if __name__ == "__main__":
    main()
