"""Synchronous DDP with a slow rank: plain sync vs backup workers (b=1) vs adaptive local
batches, side by side in one run, against the capacity bound T*.

Every rank's forward sleeps in proportion to its local batch: ``rows x cost`` seconds of work at
speed 1, done at rate ``1 / s(t)`` under the rank's slowdown schedule (sleeps, not CPU, so the
shared 2-core machine's contention does not blur the schedule; the real compute of the tiny
model comes on top). The schedules are those of ``bench_straggler.py`` (part 1):

* ``none``: every rank at speed 1 (the no-straggler time, and each mode's overhead);
* ``one3x``: the last rank 3x slower throughout;
* ``burst``: the last rank 3x slower for 20% of the epoch (40% to 60% of T0);
* ``jitter``: every rank's slowdown log-normal (sigma 0.3), redrawn every 20 ms (seeded).

T0 is the sleep work of one rank's share (rows x cost / N); T* the capacity bound (the time the
ranks' summed capacity covers the epoch's sleep work; ``N / sum(1/s_i)`` x T0 for constant
slowdowns). Live: N in {2, 4} real torch DDP ranks (gloo on 127.0.0.1, one process each, started
by ``kubeai_train.launch.run_processes``) train one epoch of a synthetic CTR set with a planted
signal (``kubeai_train.testing.ctr``), data handed out by the dynamic dispatcher (every mode: a
slow rank's rows go to whoever asks; a static split would make it own its shard); rank 0
evaluates AUC on a held-out set every few steps (that time is excluded from the clock).
Time-to-target: the first evaluation at or above ``--target`` x the final AUC of the plain
no-straggler run of the same N, over that run's time to it. Then a simulator (pure: the real
SlowWorkerDetector, BackupWorkers.sit_out and AdaptiveBatchPolicy on a virtual clock, timings
one step late as in the trainer, an ideal shared pool of rows, a per-step overhead calibrated on
the live runs) for N up to 64.

    python benchmarks/bench_straggler_sync.py [--rows-per-rank 8192] [--batch 256] [--cost-us 500] [--live 2,4]

Goal (issue 17): adaptive <= 1.10 T* with time-to-target AUC within 5% of the no-straggler run,
and <= 3% overhead with no straggler.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_straggler import SCENARIOS, Schedule, schedules, t_star

from kubeai_train.straggler import (
    AdaptiveBatchPolicy,
    BackupWorkers,
    SlowWorkerDetector,
    WorkerTiming,
)

MODES = ("plain", "backup", "adaptive")
BUCKETS = 1000


# --------------------------------------------------------------------------------------------
# live: what every rank runs


def job(
    train: str,
    eval_path: str,
    mode: str,
    schedule: str,
    t0: float,
    cost: float,
    batch: int,
    micro: int,
    replan: int,
    eval_every: int,
) -> dict[str, Any]:
    """One epoch of ``mode`` under ``schedule`` on this rank; rank 0 returns the measurements."""
    import torch

    from kubeai_train import data
    from kubeai_train import torch as kt
    from kubeai_train.torch.metrics import auc
    from kubeai_train.torch.trainer import TransformedBatches

    torch.set_num_threads(1)

    def main() -> dict[str, Any]:
        with kt.process_group(timeout_s=120) as ctx:
            torch.manual_seed(0)
            features = kt.CTRFeatures(buckets=BUCKETS)
            model = kt.DLRM(features.sizes, len(features.dense), dim=8)
            cfg = kt.TrainConfig(
                dense_lr=0.01,
                sparse_lr=0.05,
                log_every=10**6,
                straggler={"plain": "none"}.get(mode, mode),
                adaptive=kt.AdaptiveBatching(micro_batches=micro, replan_every=replan),
                backup_workers=1,
            )
            trainer = kt.Trainer(model, features, cfg, ctx)
            sched: Schedule = schedules(schedule, ctx.world_size, t0)[ctx.rank]
            clock = {"start": -1.0, "excluded": 0.0}
            forward = trainer.module.forward

            def now() -> float:
                return time.perf_counter() - clock["start"] - clock["excluded"]

            def slow_forward(ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
                if clock["start"] < 0:
                    clock["start"] = time.perf_counter()
                t = now()
                time.sleep(max(0.0, sched.finish(t, len(ids) * cost) - t))
                return forward(ids, dense)

            trainer.module.forward = slow_forward  # type: ignore[method-assign]
            opts = features.read_options()
            ev = list(
                TransformedBatches(
                    data.read(eval_path, batch_size=1 << 16, rank=0, world_size=1, **opts).to_torch(),
                    features,
                )
            )
            ids = torch.cat([b["ids"] for b in ev])
            dense = torch.cat([b["dense"] for b in ev])
            label = torch.cat([b["label"] for b in ev]).numpy()
            curve: list[tuple[float, int, float]] = []

            def evaluate() -> None:
                e0 = time.perf_counter()
                with torch.no_grad():  # the unslowed forward: evaluation is not the rank's training work
                    a = auc(label, torch.sigmoid(forward(ids, dense)).numpy())
                curve.append((now(), trainer.step + 1, a))
                clock["excluded"] += time.perf_counter() - e0

            train_step = trainer._train_step

            def step_and_eval(b: Any, scale: Any = None) -> Any:
                out = train_step(b, scale)
                if ctx.rank == 0 and (trainer.step + 1) % eval_every == 0:
                    evaluate()
                return out

            trainer._train_step = step_and_eval  # type: ignore[method-assign]
            ds = data.read(
                train,
                batch_size=batch,
                assignment="dynamic",
                **opts,
            )
            res = trainer.fit(ds, epochs=1)
            out: dict[str, Any] = {"rank": ctx.rank}
            if ctx.rank == 0:
                epoch = now()
                evaluate()
                out.update(
                    epoch=epoch,
                    curve=curve,
                    steps=res.steps,
                    rows=res.rows,
                    rows_per_rank=res.rows_per_rank,
                    straggler=None if res.straggler is None else res.straggler.as_dict(),
                )
            ctx.barrier()
            return out

    return kt.run(main)


def live(root: Path, n: int, mode: str, schedule: str, args: argparse.Namespace, t0: float) -> dict[str, Any]:
    from kubeai_train.launch import run_processes

    here = str(Path(__file__).resolve().parent)
    env = {
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]),
    }
    kw = {
        "train": str(root / f"n{n}" / "train"),
        "eval_path": str(root / f"n{n}" / "eval"),
        "mode": mode,
        "schedule": schedule,
        "t0": t0,
        "cost": args.cost_us * 1e-6,
        "batch": args.batch,
        "micro": args.micro_batches,
        "replan": args.replan_every,
        "eval_every": args.eval_every,
    }
    res = run_processes("bench_straggler_sync:job", workers=n, kwargs=kw, env=env, timeout=300).results
    return res["master:0"]


def time_to(curve: list[list[float]], target: float) -> float:
    """Seconds (eval time excluded) of the first evaluation with AUC >= target (inf: never)."""
    for t, _, a in curve:
        if a >= target:
            return float(t)
    return float("inf")


def steps_to(curve: list[list[float]], target: float) -> float:
    """Steps trained by the first evaluation with AUC >= target (inf: never)."""
    for _, step, a in curve:
        if a >= target:
            return float(step)
    return float("inf")


# --------------------------------------------------------------------------------------------
# simulator


def simulate(
    mode: str,
    scheds: list[Schedule],
    rows: int,
    batch: int,
    micro: int,
    cost: float,
    overhead: float,
    replan: int,
    k: float = 1.5,
    m: int = 2,
) -> tuple[float, int]:
    """Epoch seconds and steps of ``mode`` on a virtual clock: a step lasts as long as the
    slowest training rank's sleep work plus ``overhead``; rows come from one shared pool (ideal
    dynamic assignment); each policy sees a step's timings one step late, as in the trainer."""
    n = len(scheds)
    det = SlowWorkerDetector(k=k, m=m)
    backup = BackupWorkers(n, 1)
    policy = AdaptiveBatchPolicy(n * micro, n, replan_every=replan, reset_steps=m)
    g = batch // micro
    sit: frozenset[int] = frozenset()
    ratio: dict[int, float] = {}
    prev: list[WorkerTiming] | None = None
    t, pool, step = 0.0, rows, 0
    while pool > 0:
        if mode == "adaptive":
            sizes = [u * g for u in policy.plan.sizes]
        else:
            sizes = [0 if i in sit else batch for i in range(n)]
        timings = []
        longest = 0.0
        for i, want in enumerate(sizes):
            take = min(want, pool)
            pool -= take
            work_rows = take if want else max(1, -(-batch // 4))  # a sitting rank probes
            dur = scheds[i].finish(t, work_rows * cost) - t
            longest = max(longest, dur)
            timings.append(WorkerTiming(i, work_rows, dur))
        if prev is not None:
            if mode == "adaptive":
                d = det.observe(step - 1, prev)
                policy.observe(step - 1, prev, new=d.new, cleared=d.cleared)
            elif mode == "backup":
                ratio.update(det.observe(step - 1, prev).ratio)
                sit = backup.sit_out(det.flagged, ratio, range(n))
        prev = timings
        t += longest + overhead
        step += 1
    return t, step


# --------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--rows-per-rank", type=int, default=32768)
    p.add_argument("--eval-rows", type=int, default=4096)
    p.add_argument("--batch", type=int, default=512, help="rows per rank per step at equal shares")
    p.add_argument("--micro-batches", type=int, default=16, help="adaptive: micro-batches per equal share")
    p.add_argument("--replan-every", type=int, default=3, help="adaptive: R")
    p.add_argument("--cost-us", type=float, default=300.0, help="speed-1 sleep work per row, microseconds")
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument(
        "--target", type=float, default=0.98, help="time-to-target: this x the plain no-straggler final AUC"
    )
    p.add_argument("--repeats", type=int, default=3, help="runs of the no-straggler schedule (medians)")
    p.add_argument("--live", default="2,4", help="live world sizes")
    p.add_argument("--sim-max", type=int, default=64)
    args = p.parse_args()
    cost = args.cost_us * 1e-6
    print(
        f"rows/rank={args.rows_per_rank} batch={args.batch} micro={args.micro_batches} R={args.replan_every} "
        f"cost={args.cost_us}us/row eval_every={args.eval_every} target={args.target} repeats(none)={args.repeats}"
    )
    from kubeai_train.testing.ctr import generate_split

    overhead: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for n in [int(x) for x in args.live.split(",") if x]:
            rep = generate_split(
                args.rows_per_rank * n,
                args.eval_rows,
                root / f"n{n}",
                seed=1,
                files=4,
                row_group_size=max(256, args.batch * 2),
            )
            print(
                f"\nlive N={n}: {rep['train']['rows']} train rows, planted true AUC {rep['eval']['true_auc']:.4f}"
            )
            t0 = args.rows_per_rank * cost
            runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for sc in SCENARIOS:
                for _ in range(args.repeats if sc == "none" else 1):
                    for mode in MODES:  # alternated, so drifts in load hit every mode
                        r = live(root, n, mode, sc, args, t0)
                        if r["rows"] != args.rows_per_rank * n:
                            raise SystemExit(
                                f"N={n} {mode} {sc}: trained {r['rows']} rows of {args.rows_per_rank * n}"
                            )
                        runs.setdefault((sc, mode), []).append(r)

            def med(
                sc: str, mode: str, runs: dict[tuple[str, str], list[dict[str, Any]]] = runs
            ) -> dict[str, Any]:
                rs = sorted(runs[(sc, mode)], key=lambda run: float(run["epoch"]))
                return rs[len(rs) // 2]

            base = med("none", "plain")
            target = args.target * base["curve"][-1][2]
            base_ttt = time_to(base["curve"], target)
            base_stt = steps_to(base["curve"], target)
            o = base["epoch"] / t0
            print(
                f"  x/none = epoch / plain no-straggler epoch; x/T* = that / (T*/T0); own/T* = epoch / the same "
                f"mode's no-straggler epoch / (T*/T0);\n  ttt = time to AUC {target:.4f} / the plain "
                f"no-straggler run's ({base_ttt:.2f}s); ttt/T* = ttt / (T*/T0);\n  stt = steps to it / the plain no-straggler run's ({base_stt:.0f}; backup's steps hold fewer rows); o = plain no-straggler epoch / T0 = {o:.3f}"
            )
            print(
                f"{'N':>3} {'sched':>6} {'T*/T0':>6} | {'plain':>6} {'backup':>6} {'adapt':>6} | "
                f"{'plain':>6} {'backup':>6} {'adapt':>6} x/T* | {'backup':>6} {'adapt':>6} own/T* | {'plain':>6} {'backup':>6} {'adapt':>6} ttt | "
                f"{'plain':>6} {'backup':>6} {'adapt':>6} ttt/T* | {'plain':>6} {'backup':>6} {'adapt':>6} stt | "
                f"{'aucP':>6} {'aucB':>6} {'aucA':>6} | sat_out"
            )
            for sc in SCENARIOS:
                ts = t_star(schedules(sc, n, t0), t0 * n) / t0
                ms = {mode: med(sc, mode) for mode in MODES}
                x = {mode: ms[mode]["epoch"] / base["epoch"] for mode in MODES}
                ttt = {mode: time_to(ms[mode]["curve"], target) / base_ttt for mode in MODES}
                stt = {mode: steps_to(ms[mode]["curve"], target) / base_stt for mode in MODES}
                st = ms["backup"]["straggler"] or {}
                print(
                    f"{n:>3} {sc:>6} {ts:6.3f} | "
                    + " ".join(f"{x[mm]:6.3f}" for mm in MODES)
                    + " | "
                    + " ".join(f"{x[mm] / ts:6.3f}" for mm in MODES)
                    + "      | "
                    + " ".join(f"{ms[mm]['epoch'] / med('none', mm)['epoch'] / ts:6.3f}" for mm in MODES[1:])
                    + "        | "
                    + " ".join(f"{ttt[mm]:6.3f}" for mm in MODES)
                    + "     | "
                    + " ".join(f"{ttt[mm] / ts:6.3f}" for mm in MODES)
                    + "        | "
                    + " ".join(f"{stt[mm]:6.3f}" for mm in MODES)
                    + "     | "
                    + " ".join(f"{ms[mm]['curve'][-1][2]:6.4f}" for mm in MODES)
                    + f" | {st.get('sat_out')}"
                )
            e = {mode: statistics.median(r["epoch"] for r in runs[("none", mode)]) for mode in MODES}
            print(
                f"{n:>3} overhead with no straggler (medians of {args.repeats}): adaptive / plain = "
                f"{e['adaptive'] / e['plain']:.4f}, backup / plain = {e['backup'] / e['plain']:.4f}"
            )
            for mode in MODES:  # the simulator's per-step overhead: what a step costs beyond its sleeps
                steps = statistics.median(r["steps"] for r in runs[("none", mode)])
                overhead[mode] = max(0.0, (e[mode] - t0) / steps)
    print(
        "\nsimulator (pure policies, virtual clock), per-step overhead calibrated on the last live N: "
        + ", ".join(f"{mm} {overhead.get(mm, 0.0) * 1e3:.2f} ms" for mm in MODES)
    )
    print("  x/T* = (epoch / simulated plain no-straggler epoch) / (T*/T0), as the live x/T*")
    print(
        f"{'N':>3} {'sched':>6} {'T*/T0':>6} | {'plain':>6} {'backup':>6} {'adapt':>6} x/none | {'plain':>6} {'backup':>6} {'adapt':>6} x/T*"
    )
    n = 2
    while n <= args.sim_max:
        rows = args.rows_per_rank * n
        t0 = args.rows_per_rank * cost

        def sim(mode: str, sc: str, n: int = n, t0: float = t0, rows: int = rows) -> float:
            return simulate(
                mode,
                schedules(sc, n, t0),
                rows,
                args.batch,
                args.micro_batches,
                cost,
                overhead.get(mode, 0.0),
                args.replan_every,
            )[0]

        base_sim = sim("plain", "none")
        for sc in SCENARIOS:
            ts = t_star(schedules(sc, n, t0), rows * cost) / t0
            x = [sim(mode, sc) / base_sim for mode in MODES]
            print(
                f"{n:>3} {sc:>6} {ts:6.3f} | "
                + " ".join(f"{v:6.3f}" for v in x)
                + "        | "
                + " ".join(f"{v / ts:6.3f}" for v in x)
            )
        n *= 2


if __name__ == "__main__":
    main()
