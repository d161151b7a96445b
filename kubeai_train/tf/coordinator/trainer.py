"""TF2 coordinator mode: ParameterServerStrategy + ClusterCoordinator on the chief.

``run(model, config, options=...)`` is the one entry every process of a TF job calls (the same
``TF_CONFIG`` roles as the between-graph ``kubeai_train.tf.run``; choose the mode per job):

* **ps** and **worker**: start ``tf.distribute.Server(cluster, job, index, protocol="grpc")`` and
  serve until the chief writes ``<model_dir>/_COORD_DONE.json`` (then exit 0, so a local job and a
  TFJob end cleanly), or until killed.
* **chief**: sets ``GRPC_FAIL_FAST=use_caller``, connects (``TFConfigClusterResolver``; retried
  up to ``connect_timeout`` while servers come up), builds the user's ``tf.Module`` under the
  strategy with variables placed by the placement policy (see ``.placement``) and large
  tables sharded by ``MinSizePartitioner`` / ``FixedShardsPartitioner``, restores the latest
  checkpoint if there is one, and schedules training steps onto whichever worker is free.
  Input comes from the chief's readers (``input="chief"``: each batch travels with its step) or
  from ``tf.data`` file readers on the workers (``input="workers"``); see ``.input``.
* no cluster: the same model, optimizer and step function in one process (the baseline).

Failures: a worker that dies is absorbed by the coordinator (its closures run on the other
workers; it rejoins when restarted). The step it was running as it died may already have updated
the PS and is run again: at-least-once for that one step (ClusterCoordinator re-runs a failed
closure), every other batch exactly once. A parameter server that dies loses the model, so the chief
exits with RETRYABLE_EXIT_CODE (138): the restart policy (``ExitCode``) restarts it, and it
restores the last checkpoint (model, optimizer, step and every reader's position) and carries
on. After training the chief restores the final checkpoint into a local copy of the model,
exports a SavedModel whose serving signature takes the raw features, evaluates exactly that
(AUC, log loss) and publishes it to the model repository, like the between-graph mode.

``model_dir`` is a path TensorFlow writes (local, a shared volume, gs://: each PS writes its own
checkpoint shard there, through ``tf.train.CheckpointManager``) or any fsspec URL (oss://...:
the chief reads every variable and writes the checkpoint into its local staging, then uploads
it; see ``.checkpoints`` for the commit order and the chief's memory cost). Markers, the
placement report, the eval sample, the export and the done marker go through the same
:class:`~kubeai_train.tf.model_dir.ModelDir`, so every role needs the store's credentials.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from kubeai_train import cluster
from kubeai_train.tf import export as _export
from kubeai_train.tf.balanced import BalancedPlacement, load_report, measured_line, placement_policy
from kubeai_train.tf.checkpoint_store import RETRYABLE_ERRORS
from kubeai_train.tf.coordinator.balanced import (
    PlanPartitioner,
    TrafficMeter,
    plan_build,
    planned_loads,
    resident_bytes,
)
from kubeai_train.tf.coordinator.checkpoints import chief_io_device, object_checkpoints
from kubeai_train.tf.coordinator.input import (
    ChiefReader,
    list_native,
    native_counts,
    tensor_spec,
    worker_dataset_fn,
    write_native,
)
from kubeai_train.tf.coordinator.models import DeepFMModule, DeepFMModuleModel
from kubeai_train.tf.coordinator.optim import Adagrad
from kubeai_train.tf.coordinator.placement import PlanApplier, infos, snapshot_build, verify
from kubeai_train.tf.coordinator.types import CoordinatorOptions, ModuleModel
from kubeai_train.tf.model_dir import ModelDir, check_url, write_export
from kubeai_train.tf.placement_policies import check_plan
from kubeai_train.tf.reading import ReadFn, default_read_fn
from kubeai_train.tf.types import (
    RETRYABLE_EXIT_CODE,
    ClusterUnavailableError,
    PlacementPolicy,
    RunResult,
    StepInfo,
    TrainConfig,
    TrainError,
)

__all__ = [
    "CoordinatorOptions",
    "DeepFMModule",
    "DeepFMModuleModel",
    "ModuleModel",
    "RunResult",
    "load_serving",
    "run",
    "write_native",
]

log = logging.getLogger("kubeai_train.tf")

MODE = "coordinator"
DONE_MARKER = "_COORD_DONE.json"
TRAINED_MARKER = _export.TRAINED_MARKER
PUBLISHED_MARKER = _export.PUBLISHED_MARKER
PLACEMENT_REPORT = "placement.json"
EVAL_SAMPLE = _export.EVAL_SAMPLE

_RETRYABLE = RETRYABLE_ERRORS


def run(
    model: ModuleModel,
    config: TrainConfig,
    *,
    options: CoordinatorOptions | None = None,
    placement: PlacementPolicy | str | None = None,
    read_fn: ReadFn | None = None,
    exit_on_retryable: bool = True,
) -> RunResult:
    """Run this process's role of a coordinator-mode job (see the module doc).

    Args:
        model: the user's model (a ``tf.Module`` factory, raw features -> logits).
        config: the shared training configuration (``sync`` / ``backup_workers`` do not apply:
            closures run asynchronously on whichever worker is free).
        options: coordinator-mode options (input path, reader threads, partitioner).
        placement: the placement policy or its name (``"round_robin"``, the default as in
            TensorFlow; ``"greedy_bytes"``; ``"balanced"``: the ``balance/`` planner decides
            every embedding table's shard count and every shard's PS, replacing the
            ``min_shard_bytes`` / ``fixed_shards`` partitioner). Whatever the policy, the chief
            measures the per-PS resident bytes and per-step traffic and reports them beside the
            plan's (log, ``placement.json``, the published version's ``"placement"``).
        read_fn: the reader (default ``kubeai_train.data.read``).
        exit_on_retryable: on a lost PS, the chief exits with RETRYABLE_EXIT_CODE (what a TFJob
            restart policy and the local launcher retry) instead of raising ClusterUnavailableError.

    Returns:
        RunResult of this process (the chief's holds the metrics, placement and version).

    Raises:
        TrainError: a bad configuration or model, or an evaluator role.
        ClusterUnavailableError: the cluster could not be reached within ``connect_timeout``
            (or a PS was lost and ``exit_on_retryable`` is False).
    """
    _setup_logging()
    opts = options or CoordinatorOptions()
    if config.sync or config.backup_workers:
        raise TrainError(
            "sync / backup_workers are between-graph options; the coordinator mode trains "
            "asynchronously (each step on whichever worker is free): drop them or use kubeai_train.tf.run"
        )
    # every role opens the model directory first: a scheme nobody can write fails here, in one
    # line, before any server starts or the chief connects
    model_dir = ModelDir(
        config.model_dir, storage_options=config.storage_options, staging_dir=config.staging_dir
    )
    check_export_dir(config.export_dir, config.storage_options)
    info = cluster.current()
    policy = placement_policy(placement)
    if getattr(policy, "rebalance", None) is not None:
        log.warning(
            "runtime rebalancing is implemented in between-graph mode only; coordinator mode keeps the plan"
        )
    read = read_fn or default_read_fn
    if info.is_chief or info.framework != "tf":  # the resolved config once per job
        log.info(
            "[%s %d] kubeai_train.tf coordinator mode: ps %d, workers %d, policy %s, options %s, config %s",
            info.role,
            info.index,
            len(info.cluster.get("ps", ())),
            len(info.cluster.get("worker", ())),
            policy.name,
            json.dumps(opts.__dict__, sort_keys=True, default=str),
            json.dumps(config.describe(), default=str, sort_keys=True),
        )
    else:
        log.info(
            "[%s %d] kubeai_train.tf coordinator mode: %s until the job is done",
            info.role,
            info.index,
            "serving variables" if info.role == "ps" else "running the steps the chief schedules",
        )
    if info.framework != "tf":
        return _Trainer(model, config, opts, info, policy, read, model_dir).train()
    if info.role in ("ps", "worker"):
        return _serve(info, model_dir, opts)
    if info.role == "evaluator":
        raise TrainError(
            "the evaluator role is not used in coordinator mode: the chief evaluates after training; "
            "launch without --evaluator"
        )
    if not info.cluster.get("ps") or not info.cluster.get("worker"):
        raise TrainError(
            f"coordinator mode needs ps and worker tasks, TF_CONFIG has {sorted(info.cluster)}; "
            "launch with --ps N --workers M (and a chief)"
        )
    # Fail RPCs to an unreachable task at once instead of waiting on them, so that a lost PS
    # surfaces as an error the chief can act on (TensorFlow's recommendation for the coordinator).
    os.environ["GRPC_FAIL_FAST"] = "use_caller"
    try:
        return _Trainer(model, config, opts, info, policy, read, model_dir).train()
    except ClusterUnavailableError as e:
        log.error(
            "[chief %d] %s; exiting with %d so the job restarts and restores its checkpoint",
            info.index,
            e,
            RETRYABLE_EXIT_CODE,
        )
        if exit_on_retryable:
            sys.stdout.flush()
            sys.stderr.flush()
            logging.shutdown()
            os._exit(RETRYABLE_EXIT_CODE)  # the coordinator's threads can block a normal exit
        raise


def check_export_dir(url: str | None, storage_options: Mapping[str, Any]) -> None:
    """Fail now, not after training, when ``url`` (an export_dir) is in a place nobody can write.

    Raises:
        TrainError: naming export_dir and its scheme.
    """
    check_url(url, storage_options, "export_dir")


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def _cluster_spec(info: cluster.ClusterInfo) -> dict[str, list[str]]:
    return {("chief" if k == "master" else k): v for k, v in info.cluster_spec().items() if k != "evaluator"}


def _serve(info: cluster.ClusterInfo, model_dir: ModelDir, opts: CoordinatorOptions) -> RunResult:
    """A ps / worker task: serve until the chief's done marker appears in ``model_dir``.

    A failed check of the marker (an object store that does not answer for a moment) is logged
    and retried: the server keeps serving, the chief's state is not lost over a read error.
    """
    t0 = time.perf_counter()
    server = tf.distribute.Server(
        tf.train.ClusterSpec(_cluster_spec(info)),
        job_name=info.role,
        task_index=info.index,
        protocol="grpc",
        start=True,
    )
    log.info("[%s %d] serving at %s (pid %d)", info.role, info.index, info.address, os.getpid())
    last_warning = 0.0
    while True:
        try:
            if model_dir.exists(DONE_MARKER):
                break
        except Exception as e:  # any client error of any fsspec implementation: retried
            if time.monotonic() - last_warning > 60:
                last_warning = time.monotonic()
                log.warning(
                    "[%s %d] cannot check %s/%s (%s); still serving, retrying",
                    info.role,
                    info.index,
                    model_dir.display,
                    DONE_MARKER,
                    type(e).__name__,
                )
        time.sleep(opts.done_poll)
    log.info("[%s %d] job done after %.1f s; stopping", info.role, info.index, time.perf_counter() - t0)
    del server
    return RunResult(role=info.role, rank=info.index, seconds=time.perf_counter() - t0)


class _Local:
    """The result of a step run in this process, shaped like a RemoteValue."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def fetch(self) -> Any:
        return tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, self.value)


