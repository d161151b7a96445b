"""The DDP training loop: lockstep steps over uneven inputs, checkpoints, cross-rank metrics.

Uneven inputs. Ranks rarely get the same number of batches (files and row groups differ in
size). Before each step every rank all-reduces ``[has_batch, loss_sum, rows]`` of three floats;
a rank that has run out of data but sees others still going runs a *shadow step*: a forward and
backward pass over one dummy row with zero weight, so it joins DDP's gradient all-reduce with
zero gradients and then applies the same averaged gradient as everyone else. The loop ends on
every rank at the same step, when no rank has a batch left. This is what
``torch.distributed.algorithms.Join`` does for DDP, plus one thing it does not: joined ranks keep
stepping their optimizers, so model *and optimizer state* stay identical on all ranks (with Join,
an early-finishing rank's Adam moments go stale and its model is only re-synced at the end), and
rank 0's checkpoint is valid at every step. The all-reduce also carries the loss, so the logged
loss is the job's, not rank 0's, at no extra collective.

Every row is trained on exactly once per epoch: the loop never drops a rank's tail.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, IterableDataset

from kubeai_train.torch import metrics as metrics_mod
from kubeai_train.torch.checkpoint import CheckpointStore
from kubeai_train.torch.features import CTRFeatures
from kubeai_train.torch.group import DistContext, guard
from kubeai_train.torch.group import init as init_group
from kubeai_train.torch.optim import SplitOptimizer
from kubeai_train.torch.summary import ScalarWriter
from kubeai_train.torch.types import TrainConfig

__all__ = ["FitResult", "Trainer", "TransformedBatches"]

log = logging.getLogger(__name__)


class ResumableDataset(Protocol):
    """What the trainer needs from a ``kubeai_train.data`` dataset."""

    def to_torch(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class TransformedBatches(IterableDataset):
    """Applies ``features.transform`` to each batch of ``source`` and makes tensors; runs inside
    DataLoader workers when there are any, so hashing happens off the training thread."""

    def __init__(self, source: Iterable[Mapping[str, Any]], features: CTRFeatures) -> None:
        super().__init__()
        self.source = source
        self.features = features

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.source:
            arrays = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            out = self.features.transform(arrays)
            yield {k: torch.from_numpy(v) for k, v in out.items()}


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` did, the same on every rank (global counts).

    Attributes:
        steps: global steps taken (this run plus any resumed checkpoint).
        rows: training rows over all ranks (resumed rows included).
        rows_per_rank: rows each rank trained on.
        loss: mean training loss over the rows of this run.
        resumed_from: the checkpoint step this run started from, or None.
        seconds: wall time of the loop.
        examples_per_s: rows of this run per second over all ranks.
    """

    steps: int
    rows: int
    rows_per_rank: list[int]
    loss: float
    resumed_from: int | None
    seconds: float
    examples_per_s: float
    step_times: list[float] = field(default_factory=list, repr=False)


