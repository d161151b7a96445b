"""Functions the integration tests run in every process of a local job (``run_processes``)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from kubeai_train import data
from kubeai_train import torch as kt
from kubeai_train.torch.trainer import TransformedBatches

FEATURES = kt.CTRFeatures(buckets=64)


def _digest(state: Any) -> str:
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            h.update(x.detach().contiguous().numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(str(k).encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        else:
            h.update(repr(x).encode())

    walk(state)
    return h.hexdigest()


def uneven(
    data_root: str, checkpoint_dir: str | None, epochs: int, num_workers: int, max_steps: int | None
) -> dict[str, Any]:
    """Rank r trains on ``<data_root>/rank<r>`` alone (shards of very different sizes)."""
    torch.set_num_threads(1)

    def main() -> dict[str, Any]:
        with kt.process_group(timeout_s=60) as ctx:
            torch.manual_seed(0)
            model = kt.DLRM(FEATURES.sizes, len(FEATURES.dense), dim=8)
            cfg = kt.TrainConfig(
                dense_lr=0.01,
                sparse_lr=0.05,
                checkpoint_dir=checkpoint_dir,
                checkpoint_every=7,
                num_workers=num_workers,
                max_steps=max_steps,
            )
            trainer = kt.Trainer(model, FEATURES, cfg, ctx)
            ds = data.read(
                os.path.join(data_root, f"rank{ctx.rank}"),
                batch_size=100,
                rank=0,
                world_size=1,
                **FEATURES.read_options(),
            )
            res = trainer.fit(ds, epochs=epochs)
            out = {
                "rank": ctx.rank,
                "steps": res.steps,
                "rows_per_rank": res.rows_per_rank,
                "resumed_from": res.resumed_from,
                "model": _digest(trainer.module.state_dict()),
                "optimizer": _digest(trainer.optimizer.state_dict()),
                "norms": [float(p.detach().double().norm()) for p in trainer.module.parameters()],
            }
            ctx.barrier()
            return out

    return kt.run(main)


def hung_peer(timeout_s: float) -> dict[str, Any]:
    """Rank 1 stops answering after the first collective; rank 0 must fail, not hang."""

    def main() -> dict[str, Any]:
        ctx = kt.init(timeout_s=timeout_s)
        t = torch.ones(1)
        with kt.guard("first all_reduce"):
            dist.all_reduce(t)
        if ctx.rank == 1:
            time.sleep(600)  # alive but silent
        t0 = time.monotonic()
        try:
            with kt.guard("second all_reduce"):
                dist.all_reduce(t)
        finally:
            print(f"rank {ctx.rank} waited {time.monotonic() - t0:.1f}s", flush=True)
        return {"rank": ctx.rank}

    return kt.run(main)


def slowed(data_root: str, per_row_s: float, slow_from: int, slow_until: int) -> dict[str, Any]:
    """``straggler="adaptive"``: every rank's forward sleeps ``per_row_s`` per row (a
    deterministic, compute-proportional cost), rank 1's twice that in steps
    ``[slow_from, slow_until)``: a 2x slowdown that is not CPU contention."""
    torch.set_num_threads(1)

    def main() -> dict[str, Any]:
        with kt.process_group(timeout_s=60) as ctx:
            torch.manual_seed(0)
            model = kt.DLRM(FEATURES.sizes, len(FEATURES.dense), dim=8)
            cfg = kt.TrainConfig(
                dense_lr=0.01,
                sparse_lr=0.05,
                log_every=5,
                straggler="adaptive",
                adaptive=kt.AdaptiveBatching(micro_batches=8, replan_every=4, slow_factor=1.5, slow_steps=2),
            )
            trainer = kt.Trainer(model, FEATURES, cfg, ctx)
            forward = trainer.module.forward

            def slow_forward(ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
                factor = 2 if ctx.rank == 1 and slow_from <= trainer.step < slow_until else 1
                time.sleep(factor * per_row_s * len(ids))
                return forward(ids, dense)

            trainer.module.forward = slow_forward  # type: ignore[method-assign]
            ds = data.read(
                os.path.join(data_root, f"rank{ctx.rank}"),
                batch_size=128,  # micro-batches of 16 rows
                rank=0,
                world_size=1,
                **FEATURES.read_options(),
            )
            res = trainer.fit(ds, epochs=1)
            assert res.straggler is not None
            out = {
                "rank": ctx.rank,
                "steps": res.steps,
                "rows_per_rank": res.rows_per_rank,
                "straggler": res.straggler.as_dict(),
                "model": _digest(trainer.module.state_dict()),
                "optimizer": _digest(trainer.optimizer.state_dict()),
            }
            ctx.barrier()
            return out

    return kt.run(main)


def backup_slowed(data_root: str, per_row_s: float, slow_from: int, slow_until: int) -> dict[str, Any]:
    """``straggler="backup"``: every rank's forward sleeps ``per_row_s`` per row, rank 1's three
    times that in steps ``[slow_from, slow_until)``. Returns, besides the report and digests,
    whether the rows trained on are exactly the rank's shard (each row once)."""
    torch.set_num_threads(1)

    def fingerprints(batch: dict[str, torch.Tensor]) -> list[bytes]:
        rows = torch.cat([batch["dense"], batch["ids"].to(torch.float32), batch["label"][:, None]], 1)
        return [r.numpy().tobytes() for r in rows]

    def main() -> dict[str, Any]:
        with kt.process_group(timeout_s=60) as ctx:
            torch.manual_seed(0)
            model = kt.DLRM(FEATURES.sizes, len(FEATURES.dense), dim=8)
            cfg = kt.TrainConfig(
                dense_lr=0.01,
                sparse_lr=0.05,
                log_every=5,
                straggler="backup",
                backup_workers=1,
                adaptive=kt.AdaptiveBatching(slow_factor=1.5, slow_steps=2),
            )
            trainer = kt.Trainer(model, FEATURES, cfg, ctx)
            forward = trainer.module.forward

            def slow_forward(ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
                factor = 3 if ctx.rank == 1 and slow_from <= trainer.step < slow_until else 1
                time.sleep(factor * per_row_s * len(ids))
                return forward(ids, dense)

            trainer.module.forward = slow_forward  # type: ignore[method-assign]
            trained: list[bytes] = []
            train_step = trainer._train_step

            def recording_step(batch: Any, scale: Any = None) -> Any:
                if batch is not None:
                    trained.extend(fingerprints(batch))
                return train_step(batch, scale)

            trainer._train_step = recording_step  # type: ignore[method-assign]

            def shard() -> Any:
                return data.read(
                    os.path.join(data_root, f"rank{ctx.rank}"),
                    batch_size=64,
                    rank=0,
                    world_size=1,
                    **FEATURES.read_options(),
                )

            res = trainer.fit(shard(), epochs=1)
            assert isinstance(res.straggler, kt.BackupReport)
            every = [f for b in TransformedBatches(shard().to_torch(), FEATURES) for f in fingerprints(b)]
            out = {
                "rank": ctx.rank,
                "steps": res.steps,
                "rows_per_rank": res.rows_per_rank,
                "straggler": res.straggler.as_dict(),
                "exactly_once": sorted(trained) == sorted(every) and len(set(every)) == len(every),
                "trained": len(trained),
                "model": _digest(trainer.module.state_dict()),
                "optimizer": _digest(trainer.optimizer.state_dict()),
            }
            ctx.barrier()
            return out

    return kt.run(main)


def adaptive_resume(data_root: str, ckpt: str, per_row_s: float, stop_at: int) -> dict[str, Any]:
    """``straggler="adaptive"`` with checkpoints: rank 1 is 2x slow, so the plan cuts local
    batches across reader batches; the first fit stops at ``stop_at`` with rows of a reader
    batch not trained on (the carry), a second trainer resumes. Returns whether every row of the
    rank's shard was trained on exactly once over both fits."""
    torch.set_num_threads(1)

    def fingerprints(batch: dict[str, torch.Tensor]) -> list[bytes]:
        rows = torch.cat([batch["dense"], batch["ids"].to(torch.float32), batch["label"][:, None]], 1)
        return [r.numpy().tobytes() for r in rows]

    def main() -> dict[str, Any]:
        with kt.process_group(timeout_s=60) as ctx:
            trained: list[bytes] = []

            def trainer(max_steps: int | None) -> kt.Trainer:
                torch.manual_seed(0)
                model = kt.DLRM(FEATURES.sizes, len(FEATURES.dense), dim=8)
                cfg = kt.TrainConfig(
                    dense_lr=0.01,
                    sparse_lr=0.05,
                    straggler="adaptive",
                    adaptive=kt.AdaptiveBatching(
                        micro_batches=8, replan_every=2, slow_factor=1.5, slow_steps=2
                    ),
                    checkpoint_dir=ckpt,
                    checkpoint_every=1000,
                    max_steps=max_steps,
                )
                t = kt.Trainer(model, FEATURES, cfg, ctx)
                forward, train_step = t.module.forward, t._train_step

                def slow_forward(ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
                    time.sleep((2 if ctx.rank == 1 else 1) * per_row_s * len(ids))
                    return forward(ids, dense)

                def recording_step(batch: Any, scale: Any = None) -> Any:
                    if batch is not None:
                        trained.extend(fingerprints(batch))
                    return train_step(batch, scale)

                t.module.forward = slow_forward  # type: ignore[method-assign]
                t._train_step = recording_step  # type: ignore[method-assign]
                return t

            def shard() -> Any:
                return data.read(
                    os.path.join(data_root, f"rank{ctx.rank}"),
                    batch_size=96,  # micro-batches of 12 rows
                    rank=0,
                    world_size=1,
                    num_epochs=1,
                    **FEATURES.read_options(),
                )

            first = trainer(stop_at).fit(shard(), epochs=1)
            ctx.barrier()
            with open(os.path.join(ckpt, f"step-{stop_at:012d}", f"data-{ctx.rank:05d}.json")) as f:
                state = json.load(f)
            second = trainer(None).fit(shard(), epochs=1)
            every = [f for b in TransformedBatches(shard().to_torch(), FEATURES) for f in fingerprints(b)]
            out = {
                "rank": ctx.rank,
                "first_steps": first.steps,
                "resumed_from": second.resumed_from,
                "carry_rows": state["carry"]["label"]["shape"][0] if state.get("carry") else 0,
                "plans": [p["sizes"] for p in first.straggler.plans] if first.straggler else [],
                "exactly_once": sorted(trained) == sorted(every) and len(set(every)) == len(every),
                "trained": len(trained),
                "rows": len(every),
            }
            ctx.barrier()
            return out

    return kt.run(main)
