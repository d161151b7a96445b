"""The DDP training loop: lockstep steps over uneven inputs, checkpoints, cross-rank metrics.

Uneven inputs. Ranks rarely get the same number of batches (files and row groups differ in
size). At the start of each step every rank all-reduces ``[has_batch, loss_sum, rows]`` (three
floats) asynchronously: a rank holding a batch does not wait for it, so like Join's per-step
all-reduce it stays off the critical path. A rank that has run out of data while others still
have some runs a *shadow step*: forward and backward over one dummy row with zero weight, so it
joins DDP's gradient all-reduce with zero gradients and then applies the same averaged gradient
as everyone else. The loop ends on every rank at the same step, when no rank has a batch left.
This is what ``torch.distributed.algorithms.Join`` does for DDP, plus what it does not: joined
ranks keep stepping their optimizers, so model *and optimizer state* stay identical on all ranks
(with Join, an early-finishing rank's Adam moments go stale and its model is re-synced only at
the end), and rank 0's checkpoint is valid at every step. The all-reduce also carries the loss,
so the logged loss is the job's, not rank 0's, at no extra collective.

Every row is trained on exactly once per epoch: the loop never drops a rank's tail.

With ``TrainConfig(straggler="adaptive")`` a step takes a planned number of rows per rank, cut
from the reader's batches, instead of one batch, and the same all-reduce also gathers every rank's compute time of the
previous step (:mod:`kubeai_train.torch.adaptive`). With ``straggler="backup"`` the same
all-reduce gathers the timings and who sat out or ran out, and up to ``backup_workers`` ranks
flagged slow sit steps out: no batch, a shadow step, a probe of their speed
(:mod:`kubeai_train.torch.backup`). The default ``"none"`` runs the loop above unchanged.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
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
from kubeai_train.torch.adaptive import (
    AdaptiveController,
    RowSlicer,
    StragglerReport,
    decode_carry,
    encode_carry,
    timing_slots,
)
from kubeai_train.torch.backup import BackupController, BackupReport
from kubeai_train.torch.checkpoint import CheckpointStore
from kubeai_train.torch.features import CTRFeatures
from kubeai_train.torch.group import DistContext, guard
from kubeai_train.torch.group import init as init_group
from kubeai_train.torch.optim import SplitOptimizer, split_parameters
from kubeai_train.torch.summary import ScalarWriter
from kubeai_train.torch.types import ConfigError, TrainConfig

__all__ = ["FitResult", "Trainer", "TransformedBatches"]

log = logging.getLogger(__name__)

# torch 2.13 renamed DDP's broadcast_buffers to forward_sync_buffers (the old name warns)
_NO_BUFFER_SYNC: dict[str, Any] = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    else {"broadcast_buffers": False}
)


class TorchSource(Protocol):
    """What ``kubeai_train.data.Dataset.to_torch()`` returns, as the trainer uses it."""

    def set_epoch(self, epoch: int) -> None: ...

    def state_dict(self, num_batches: int, num_workers: int = 0) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    def __iter__(self) -> Iterator[Mapping[str, Any]]: ...


class ResumableDataset(Protocol):
    """What the trainer needs from a ``kubeai_train.data`` dataset (read with ``num_epochs=1``;
    the trainer runs the epochs)."""

    def to_torch(self) -> TorchSource: ...


def _pass_done(source: TorchSource, taken: int, num_workers: int) -> bool:
    """True when ``taken`` batches are all this rank's loader delivers in the current pass.

    ``state_dict(n)`` replays the DataLoader's worker order (a pure function) and raises
    ValueError when the workers deliver fewer than ``n`` batches.
    """
    try:
        source.state_dict(taken + 1, num_workers)
    except ValueError:
        return True
    return False


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
        step_times: wall seconds of each step of this run on this rank.
        straggler: with ``straggler="adaptive"``, the plans and slow-rank detections; with
            ``"backup"``, which ranks sat out how many steps, and the detections.
    """

    steps: int
    rows: int
    rows_per_rank: list[int]
    loss: float
    resumed_from: int | None
    seconds: float
    examples_per_s: float
    step_times: list[float] = field(default_factory=list, repr=False)
    straggler: StragglerReport | BackupReport | None = None


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
        if self.ctx.backend == "nccl" and split_parameters(model)[0]:
            raise ConfigError(
                "nccl cannot all-reduce sparse gradients: build the model with sparse=False "
                "(e.g. DLRM(..., sparse=False)) or train on CPU with gloo"
            )
        self.module = model.to(self.ctx.device)
        # DDP broadcasts rank 0's parameters now, so every replica starts identical.
        with guard("wrapping the model in DDP (initial parameter broadcast)"):
            # The model's buffers are constants (row offsets, pair indices): no per-step buffer sync.
            self.ddp = DDP(self.module, **_NO_BUFFER_SYNC)
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
        self._epoch = 0  # the epoch a restored checkpoint was in
        self._epoch_done = False  # ... and whether this rank had taken all its batches of it
        self._resumed_from: int | None = None
        self._straggler_state: dict[str, Any] | None = None  # the adaptive plan a checkpoint held
        self._carry: dict[str, torch.Tensor] | None = None  # ... and the rows it had not trained on
        self._forward_done = 0.0  # when the last step's forward and loss were done
        if self.ctx.is_chief:  # the resolved config once per job (URIs without user:password@)
            log.info(
                "trainer: rank %d/%d device=%s %s",
                self.ctx.rank,
                self.ctx.world_size,
                self.ctx.device,
                re.sub(r"//[^/@'\s]*@", "//***@", repr(self.config)),
            )
        else:
            log.info(
                "trainer: rank %d/%d device=%s training its share of the data",
                self.ctx.rank,
                self.ctx.world_size,
                self.ctx.device,
            )

    # ---------------------------------------------------------------------------- resume

    def restore(self, source: TorchSource | None = None) -> int | None:
        """Load the latest committed checkpoint into the model, optimizers and ``source``.

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
        if source is not None and saved.get("data") is not None:
            source.load_state_dict(saved["data"])
        self._rows_before = int(saved.get("rows", 0))
        self._epoch = int(saved.get("epoch", 0))
        self._epoch_done = bool(saved.get("epoch_done", False))
        self._straggler_state = saved.get("straggler")
        self._carry = decode_carry(saved.get("carry"))
        self.step = ck.step
        self._resumed_from = ck.step
        if self.ctx.is_chief:
            log.info("resumed from %s (step %d, epoch %d)", ck.path, ck.step, self._epoch)
        return ck.step

    def checkpoint(
        self,
        data_state: dict[str, Any] | None,
        rows: int,
        epoch: int,
        epoch_done: bool,
        straggler: dict[str, Any] | None = None,
        carry: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Write a checkpoint of the current step (collective: every rank must call it).

        ``epoch_done``: this rank has taken every batch of ``epoch`` (its reader would start the
        next epoch from that position, while other ranks may still be in this one).
        ``straggler``: the adaptive batch plan and slow flags, resumed with the job.
        ``carry``: adaptive: the rows of the last reader batch not trained on yet (the data
        state is the position after that batch); a resumed rank trains on them first.
        """
        if self.store is None:
            return
        state: dict[str, Any] = {"data": data_state, "rows": rows, "epoch": epoch, "epoch_done": epoch_done}
        if straggler is not None:
            state["straggler"] = straggler
        if carry is not None:
            state["carry"] = encode_carry(carry)
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

    def _loader(self, source: Any) -> Iterator[dict[str, torch.Tensor]]:
        loader = DataLoader(
            TransformedBatches(source, self.features), batch_size=None, num_workers=self.config.num_workers
        )
        return iter(loader)

    def _reader_batch(self, data: ResumableDataset) -> int:
        """The reader's batch_size, the same on every rank (collective): the unit of the
        straggler modes' plans and weights."""
        mode = self.config.straggler
        g = getattr(getattr(data, "options", None), "batch_size", None)
        if not isinstance(g, int) or isinstance(g, bool) or g < 1:
            raise ConfigError(
                f"straggler={mode!r} takes the reader's batch_size as its unit of rows, got {g!r}; "
                "pass a dataset from kubeai_train.data.read(..., batch_size=ROWS)"
            )
        with guard("checking every rank's batch size"):
            both = torch.tensor([g, -g], dtype=torch.int64)
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
        if int(both[0]) != -int(both[1]):
            raise ConfigError(
                f"ranks read different batch_size values ({-int(both[1])}..{int(both[0])}, this rank {g}); "
                f"straggler={mode!r} needs the same batch_size on every rank"
            )
        return g

    def _backup(self, data: ResumableDataset) -> BackupController:
        """The controller of ``straggler="backup"``."""
        g = self._reader_batch(data)
        bk = BackupController(
            self.config.adaptive, self.ctx.world_size, self.ctx.rank, self.config.backup_workers, g
        )
        if self.ctx.is_chief:
            log.info(
                "straggler: backup workers, up to %d of %d ranks flagged slow (%.2fx the median per row "
                "for %d steps) sit steps out; local batch %d rows",
                self.config.backup_workers,
                self.ctx.world_size,
                self.config.adaptive.slow_factor,
                self.config.adaptive.slow_steps,
                g,
            )
        return bk

    def _observe_backup(self, bk: BackupController, step: int, sync: torch.Tensor, applies_from: int) -> None:
        """Feed step ``step``'s gathered timings and the ranks' ends of data (every rank, same numbers)."""
        n = self.ctx.world_size
        before = bk.sit_out
        line = bk.observe(step, sync[4 : 4 + 2 * n].tolist(), sync[4 + 2 * n :].tolist(), applies_from)
        if not self.ctx.is_chief:
            return
        if line:
            log.warning("straggler: %s (known at step %d)", line, applies_from - 1)
        if bk.sit_out != before:
            log.info("straggler: ranks %s sit out from step %d", sorted(bk.sit_out), applies_from)
            if self.writer is not None:
                self.writer.scalar("straggler/sitting_out", len(bk.sit_out), applies_from)

    def _probe(self, batch: dict[str, torch.Tensor]) -> tuple[int, float]:
        """A sitting rank's measure of its speed: forward and loss over part of ``batch``,
        without gradients or collectives (rows, seconds)."""
        p = BackupController.probe_rows(len(batch["label"]))
        device = self.ctx.device
        t = time.perf_counter()
        with torch.no_grad():
            logits = self.module(batch["ids"][:p].to(device), batch["dense"][:p].to(device))
            F.binary_cross_entropy_with_logits(logits, batch["label"][:p].to(device), reduction="sum")
        return p, time.perf_counter() - t

    def _adaptive(self, data: ResumableDataset) -> AdaptiveController:
        """The controller of ``straggler="adaptive"``; every rank must read the same batch_size, a
        multiple of ``adaptive.micro_batches`` (the plan's unit is their ratio)."""
        g = self._reader_batch(data)
        m = self.config.adaptive.micro_batches
        if g % m:
            raise ConfigError(
                f"straggler='adaptive' cuts the reader's batch_size {g} into adaptive.micro_batches={m} "
                f"micro-batches: make batch_size a multiple of {m} (e.g. {max(m, g - g % m)})"
            )
        ad = AdaptiveController(self.config.adaptive, self.ctx.world_size, self.ctx.rank, g // m)
        if self._straggler_state is not None:
            ad.load_state_dict(self._straggler_state, self.step)
        if self.ctx.is_chief:
            log.info(
                "straggler: adaptive local batches, %d rows per step over %d ranks in micro-batches of %d "
                "(cut from reader batches of %d), "
                "re-planned every %d steps; slow = %.2fx the median per row for %d steps",
                ad.global_rows,
                self.ctx.world_size,
                g // m,
                g,
                self.config.adaptive.replan_every,
                self.config.adaptive.slow_factor,
                self.config.adaptive.slow_steps,
            )
        return ad

    def _observe(self, ad: AdaptiveController, step: int, sync: torch.Tensor, applies_from: int) -> None:
        """Feed step ``step``'s gathered timings to the policies (every rank, same numbers)."""
        if step < 0:
            return
        line, changed = ad.observe(step, sync[3:].tolist(), applies_from)
        if not self.ctx.is_chief:
            return
        if line:
            log.warning("straggler: %s (known at step %d)", line, applies_from - 1)
        if changed:
            log.info("straggler: local batches %s rows from step %d", ad.sizes(), applies_from)
        if self.writer is not None and (line or changed):
            self.writer.scalar("straggler/slow_ranks", len(ad.report.flagged), applies_from - 1)
            for r, b in enumerate(ad.sizes()):
                self.writer.scalar(f"straggler/local_batch/{r}", b, applies_from - 1)

    def _dummy(self) -> dict[str, torch.Tensor]:
        n_cat, n_dense = len(self.features.categorical), len(self.features.dense)
        return {
            "ids": torch.zeros(1, n_cat, dtype=torch.int64),
            "dense": torch.zeros(1, n_dense, dtype=torch.float32),
            "label": torch.zeros(1, dtype=torch.float32),
        }

    def fit(self, data: ResumableDataset, epochs: int = 1) -> FitResult:
        """Train ``epochs`` passes over ``data``, resuming from the latest checkpoint.

        Every rank calls this with its own shard (``kubeai_train.data.read`` splits by rank,
        with ``num_epochs=1``: the trainer runs the epochs and calls ``set_epoch``). Ranks may
        hold different numbers of rows; all finish each epoch together and no row is skipped.
        A checkpoint is written every ``config.checkpoint_every`` steps and at the end.

        Raises:
            PeerFailedError: another rank died or hung (see :func:`kubeai_train.torch.run`).
            ConfigError: ``epochs`` < 1, or checkpoints with a dataset of ``num_epochs`` != 1.
        """
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            raise ConfigError(f"epochs must be an integer >= 1, got {epochs!r}")
        data_epochs = getattr(getattr(data, "options", None), "num_epochs", 1)
        if self.store is not None and data_epochs != 1:
            raise ConfigError(
                f"read the data with num_epochs=1 (got {data_epochs}) and pass epochs={epochs} "
                "to fit(): checkpoints hold a position within one epoch"
            )
        cfg = self.config
        # a dynamic assignment hands out pieces while reading: the dataset itself is the source
        # (read in this process; its state is the position after the batches trained on), since
        # batches DataLoader workers read ahead would count as delivered
        lazy = bool(getattr(data, "lazy", False))
        if lazy and self.store is not None and cfg.num_workers > 0:
            raise ConfigError(
                f"checkpoints with assignment='dynamic' need num_workers=0 (got {cfg.num_workers}): rows "
                "DataLoader workers read ahead count as delivered and a restart would skip them; the "
                "dataset's own prefetch thread still reads ahead of training"
            )
        source: Any = data if lazy and self.store is not None else data.to_torch()
        resumed = self.restore(source) is not None
        if lazy and self.store is not None:
            # rank 0 restores the dispatcher's state before any rank asks it for pieces
            self.ctx.barrier("restoring the data position")
        ad = self._adaptive(data) if cfg.straggler == "adaptive" else None
        bk = self._backup(data) if cfg.straggler == "backup" else None
        world = self.ctx.world_size
        no_timings: list[float] = [] if ad is None and bk is None else [0.0] * (2 * world)
        last: dict[str, torch.Tensor] | None = None  # backup: this rank's last batch (its probe)
        rows = self._rows_before
        start_step = self.step
        run_loss, run_rows = 0.0, 0
        win = [0.0, 0, time.perf_counter()]  # loss, rows, since
        step_times: list[float] = []
        self.ddp.train()
        t0 = time.perf_counter()
        last_ckpt = self.step
        epoch = self._epoch if resumed else 0
        stop = False
        taken = 0
        slicer: RowSlicer | None = None
        while epoch < epochs and not stop:
            if not (resumed and epoch == self._epoch):
                source.set_epoch(epoch)  # a resumed epoch keeps the position load_state_dict set
            # a rank restored at the end of its share of this epoch reads nothing more in it
            exhausted = resumed and epoch == self._epoch and self._epoch_done
            it = None if exhausted else self._loader(source)
            taken = 0  # batches of this pass trained on (what the data state counts)
            prev = (0.0, 0)  # this rank's loss sum and rows of the previous step
            prev_t = no_timings  # adaptive: this rank's (rows, compute seconds) slots of it
            # adaptive: local batches cut from the reader's batches, the resumed carry first
            carry, self._carry = (self._carry if resumed and epoch == self._epoch else None), None
            slicer = None if ad is None or it is None else RowSlicer(it, carry)
            if bk is not None:
                bk.new_pass()
            while True:
                if cfg.max_steps is not None and self.step >= cfg.max_steps:
                    stop = True
                    break
                ts = time.perf_counter()
                cur = self.step
                # take the next batch only now: a checkpoint written at the end of the previous
                # step must not count a batch that was fetched but not trained on
                # backup: a rank sitting out takes nothing and is not out of data
                sitting = bk is not None and bk.sits_out and not exhausted
                sat = frozenset() if bk is None else bk.sit_out  # observe() replaces it mid-step
                if ad is None:
                    pending = None if exhausted or sitting or it is None else next(it, None)
                    got = 1
                else:
                    pending = None if exhausted or slicer is None else slicer.take(ad.rows)
                    got = 0  # the slicer counts the reader batches it fetched
                exhausted = pending is None and not sitting
                # [ranks with a batch, previous step's loss sum, rows (, adaptive: every rank's
                # rows and compute seconds)]; asynchronous, so a rank with a batch goes straight
                # on (gloo runs a group's collectives in issue order, so this one always precedes
                # the step's gradient all-reduce on every rank)
                # (backup: [..., ranks sitting out, every rank's timings, every rank's end of data])
                ends: list[float] = []
                if bk is not None:
                    ends = [0.0] * world
                    ends[self.ctx.rank] = 1.0 if exhausted else 0.0
                sync = torch.tensor(
                    [
                        0.0 if pending is None else 1.0,
                        prev[0],
                        float(prev[1]),
                        *([] if bk is None else [1.0 if sitting else 0.0]),
                        *prev_t,
                        *ends,
                    ],
                    dtype=torch.float64,
                )
                with guard(f"step {self.step} (input sync)"):
                    work = dist.all_reduce(sync, async_op=True)
                    if pending is None:  # out of data: a shadow step, or the end of the epoch?
                        work.wait()
                if pending is None:
                    run_loss, run_rows = run_loss + float(sync[1]), run_rows + int(sync[2])
                    win[0], win[1] = win[0] + float(sync[1]), win[1] + int(sync[2])
                    if ad is not None:  # a new plan applies from this step when the pass ends here
                        self._observe(ad, cur - 1, sync, cur if sync[0] == 0 else cur + 1)
                    if bk is not None:
                        self._observe_backup(bk, cur - 1, sync, cur if sync[0] == 0 else cur + 1)
                    if sync[0] == 0:
                        if bk is not None and sync[3] > 0:
                            # the others ran out while the last holders sat out: nobody trains
                            # (every rank sees it here), no update; they train from the next
                            bk.skipped()
                            prev, prev_t = (0.0, 0), no_timings
                            continue
                        break
                probe = self._probe(last) if sitting and last is not None else (0, 0.0)
                scale = ad.loss_scale if ad is not None else (None if bk is None else bk.loss_scale)
                loss_sum, n = self._train_step(pending, scale)
                compute = self._forward_done - ts
                self.step += 1
                if bk is not None:
                    bk.stepped(sat)
                if pending is not None:
                    with guard(f"step {self.step - 1} (input sync)"):
                        work.wait()  # long done: the gradient all-reduce came after it
                    run_loss, run_rows = run_loss + float(sync[1]), run_rows + int(sync[2])
                    win[0], win[1] = win[0] + float(sync[1]), win[1] + int(sync[2])
                    if ad is not None:  # this step's batches are taken: a plan applies from the next
                        self._observe(ad, cur - 1, sync, cur + 1)
                    if bk is not None:
                        self._observe_backup(bk, cur - 1, sync, cur + 1)
                        last = pending
                    taken = slicer.fetched if slicer is not None else taken + got
                    rows += n
                prev = (loss_sum, n)
                if ad is not None:
                    prev_t = timing_slots(self.ctx.world_size, self.ctx.rank, n, compute if n else 0.0)
                elif bk is not None:
                    r_, s_ = probe if sitting else (n, compute if n else 0.0)
                    prev_t = timing_slots(world, self.ctx.rank, r_, s_)
                step_times.append(time.perf_counter() - ts)
                if self.ctx.is_chief and self.step % cfg.log_every == 0:
                    self._log_window(win)
                if self.store is not None and self.step % cfg.checkpoint_every == 0:
                    state = source.state_dict() if lazy else source.state_dict(taken, cfg.num_workers)
                    left = None if slicer is None else slicer.carry()
                    self.checkpoint(
                        state,
                        rows,
                        epoch,
                        # a dynamic dataset's state knows by itself whether its epoch is done
                        left is None
                        and (exhausted or (not lazy and _pass_done(source, taken, cfg.num_workers))),
                        None if ad is None else ad.state_dict(),
                        left,
                    )
                    last_ckpt = self.step
            if stop:
                # the last step's loss was never all-reduced; the sums stay exact without it
                break
            epoch += 1
        seconds = time.perf_counter() - t0
        if self.store is not None and self.step != last_ckpt:
            # ``taken`` counts the batches of the last pass: all of them unless max_steps stopped it
            state = source.state_dict() if lazy else source.state_dict(taken, cfg.num_workers)
            left = None if slicer is None or not stop else slicer.carry()
            done = left is None and (not stop or (not lazy and _pass_done(source, taken, cfg.num_workers)))
            self.checkpoint(
                state, rows, min(epoch, epochs - 1), done, None if ad is None else ad.state_dict(), left
            )
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
            straggler=ad.report if ad is not None else (None if bk is None else bk.report),
        )
        if self.ctx.is_chief:
            log.info(
                "trained %d steps (%d in this run), %d rows (%s per rank), loss %.5f, %.0f examples/s",
                result.steps,
                result.steps - start_step,
                result.rows,
                rows_per_rank,
                result.loss,
                result.examples_per_s,
            )
            if self.writer is not None:
                self.writer.scalar("train/run_loss", result.loss, self.step)
                self.writer.flush()
        return result

    def _train_step(
        self, batch: dict[str, torch.Tensor] | None, scale: float | None = None
    ) -> tuple[float, int]:
        """One DDP step; ``None`` is a shadow step (zero gradients, same optimizer update).

        ``scale``: the factor on the summed loss (adaptive batches); None takes the mean.
        """
        real = batch is not None
        if batch is None:
            batch = self._dummy()
        device = self.ctx.device
        ids = batch["ids"].to(device, non_blocking=True)
        dense = batch["dense"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        self.optimizer.zero_grad()
        logits = self.ddp(ids, dense)
        loss_sum = F.binary_cross_entropy_with_logits(logits, label, reduction="sum")
        n = len(label)
        if not real:
            loss = loss_sum * 0.0
        else:
            loss = loss_sum / n if scale is None else loss_sum * scale
        self._forward_done = time.perf_counter()
        with guard(f"step {self.step} (gradient all-reduce)"):
            loss.backward()
        self.optimizer.step()
        return (float(loss_sum.detach()), n) if real else (0.0, 0)

    def _log_window(self, win: list[Any]) -> None:
        loss, n, since = win
        if not n:
            return
        now = time.perf_counter()
        mean = loss / n
        log.info("step %d loss %.5f %.0f examples/s", self.step, mean, n / (now - since))
        if self.writer is not None:
            self.writer.scalar("train/loss", mean, self.step)
            self.writer.scalar("train/examples_per_s", n / (now - since), self.step)
        win[:] = [0.0, 0, now]

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
        for batch in self._loader(data.to_torch()):
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