class Trainer:
    """Trains a CTR model with DDP over this process's group.

    Args:
        model: a module ``model(ids, dense) -> logits`` (e.g. :class:`~kubeai_train.torch.model.DLRM`).
            Parameters of ``sparse=True`` embeddings get SparseAdam, the rest Adam.
        features: turns raw batches into ``ids`` / ``dense`` / ``label``.
        config: learning rates, checkpoints, logging.
        ctx: the process group; default :func:`kubeai_train.torch.init` (one process: a group of one).
        optimizer: override the optimizer pair (built from ``config`` when None).
    """

    def __init__(
        self,
        model: nn.Module,
        features: CTRFeatures,
        config: TrainConfig | None = None,
        ctx: DistContext | None = None,
        optimizer: SplitOptimizer | None = None,
    ) -> None:
        self.config = config or TrainConfig()
        self.ctx = ctx or init_group()
        self.features = features
        self.module = model.to(self.ctx.device)
        # DDP broadcasts rank 0's parameters now, so every replica starts identical.
        with guard("wrapping the model in DDP (initial parameter broadcast)"):
            # The model's buffers are constants (row offsets, pair indices): no per-step buffer sync.
            self.ddp = DDP(self.module, forward_sync_buffers=False)
        self.optimizer = optimizer or SplitOptimizer(
            self.module, dense_lr=self.config.dense_lr, sparse_lr=self.config.sparse_lr
        )
        self.store = (
            CheckpointStore(self.config.checkpoint_dir, keep=self.config.keep_checkpoints)
            if self.config.checkpoint_dir
            else None
        )
        self.writer = ScalarWriter(self.config.log_dir) if self.config.log_dir and self.ctx.is_chief else None
        self.step = 0
        self._rows_before = 0  # rows of this rank restored from a checkpoint
        self._resumed_from: int | None = None
        log.info(
            "trainer: rank %d/%d device=%s %s",
            self.ctx.rank,
            self.ctx.world_size,
            self.ctx.device,
            self.config,
        )

    # ---------------------------------------------------------------------------- resume

    def restore(self, data: ResumableDataset | None = None) -> int | None:
        """Load the latest committed checkpoint into the model, optimizers and ``data``.

        Returns the step resumed from, or None when there is no checkpoint. Called by
        :meth:`fit`; call it yourself only to restore without training.
        """
        if self.store is None:
            return None
        ck = self.store.load(self.ctx.rank, self.ctx.world_size)
        if ck is None:
            return None
        self.module.load_state_dict(ck.model)
        self.optimizer.load_state_dict(ck.optimizer)
        saved = ck.data or {}
        if data is not None and saved.get("data") is not None:
            data.load_state_dict(saved["data"])
        self._rows_before = int(saved.get("rows", 0))
        self.step = ck.step
        self._resumed_from = ck.step
        if self.ctx.is_chief:
            log.info("resumed from %s (step %d)", ck.path, ck.step)
        return ck.step

    def checkpoint(self, data: ResumableDataset | None, rows: int) -> None:
        """Write a checkpoint of the current step (collective: every rank must call it)."""
        if self.store is None:
            return
        state = {"data": data.state_dict() if data is not None else None, "rows": rows}
        self.store.write_data_state(self.step, self.ctx.rank, state)
        self.ctx.barrier(f"checkpoint barrier at step {self.step}")
        if self.ctx.is_chief:
            path = self.store.commit(
                self.step, self.ctx.world_size, self.module.state_dict(), self.optimizer.state_dict(), {}
            )
            log.info("checkpoint %s", path)
        # nobody may run ahead and delete or overwrite before the commit is visible
        self.ctx.barrier(f"checkpoint commit at step {self.step}")

    # ---------------------------------------------------------------------------- train

    def _loader(self, data: ResumableDataset) -> Iterator[dict[str, torch.Tensor]]:
        source = TransformedBatches(data.to_torch(), self.features)
        loader = DataLoader(source, batch_size=None, num_workers=self.config.num_workers)
        return iter(loader)

    def _dummy(self) -> dict[str, torch.Tensor]:
        n_cat, n_dense = len(self.features.categorical), len(self.features.dense)
        return {
            "ids": torch.zeros(1, n_cat, dtype=torch.int64),
            "dense": torch.zeros(1, n_dense, dtype=torch.float32),
            "label": torch.zeros(1, dtype=torch.float32),
        }

    def fit(self, data: ResumableDataset) -> FitResult:
        """Train on every batch of ``data`` (all its epochs), resuming from the latest checkpoint.

        Every rank calls this with its own shard (``kubeai_train.data.read`` splits by rank).
        Ranks may hold different numbers of rows; all finish together and no row is skipped.
        A checkpoint is written every ``config.checkpoint_every`` steps and at the end.

        Raises:
            PeerFailedError: another rank died or hung (see :func:`kubeai_train.torch.run`).
        """
        self.restore(data)
        cfg = self.config
        device = self.ctx.device
        it = self._loader(data)
        rows = self._rows_before
        start_step = self.step
        exhausted = False
        carry = torch.zeros(3, dtype=torch.float64)  # [has_batch, loss_sum, rows] of the last step
        run_loss, run_rows = 0.0, 0
        win_loss, win_rows, win_t = 0.0, 0, time.perf_counter()
        step_times: list[float] = []
        self.ddp.train()
        t0 = time.perf_counter()
        last_ckpt = self.step
        while True:
            if cfg.max_steps is not None and self.step >= cfg.max_steps:
                break
            ts = time.perf_counter()
            # take the next batch only now: a checkpoint written at the end of the previous
            # step must not count a batch that was fetched but not trained on
            pending = None if exhausted else next(it, None)
            exhausted = pending is None
            carry[0] = 1.0 if pending is not None else 0.0
            with guard(f"step {self.step} (input sync)"):
                dist.all_reduce(carry)
            if self.step > start_step:  # carry now holds the previous step's global loss
                run_loss += float(carry[1])
                run_rows += int(carry[2])
                win_loss += float(carry[1])
                win_rows += int(carry[2])
            if carry[0] == 0:
                break
            real = pending is not None
            batch = pending if pending is not None else self._dummy()
            ids = batch["ids"].to(device, non_blocking=True)
            dense = batch["dense"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
            self.optimizer.zero_grad()
            logits = self.ddp(ids, dense)
            loss_sum = F.binary_cross_entropy_with_logits(logits, label, reduction="sum")
            n = len(label)
            loss = loss_sum / n if real else loss_sum * 0.0
            with guard(f"step {self.step} (gradient all-reduce)"):
                loss.backward()
            self.optimizer.step()
            self.step += 1
            carry = torch.tensor(
                [0.0, float(loss_sum.detach()) if real else 0.0, float(n) if real else 0.0],
                dtype=torch.float64,
            )
            if real:
                rows += n
            step_times.append(time.perf_counter() - ts)
            if self.ctx.is_chief and self.step % cfg.log_every == 0 and win_rows:
                now = time.perf_counter()
                mean = win_loss / win_rows
                log.info("step %d loss %.5f %.0f examples/s", self.step, mean, win_rows / (now - win_t))
                if self.writer is not None:
                    self.writer.scalar("train/loss", mean, self.step)
                    self.writer.scalar("train/examples_per_s", win_rows / (now - win_t), self.step)
                win_loss, win_rows, win_t = 0.0, 0, now
            if self.store is not None and self.step % cfg.checkpoint_every == 0:
                # before the next batch is taken, so the data state covers exactly the rows trained
                self.checkpoint(data, rows)
                last_ckpt = self.step
        seconds = time.perf_counter() - t0
        if self.store is not None and self.step != last_ckpt:
            self.checkpoint(data, rows)
        with guard("summing rows over ranks"):
            per_rank = torch.zeros(self.ctx.world_size, dtype=torch.int64)
            per_rank[self.ctx.rank] = rows
            dist.all_reduce(per_rank)
        rows_per_rank = [int(x) for x in per_rank]
        result = FitResult(
            steps=self.step,
            rows=sum(rows_per_rank),
            rows_per_rank=rows_per_rank,
            loss=run_loss / run_rows if run_rows else math.nan,
            resumed_from=self._resumed_from,
            seconds=seconds,
            examples_per_s=run_rows / seconds if seconds > 0 else math.nan,
            step_times=step_times,
        )
        if self.ctx.is_chief:
            log.info(
                "trained %d steps, %d rows (%s per rank), loss %.5f, %.0f examples/s",
                result.steps,
                result.rows,
                rows_per_rank,
                result.loss,
                result.examples_per_s,
            )
            if self.writer is not None:
                self.writer.scalar("train/epoch_loss", result.loss, self.step)
                self.writer.flush()
        return result

    # ---------------------------------------------------------------------------- eval

    @torch.no_grad()
    def predict(self, ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Click probabilities of the live model (no DDP, no collectives)."""
        self.module.eval()
        try:
            return torch.sigmoid(self.module(ids.to(self.ctx.device), dense.to(self.ctx.device))).cpu()
        finally:
            self.module.train()

    def evaluate(self, data: ResumableDataset) -> dict[str, float]:
        """AUC, log loss and row counts over every rank's share of ``data`` (collective).

        Each rank predicts its shard; predictions and labels are gathered to every rank, so
        the AUC is exact. Rank 0 logs the result and writes ``eval/*`` summaries.
        """
        labels: list[np.ndarray] = []
        preds: list[np.ndarray] = []
        for batch in self._loader(data):
            preds.append(self.predict(batch["ids"], batch["dense"]).numpy())
            labels.append(batch["label"].numpy())
        y = np.concatenate(labels) if labels else np.zeros(0)
        p = np.concatenate(preds) if preds else np.zeros(0)
        ys, ps = metrics_mod.gather(y, p)
        result = metrics_mod.summarize(ys, ps)
        if self.ctx.is_chief:
            log.info("eval: %s", result)
            if self.writer is not None:
                for k in ("auc", "logloss"):
                    self.writer.scalar(f"eval/{k}", result[k], self.step)
                self.writer.flush()
        return result

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