def _trainables(created: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    seen: set[int] = set()
    for v in created:
        parts = v.variables if hasattr(v, "variables") and not isinstance(v, tf.Variable) else [v]
        for p in parts:
            if getattr(p, "trainable", False) and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


class _Serving(tf.Module):
    """The exported module: raw features in, ``probability`` and ``logits`` out."""

    def __init__(self, module: Any, raw: Mapping[str, str]) -> None:
        super().__init__(name="serving")
        self.model = module
        spec = {
            n: tf.TensorSpec([None], tf.string if k == "string" else tf.float32, name=n)
            for n, k in raw.items()
        }
        self.serve = tf.function(self._serve, input_signature=[spec])

    def _serve(self, features: Mapping[str, Any]) -> dict[str, Any]:
        logits = self.model(features, training=False)
        return {"probability": tf.sigmoid(logits), "logits": logits}


class _Predictor:
    """What ``kubeai_train.tf.export.evaluate`` needs: ``.model`` and ``.predict(batch)``."""

    def __init__(self, model: ModuleModel, serving: _Serving) -> None:
        self.model = model
        self.serving = serving
        self.raw = dict(model.raw_features())

    def predict(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        feats = {n: tf.constant(batch[n]) for n in self.raw}
        return self.serving.serve(feats)["probability"].numpy()


def load_serving(export_dir: str) -> Any:
    """Load an exported model; ``fn(**raw_features)["probability"]`` predicts (no training code)."""
    return tf.saved_model.load(export_dir).signatures[_export.SIGNATURE]


class _Trainer:
    """The chief (or the single local process): build, restore, schedule steps, finish."""

    def __init__(
        self,
        model: ModuleModel,
        config: TrainConfig,
        opts: CoordinatorOptions,
        info: cluster.ClusterInfo,
        policy: PlacementPolicy,
        read: ReadFn,
        model_dir: ModelDir,
    ) -> None:
        self.model, self.config, self.opts, self.info, self.policy, self.read = (
            model,
            config,
            opts,
            info,
            policy,
            read,
        )
        self.distributed = info.framework == "tf"
        self.num_ps = len(info.cluster.get("ps", ())) if self.distributed else 0
        self.num_workers = len(info.cluster.get("worker", ())) if self.distributed else 1
        self.job = "chief" if self.distributed else "local"
        self.tag = f"[{self.job} {info.index}]"
        self.raw = dict(model.raw_features())
        self.kinds = {**self.raw, model.label: "int64"}
        self.model_dir = config.model_dir
        self.dir = model_dir
        # without a tf.train.Checkpoint until _build: enough to export a finished job's checkpoint
        self.ckpts = object_checkpoints(self.dir)
        self.strategy: Any = None
        self.coordinator: Any = None
        self.placement: dict[str, Any] | None = None
        self.meter: TrafficMeter | None = None
        self.planned_loads: tuple[list[float], list[float]] = ([], [])
        self.resident: list[int] = []
        self.plan_partitioner = PlanPartitioner()
        self.dir.makedirs()

    # ----------------------------------------------------------------------------- set-up
    def _partitioner(self) -> Any:
        parts = tf.distribute.experimental.partitioners
        if isinstance(self.policy, BalancedPlacement):
            return self.plan_partitioner  # cuts at the plan's counts (bound in _build)
        if self.opts.fixed_shards:
            return parts.FixedShardsPartitioner(self.opts.fixed_shards)
        return parts.MinSizePartitioner(
            min_shard_bytes=self.opts.min_shard_bytes, max_shards=self.opts.max_shards or self.num_ps
        )

    def _connect(self) -> None:
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        deadline = time.monotonic() + self.opts.connect_timeout
        while True:
            try:
                self.strategy = tf.distribute.ParameterServerStrategy(
                    resolver, variable_partitioner=self._partitioner()
                )
                break
            except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError) as e:
                if time.monotonic() > deadline:
                    raise ClusterUnavailableError(
                        f"{self.tag} could not connect to the cluster within connect_timeout="
                        f"{self.opts.connect_timeout}s: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    ) from e
                time.sleep(1.0)
        self.coordinator = tf.distribute.coordinator.ClusterCoordinator(self.strategy)

    def _build(self) -> None:
        lr = self.model.learning_rate()
        created: list[Any] = []

        def record(next_creator: Any, **kwargs: Any) -> Any:
            var = next_creator(**kwargs)
            created.append(var)
            return var

        if not self.distributed:
            with tf.variable_creator_scope(record):
                self.module = self.model.build()
            self.trainables = _trainables(created)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
            self.optimizer = Adagrad(self.trainables, lr)
        else:
            batch = self.config.batch_size
            if isinstance(self.policy, BalancedPlacement):
                planned, plan, bplan = plan_build(
                    self.model.build, self.policy, self.plan_partitioner, self.num_ps, batch
                )
                snap = infos(planned, batch)
            else:
                planned = snapshot_build(self.model.build, self._partitioner())
                snap = infos(planned, batch)
                plan = self.policy.plan(snap, self.num_ps)
                bplan = None
            check_plan(plan, snap, self.num_ps)
            applier = PlanApplier(planned, plan)
            with tf.variable_creator_scope(applier), self.strategy.scope():
                with tf.variable_creator_scope(record):
                    self.module = self.model.build()
                applier.finish()
                self.trainables = _trainables(created)
                with applier.pinned(0):
                    self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
                self.optimizer = Adagrad(
                    self.trainables, lr, slot_scope=self.strategy.extended.colocate_vars_with
                )
                with applier.pinned(0):
                    # read + increment of the step counter: 8 bytes each way per step
                    self.meter = TrafficMeter(self.trainables, extra=[(self.step, 16)])
            report = plan.report(snap)
            report.update(verify(applier))
            report["mode"] = MODE
            self.planned_loads = planned_loads(planned, plan, batch)
            self.resident = resident_bytes(
                [v for _, v in applier.created] + list(self.optimizer.accumulators) + [self.step],
                self.num_ps,
            )
            report = load_report(report, self.planned_loads, None)
            if bplan is not None:
                report["shard_counts"] = bplan.shard_counts()
                report["lower_bound"] = bplan.lower_bound
            report["slots"] = {
                v.name: acc.device
                for v, acc in zip(self.trainables, self.optimizer.accumulators, strict=True)
            }
            self.placement = report
            log.info(
                "%s placement %s (%s): bytes per ps %s",
                self.tag,
                plan.policy,
                "applied"
                if report["applied"]
                else f"NOT applied: {report['warning'] or report['mismatched'][:2]}",
                [p["bytes"] for p in report["ps"]],
            )
        # the reader positions live with the chief (a local variable) and go into the checkpoint
        self.data_state = tf.Variable("", dtype=tf.string, trainable=False, name="data_state")
        self.ckpt = tf.train.Checkpoint(
            model=self.module, optimizer=self.optimizer, step=self.step, data=self.data_state
        )
        # with an fsspec-only model_dir the chief does all checkpoint I/O (io_device): the files
        # land in its local staging, to be uploaded; a shared TF-native directory keeps
        # TensorFlow's default, each PS writing its own shard
        self.ckpts = object_checkpoints(
            self.dir,
            self.ckpt,
            io_device=chief_io_device(self.info.index) if self.distributed else None,
            max_to_keep=3,
            is_lost=_is_cluster_loss if self.distributed else None,
        )

    def _step_body(self, batch: Mapping[str, Any]) -> tuple[Any, Any]:
        feats = {n: batch[n] for n in self.raw}
        labels = tf.cast(batch[self.model.label], tf.float32)
        n = tf.shape(labels)[0]
        with tf.GradientTape() as tape:
            logits = self.module(feats, training=True)
            losses = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
            loss = tf.reduce_sum(losses) / tf.cast(tf.maximum(n, 1), tf.float32)
        grads = tape.gradient(loss, self.trainables)
        update = self.optimizer.apply(grads, self.trainables)
        counted = [self.meter.record(grads)] if self.meter is not None else []
        with tf.control_dependencies([update, *counted]):
            bump = self.step.assign_add(tf.cast(n > 0, tf.int64))
        with tf.control_dependencies([bump]):
            return tf.identity(loss), tf.identity(n)

    def _functions(self) -> None:
        strategy = self.strategy

        def body(batch: Mapping[str, Any]) -> Any:
            return strategy.run(self._step_body, args=(batch,)) if strategy else self._step_body(batch)

        self.step_fn = tf.function(body, input_signature=[tensor_spec(self.kinds)])

        def iter_body(iterator: Any) -> Any:
            loss, n = body(next(iterator))
            worker = tf.distribute.coordinator.experimental_get_current_worker_index() if strategy else 0
            return loss, n, worker

        self.iter_fn = tf.function(iter_body)

    def _dispatch(self, fn: Any, args: tuple[Any, ...]) -> Any:
        if self.coordinator is None:
            return _Local(fn(*args))
        return self.coordinator.schedule(fn, args=args)

    def _ps_alive(self) -> bool:
        """Whether the PS still hold this job's variables (the global step reads)."""
        try:
            int(self.step.numpy())
            return True
        except tf.errors.OpError:
            return False

    def _join(self) -> None:
        if self.coordinator is not None:
            self.coordinator.join()

    # ----------------------------------------------------------------------------- train
    def train(self) -> RunResult:
        t_start = time.perf_counter()
        result = RunResult(role=self.job, rank=0)
        marker = self.dir.read_json(TRAINED_MARKER)
        if marker:
            log.info(
                "%s %s exists (global step %s): going to export",
                self.tag,
                TRAINED_MARKER,
                marker["global_step"],
            )
            result.checkpoint, result.global_step = marker["checkpoint"], marker["global_step"]
            result.placement = self.dir.read_json(PLACEMENT_REPORT)
            return self._finish(result, t_start)
        try:
            if self.distributed:
                self._connect()
            self._build()
            self._functions()
            state = self._restore()
            if self.placement is not None:
                self.dir.write_json(PLACEMENT_REPORT, self.placement)
                result.placement = self.placement
            if self.opts.input == "workers":
                self._train_native(result, state)
            else:
                self._train_chief(result, state)
            result.global_step = int(self.step.numpy())
            self._measured(result)
            result.checkpoint = self._save(result.global_step)
        except tf.errors.OpError as e:
            if not self.distributed or not _is_cluster_loss(e):
                raise
            raise ClusterUnavailableError(
                f"lost the cluster's state: {type(e).__name__}: {' '.join(str(e).split())[:240]}"
            ) from e
        self.dir.write_json(
            TRAINED_MARKER,
            {
                "checkpoint": result.checkpoint,
                "global_step": result.global_step,
                "time": time.time(),
                "mode": MODE,
            },
        )
        log.info(
            "%s trained: %d steps, %d examples in %.1f s (global step %d)",
            self.tag,
            result.local_steps,
            result.examples,
            time.perf_counter() - t_start,
            result.global_step,
        )
        return self._finish(result, t_start)

    def _measured(self, result: RunResult) -> None:
        """Add the measured per-PS load to the placement report; log it and write it."""
        if self.placement is None or self.meter is None:
            return
        steps, traffic = self.meter.per_ps(self.num_ps)
        self.placement = load_report(self.placement, self.planned_loads, (self.resident, traffic), steps)
        self.dir.write_json(PLACEMENT_REPORT, self.placement)
        result.placement = self.placement
        log.info("%s %s", self.tag, measured_line(self.placement, steps))

    def _shown(self, url: str) -> str:
        return self.dir.display + url[len(self.dir.url) :] if url.startswith(self.dir.url) else url

    def _restore(self) -> dict[str, Any] | None:
        latest = self.ckpts.restore_latest()
        if not latest:
            return None
        raw = self.data_state.numpy().decode()
        log.info("%s restored %s (global step %d)", self.tag, self._shown(latest), int(self.step.numpy()))
        return json.loads(raw) if raw else None

    def _save(self, gstep: int) -> str:
        path = self.ckpts.save(gstep)
        log.info("%s checkpoint %s", self.tag, self._shown(path))
        return path

    def _save_with_state(self, state: Mapping[str, Any]) -> None:
        self._join()
        self.data_state.assign(json.dumps(state))
        self._save(int(self.step.numpy()))

    def _log(self, result: RunResult, loss: float, gstep: int, t_log: float, rows_log: int) -> None:
        now = time.perf_counter()
        eps = rows_log / max(now - t_log, 1e-9)
        log.info(
            "%s step %d global %d loss %.4f examples/s %.0f", self.tag, result.local_steps, gstep, loss, eps
        )
        info = StepInfo(self.job, 0, result.local_steps, gstep, float(loss), result.examples, now - t_log)
        for hook in self.config.hooks:
            hook(info)

    def _train_chief(self, result: RunResult, state: Mapping[str, Any] | None) -> None:
        cfg = self.config
        reader = ChiefReader(
            self.read,
            cfg.train_data,
            self.kinds,
            batch_size=cfg.batch_size,
            num_epochs=cfg.num_epochs,
            shuffle=cfg.shuffle,
            seed=cfg.seed,
            options=cfg.reader_options,
            threads=self.opts.reader_threads,
            state=(state or {}).get("chief"),
        )
        base = int(self.step.numpy())
        pending: collections.deque[Any] = collections.deque()
        limit = self.opts.in_flight * self.num_workers
        t_log, rows_log, since_save = time.perf_counter(), 0, 0

        def complete() -> None:
            nonlocal t_log, rows_log
            remote, rows = pending.popleft()
            try:
                loss, n = remote.fetch()
            except tf.errors.UnavailableError as e:
                # a closure the coordinator re-runs elsewhere never surfaces here; this is a
                # step that finished (its outputs follow the update) on a worker that died before
                # its outputs were copied back: the update is on the PS, so count its rows
                if not self._ps_alive():
                    raise
                log.warning(
                    "%s a worker went away after finishing a step (%s); the step was applied, "
                    "counting its %d rows without its loss",
                    self.tag,
                    " ".join(str(e).split())[:160],
                    rows,
                )
                loss, n = float("nan"), rows
            result.local_steps += 1
            result.examples += int(n)
            rows_log += int(n)
            if result.local_steps % cfg.log_steps == 0:
                self._log(result, float(loss), base + result.local_steps, t_log, rows_log)
                t_log, rows_log = time.perf_counter(), 0

        for k, tensors, rows, position in reader:
            pending.append((self._dispatch(self.step_fn, (tensors,)), rows))
            reader.mark(k, position)
            since_save += 1
            while len(pending) > limit:
                complete()
            if since_save >= cfg.save_checkpoint_steps:
                while pending:
                    complete()
                self._save_with_state({"chief": reader.state()})
                since_save = 0
            if cfg.max_steps is not None and base + result.local_steps + len(pending) >= cfg.max_steps:
                break
        while pending:
            complete()
        self._join()
        self.data_state.assign(json.dumps({"chief": reader.state()}))

    def _train_native(self, result: RunResult, state: Mapping[str, Any] | None) -> None:
        cfg, opts = self.config, self.opts
        if self.coordinator is None:
            raise TrainError(
                "input='workers' reads on the workers of a coordinator-mode cluster; in a single "
                "process use input='chief' (the same model and step read through kubeai_train.data)"
            )
        files = list_native(opts.native_data or "", opts.native_format)
        counts = native_counts(files, opts.native_format)
        workers = self.num_workers
        share = [
            sum(c for i, c in enumerate(counts) if i % workers == w) * cfg.num_epochs for w in range(workers)
        ]
        done_rows = list((state or {}).get("workers", {}).get("rows", [0] * workers))
        if len(done_rows) != workers:
            raise TrainError(
                f"the checkpoint's worker positions are for {len(done_rows)} workers, this job has {workers}; "
                "resume with the same number of workers or use input='chief'"
            )
        log.info(
            "%s native input: %d %s files, rows per worker %s, already applied %s",
            self.tag,
            len(files),
            opts.native_format,
            share,
            done_rows,
        )
        fn = worker_dataset_fn(
            files,
            opts.native_format,
            self.kinds,
            batch_size=cfg.batch_size,
            num_workers=workers,
            num_epochs=cfg.num_epochs,
            shuffle=cfg.shuffle,
            seed=cfg.seed,
            skip_rows=done_rows,
        )
        per_worker = self.coordinator.create_per_worker_dataset(fn)
        iterator = iter(per_worker)
        base = int(self.step.numpy())
        finished: set[int] = set()
        t_log, rows_log, since_save = time.perf_counter(), 0, 0
        last_progress = time.monotonic()
        while len(finished) < workers:
            remaining = max(0, sum(share) - sum(done_rows))
            n = min(max(workers, math.ceil(remaining / cfg.batch_size) + workers), cfg.save_checkpoint_steps)
            rvs = [self._dispatch(self.iter_fn, (iterator,)) for _ in range(n)]
            before = result.examples
            for rv in rvs:
                loss, rows, w = rv.fetch()
                if int(rows) == 0:
                    finished.add(int(w))
                    continue
                done_rows[int(w)] += int(rows)
                result.local_steps += 1
                result.examples += int(rows)
                rows_log += int(rows)
                since_save += 1
                if result.local_steps % cfg.log_steps == 0:
                    self._log(result, float(loss), base + result.local_steps, t_log, rows_log)
                    t_log, rows_log = time.perf_counter(), 0
            if result.examples > before:
                last_progress = time.monotonic()
            elif len(finished) < workers:
                # only finished workers ran this round: the others are down (TensorFlow keeps
                # their closures until they are back); wait for them, but not forever
                missing = sorted(set(range(workers)) - finished)
                if time.monotonic() - last_progress > cfg.worker_wait_timeout:
                    raise TrainError(
                        f"{self.tag} workers {missing} have not reported their share done within "
                        f"worker_wait_timeout={cfg.worker_wait_timeout}s; are they running?"
                    )
                time.sleep(0.5)
            if since_save >= cfg.save_checkpoint_steps and len(finished) < workers:
                self._save_with_state({"workers": {"rows": done_rows}})
                since_save = 0
            if cfg.max_steps is not None and base + result.local_steps >= cfg.max_steps:
                break
        self._join()
        self.data_state.assign(json.dumps({"workers": {"rows": done_rows}}))

    # ----------------------------------------------------------------------------- export
    def _finish(self, result: RunResult, t_start: float) -> RunResult:
        cfg = self.config
        checkpoint = _export.checkpoint_to_export(cfg, self.dir, self.model_dir, result)
        if checkpoint is None:  # published already (a re-run of a finished job)
            result.seconds = time.perf_counter() - t_start
            if self.distributed:
                self.dir.write_json(DONE_MARKER, {"time": time.time()})
            return result
        export_dir = cfg.export_dir or self.dir.join("export")
        local = self.model.build()
        status = tf.train.Checkpoint(model=local).restore(self.ckpts.local_copy(checkpoint))
        status.expect_partial()
        try:
            status.assert_existing_objects_matched()
        except AssertionError as e:
            raise TrainError(f"checkpoint {self._shown(checkpoint)!r} does not hold this model: {e}") from e
        serving = _Serving(local, self.raw)
        # the SavedModel is written on local disk (renamed into place), then copied when
        # export_dir is elsewhere (gs://, oss://, ...)
        local_export = write_export(
            export_dir,
            self.dir,
            lambda path: tf.saved_model.save(serving, path, signatures={_export.SIGNATURE: serving.serve}),
            cfg.storage_options,
        )
        result.export_dir = export_dir
        log.info("%s exported SavedModel to %s", self.tag, _export.redact_uri(export_dir))
        if cfg.eval_data:
            predictor = _Predictor(self.model, serving)
            result.metrics, sample = _export.evaluate(
                predictor,  # type: ignore[arg-type]  # duck-typed: .model and .predict(batch)
                self.read,
                cfg.eval_data,
                keep=cfg.eval_predictions,
                options=cfg.reader_options,
            )
            if sample:
                # predicted again as one batch, so a consumer feeding exactly these rows as one
                # batch gets bit-identical results (a different batch size may change the last ulp)
                sample["__prediction__"] = predictor.predict(sample)
            _export.record_eval(self.dir, self.tag, cfg.eval_data, result.metrics, sample)
        _export.publish_result(self.dir, cfg, local_export, result, lambda: self._metadata(result))
        result.seconds = time.perf_counter() - t_start
        if self.distributed:
            self.dir.write_json(DONE_MARKER, {"time": time.time()})
        return result

    def _metadata(self, result: RunResult) -> dict[str, Any]:
        native = self.opts.native_data if self.opts.input == "workers" else None
        return _export.result_metadata(
            result,
            mode=MODE,
            model=self.model,
            config=self.config,
            model_dir=self.model_dir,
            cluster_spec=self.info.cluster,
            params={"input": self.opts.input},
            lineage={"native_data": _export.redact_uri(native)},
        )


def _is_cluster_loss(e: BaseException) -> bool:
    """An error meaning a task (a PS) went away or came back empty: restart and restore."""
    if isinstance(e, _RETRYABLE):
        return True
    # a PS that restarts between two RPCs shows up as an unknown device / missing remote handle
    text = str(e)
    return (
        isinstance(e, tf.errors.InvalidArgumentError)
        and "/job:ps" in text
        and ("unknown device" in text.lower() or "remote_handle" in text)
    )
