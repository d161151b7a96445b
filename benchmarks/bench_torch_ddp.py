"""kubeai_train.torch against a hand-written DDP loop, and sparse against dense embedding gradients.

One run, one 2-rank job through the local launcher, same data and model for every contender:

1. **Wrapper overhead**: examples/s of ``Trainer.fit`` (lockstep input sync, loss all-reduce,
   logging) against the loop people write by hand (``DDP`` + ``Join`` + SparseAdam/Adam over
   the same ``data.read(...).to_torch()`` DataLoader). The two alternate pass by pass
   (A B A B ...) so machine load hits both alike; the table gives the median of each, in
   examples per wall-second and per CPU-second (summed over ranks: robust to other processes
   on the machine), and the median of the per-pass ratios (goal: overhead <= 3%).
2. **Sparse vs dense gradients**: the same DLRM with ``EmbeddingBag(sparse=True)`` + SparseAdam
   against ``sparse=False`` + Adam, both through ``Trainer``, alternating rounds of steps:
   median time per step (input included), and the
   gradient bytes each rank hands to the collective per step (counted by a DDP communication
   hook on the real buckets: dense = numel x 4; sparse = nnz x (8 + 4 x dim)). Ring all-reduce
   puts about 2(N-1)/N x that on the wire per rank; gloo's sparse all-reduce all-gathers, (N-1) x.

    python benchmarks/bench_torch_ddp.py [--rows 100000] [--table-rows 1000000] [--passes 8]

Use OMP_NUM_THREADS=1 on small machines (set for the job's processes here).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from kubeai_train import data
from kubeai_train import torch as kt
from kubeai_train.torch.trainer import _NO_BUFFER_SYNC, TransformedBatches


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--rows", type=int, default=100000, help="training rows (split over the ranks)")
    p.add_argument("--table-rows", type=int, default=1000000, help="embedding rows in total (26 columns)")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=1024, help="rows per step per rank")
    p.add_argument("--passes", type=int, default=8, help="timed passes per contender (alternating)")
    p.add_argument(
        "--steps", type=int, default=24, help="timed steps per gradient mode (3 alternating rounds)"
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data", default=None, help="existing CTR data dir (default: generate)")
    p.add_argument("--out", default=None, help="(job side) where rank 0 writes its JSON")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------ job side


def _hand_pass(ddp: DDP, opts: list[torch.optim.Optimizer], loader: DataLoader) -> tuple[int, float]:
    rows = 0
    t0 = time.perf_counter()
    with Join([ddp]):
        for b in loader:
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss = F.binary_cross_entropy_with_logits(ddp(b["ids"], b["dense"]), b["label"])
            loss.backward()
            for o in opts:
                o.step()
            rows += len(b["label"])
    return rows, time.perf_counter() - t0


def _job_seconds(wall: float, cpu: float) -> tuple[float, float]:
    """(slowest rank's wall seconds, CPU seconds summed over ranks) of one pass."""
    w = torch.tensor([wall], dtype=torch.float64)
    c = torch.tensor([cpu], dtype=torch.float64)
    dist.all_reduce(w, op=dist.ReduceOp.MAX)
    dist.all_reduce(c)
    return float(w), float(c)


def _global_rows(rows: int) -> int:
    t = torch.tensor([rows], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


class _ByteCounter:
    """A DDP comm hook doing what the default does (all-reduce, then average) while counting
    the bytes of every bucket handed to the collective."""

    def __init__(self) -> None:
        self.bytes = 0

    def hook(self):  # no annotations: DDP checks them against its own types at registration
        def count_and_allreduce(state, bucket):
            buf = bucket.buffer()
            if buf.is_sparse:
                c = buf.coalesce()
                self.bytes += c._nnz() * (8 * c.sparse_dim() + c.element_size() * c.values()[0].numel())
            else:
                self.bytes += buf.numel() * buf.element_size()
            world = dist.get_world_size()
            fut = dist.all_reduce(buf, async_op=True).get_future()
            return fut.then(lambda f: f.value()[0] / world)

        return count_and_allreduce


def job(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    with kt.process_group(timeout_s=300) as ctx:
        per_col = max(2, args.table_rows // 26)
        features = kt.CTRFeatures(buckets=per_col)

        def reader() -> Any:
            return data.read(args.data, batch_size=args.batch_size, **features.read_options())

        def model(sparse: bool = True) -> kt.DLRM:
            torch.manual_seed(0)
            return kt.DLRM(features.sizes, len(features.dense), dim=args.dim, sparse=sparse)

        # 1. wrapper vs hand-written loop, alternating passes
        hand_model = model()
        hand = DDP(hand_model, **_NO_BUFFER_SYNC)
        sparse_p, dense_p = kt.split_parameters(hand_model)
        hand_opts: list[torch.optim.Optimizer] = [
            torch.optim.SparseAdam(sparse_p, lr=1e-2),
            torch.optim.Adam(dense_p, lr=1e-3),
        ]
        trainer = kt.Trainer(model(), features, kt.TrainConfig(log_every=100), ctx)
        hand_rates: list[float] = []
        wrap_rates: list[float] = []
        hand_cpu: list[float] = []
        wrap_cpu: list[float] = []
        for i in range(args.passes + 1):  # pass 0 warms up both (page cache, allocator)
            src = reader().to_torch()
            loader = DataLoader(TransformedBatches(src, features), batch_size=None)
            dist.barrier()
            c0 = time.process_time()
            rows, secs = _hand_pass(hand, hand_opts, loader)
            h_wall, h_cpu = _job_seconds(secs, time.process_time() - c0)
            h_rows = _global_rows(rows)
            dist.barrier()
            data_w = reader()
            c0 = time.process_time()
            res = trainer.fit(data_w)
            w_wall, w_cpu = _job_seconds(res.seconds, time.process_time() - c0)
            trainer.step = 0  # fit() counts steps across calls; each pass is one epoch again
            if i > 0:
                hand_rates.append(h_rows / h_wall)
                wrap_rates.append(res.rows / w_wall)
                hand_cpu.append(h_rows / h_cpu)
                wrap_cpu.append(res.rows / w_cpu)

        # 2. sparse vs dense gradients through the wrapper, alternating rounds of steps
        del hand, hand_model, hand_opts, trainer
        rounds, per_round = 4, max(1, args.steps // 3)  # round 0 warms up (optimizer state)
        contenders: dict[str, tuple[kt.Trainer, _ByteCounter, list[float]]] = {}
        for name, sparse in (("sparse", True), ("dense", False)):
            t = kt.Trainer(model(sparse), features, kt.TrainConfig(log_every=10**9), ctx)
            counter = _ByteCounter()
            t.ddp.register_comm_hook(None, counter.hook())
            contenders[name] = (t, counter, [])
        for r in range(rounds):
            for t, _counter, times in contenders.values():
                t.config = dataclasses.replace(t.config, max_steps=t.step + per_round + 1)
                res = t.fit(reader())
                if r > 0:
                    times.extend(res.step_times[1:])  # the first step of a pass opens the reader
        modes: dict[str, dict[str, float]] = {}
        for name, (t, counter, times) in contenders.items():
            modes[name] = {
                "ms_per_step": 1000 * statistics.median(times),
                "bytes_per_step": counter.bytes / max(1, t.step),
                "params": sum(p.numel() for p in t.module.parameters()),
            }
        if ctx.is_chief and args.out:
            Path(args.out).write_text(
                json.dumps(
                    {
                        "world_size": ctx.world_size,
                        "hand": hand_rates,
                        "wrapper": wrap_rates,
                        "hand_cpu": hand_cpu,
                        "wrapper_cpu": wrap_cpu,
                        "modes": modes,
                        "table_rows": per_col * 26,
                        "dim": args.dim,
                        "batch_size": args.batch_size,
                    }
                )
            )
        dist.barrier()


# ------------------------------------------------------------------------------------ driver


def drive(args: argparse.Namespace) -> int:
    from kubeai_train.launch import run_processes
    from kubeai_train.testing import ctr

    tmp = Path(tempfile.mkdtemp(prefix="bench-torch-"))
    if args.data is None:
        args.data = str(tmp / "train")
        ctr.generate(args.rows, args.data, seed=0, files=8)
    out = tmp / "result.json"
    job_args = [
        "--data", args.data, "--out", str(out), "--table-rows", str(args.table_rows), "--dim", str(args.dim),
        "--batch-size", str(args.batch_size), "--passes", str(args.passes), "--steps", str(args.steps),
    ]  # fmt: skip
    t0 = time.time()
    run_processes(
        Path(__file__).resolve(),
        framework="torch",
        workers=args.workers,
        args=job_args,
        env={"OMP_NUM_THREADS": "1"},
        timeout=3600,
    )
    r = json.loads(out.read_text())
    print(f"\nkubeai_train.torch DDP benchmark: {r['world_size']} ranks (gloo, CPU), DLRM dim {r['dim']}, "
          f"{r['table_rows']:,} embedding rows, batch {r['batch_size']}/rank, {args.rows:,} rows/pass, "
          f"{len(r['hand'])} timed passes each, alternating (job {time.time() - t0:.0f}s)\n")  # fmt: skip
    print("| loop | examples/s (median) | examples per CPU-second (median) | passes, examples/s |")
    print("|---|---|---|---|")
    for name, key in (("hand-written DDP + Join", "hand"), ("kubeai_train.torch.Trainer", "wrapper")):
        print(f"| {name} | {statistics.median(r[key]):,.0f} | {statistics.median(r[key + '_cpu']):,.0f} | "
              f"{', '.join(f'{x:,.0f}' for x in r[key])} |")  # fmt: skip
    wall = statistics.median(w / h for w, h in zip(r["wrapper"], r["hand"], strict=True))
    cpu = statistics.median(w / h for w, h in zip(r["wrapper_cpu"], r["hand_cpu"], strict=True))
    print(f"| Trainer / hand-written (median of per-pass ratios) | {wall:.3f} ({100 * (1 - wall):+.1f}% overhead) | "
          f"{cpu:.3f} ({100 * (1 - cpu):+.1f}% overhead) | |")  # fmt: skip
    s, d = r["modes"]["sparse"], r["modes"]["dense"]
    print("\n| embedding gradients | ms/step (median) | gradient bytes/rank/step | params |")
    print("|---|---|---|---|")
    for name, m in (
        ("sparse (EmbeddingBag sparse=True + SparseAdam)", s),
        ("dense (sparse=False + Adam)", d),
    ):
        print(f"| {name} | {m['ms_per_step']:.1f} | {m['bytes_per_step'] / 1e6:,.2f} MB | {m['params']:,} |")
    print(f"| dense / sparse | {d['ms_per_step'] / s['ms_per_step']:.1f}x | "
          f"{d['bytes_per_step'] / s['bytes_per_step']:.1f}x | |")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if os.environ.get("RANK") is not None:  # inside the launched job
        job(args)
        return 0
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
