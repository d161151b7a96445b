"""Between-graph parameter-server training: the one entry every role of a TF job calls.

``run(model, config)`` asks ``kubeai_train.cluster`` who this process is:

* **ps**: starts its gRPC server and serves until the chief marks the job done (a variable
  the chief sets on every PS), or until it is killed (the launcher / cleanPodPolicy).
* **chief** (rank 0) and **worker i** (rank i + 1): build the whole graph in their own process
  (variables placed on the PS by the placement plan, input read locally), then train
  asynchronously (or synchronously with SyncReplicasOptimizer).
* no cluster: the same graph and loop in one process (the single-process baseline).

Start-up never races and never sleeps 30 s: every session sees only the PS and itself
(``device_filters``), the chief initialises or restores, and workers poll readiness every
``ready_poll`` seconds up to ``ready_timeout`` (then ReadyTimeoutError names what is missing).
Shutdown is defined: a trainer whose data is done records ``done`` in its position variable and
exits; the chief, when its own data is done, waits for every worker's ``done`` (bounded by
``worker_wait_timeout``), writes the final checkpoint, a ``_TRAINED.json`` marker, and sets the
PS ``job_done`` flags, then exports, evaluates and publishes from the checkpoint.

Failures: each batch's reader position is stored on PS 0 in the same step as its update, so a
killed worker that is restarted resumes exactly after its last applied batch; a lost PS makes
the chief and workers exit with RETRYABLE_EXIT_CODE (138), and the restarted chief, finding
uninitialised variables, restores the last checkpoint (model and every reader position).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from kubeai_train import cluster
from kubeai_train.tf import export as _export
from kubeai_train.tf.balanced import BalancedPlacement, load_report, measured_line, placement_policy
from kubeai_train.tf.between_graph import adaptive as _adaptive
from kubeai_train.tf.between_graph import checkpoints as _checkpoints
from kubeai_train.tf.between_graph import rebalancing as _rebalancing
from kubeai_train.tf.between_graph.balanced import TrafficCounter, resident_bytes, shard_counts_scope
from kubeai_train.tf.between_graph.input import ReadFn, default_read_fn, make_dataset
from kubeai_train.tf.between_graph.placement import PlanStrategy, placement_report, snapshot
from kubeai_train.tf.checkpoint_store import RETRYABLE_ERRORS
from kubeai_train.tf.model_dir import ModelDir, check_url, write_export
from kubeai_train.tf.placement_policies import PlacementPlan, check_plan
from kubeai_train.tf.types import (
    RETRYABLE_EXIT_CODE,
    ClusterUnavailableError,
    Model,
    PlacementPolicy,
    ReadyTimeoutError,
    RunResult,
    StepInfo,
    TrainConfig,
    TrainError,
    VariableInfo,
)

__all__ = ["RunResult", "run"]

log = logging.getLogger("kubeai_train.tf")

TRAINED_MARKER = _export.TRAINED_MARKER
PUBLISHED_MARKER = _export.PUBLISHED_MARKER
PLACEMENT_REPORT = "placement.json"
EVAL_SAMPLE = _export.EVAL_SAMPLE
STATE_SCOPE = "kubeai"
MAX_WORKER_RECOVERIES = 10
MAX_FAILED_SAVES = 3  # periodic checkpoints that may fail in a row before the job fails

_RETRYABLE = RETRYABLE_ERRORS


def run(
    model: Model,
    config: TrainConfig,
    *,
    placement: PlacementPolicy | str | None = None,
    read_fn: ReadFn | None = None,
    exit_on_retryable: bool = True,
) -> RunResult:
    """Run this process's role of the job described by the environment (see the module doc).

    Args:
        model: the user's model (raw features -> logits, optimizer).
        config: the training configuration; every role must get the same one.
        placement: the placement policy or its name (default round-robin; ``"balanced"``:
            the planner decides the shard count of every ``get_variable`` embedding table,
            overriding the model's partitioner, and each shard's PS).
        read_fn: the reader (default ``kubeai_train.data.read``).
        exit_on_retryable: on a lost PS, exit the process with RETRYABLE_EXIT_CODE (what a
            TFJob restart policy and the launcher expect) instead of raising ClusterUnavailableError.

    Returns:
        RunResult for this process (ps processes return when the job is done).

    Raises:
        ReadyTimeoutError: a worker waited ``ready_timeout`` for the chief.
        TrainError: bad configuration, or a model that cannot be built / restored.
    """
    _setup_logging()
    info = cluster.current()
    policy = placement_policy(placement)
    read = read_fn or default_read_fn
    if info.is_chief:  # the resolved config once per job; the other roles say what they do
        log.info(
            "[%s %d] kubeai_train.tf between-graph: rank %d/%d, ps %d, policy %s, config %s",
            info.role,
            info.index,
            info.rank,
            info.world_size,
            len(info.cluster.get("ps", ())),
            policy.name,
            json.dumps(config.describe(), default=str, sort_keys=True),
        )
    elif info.role == "ps":
        log.info("[ps %d] kubeai_train.tf between-graph: serving variables until the job is done", info.index)
    else:
        log.info(
            "[%s %d] kubeai_train.tf between-graph: training rank %d/%d on its share of the data",
            info.role,
            info.index,
            info.rank,
            info.world_size,
        )
    try:
        if info.framework != "tf":
            return _Trainer(model, config, info, policy, read).train()
        if info.role == "ps":
            return _serve_ps(info, config)
        if info.role == "evaluator":
            raise TrainError(
                "the evaluator role is not used in between-graph mode: the chief evaluates after "
                "training; launch without --evaluator"
            )
        if not info.cluster.get("ps"):
            raise TrainError(
                f"TF_CONFIG has no ps tasks (roles: {sorted(info.cluster)}); between-graph "
                "training needs --ps N >= 1"
            )
        result: RunResult | None = None
        while True:  # a runtime re-placement rebuilds the graph in this process (rebalancing.py)
            result = _Trainer(model, config, info, policy, read).train(result)
            if not result.replaced:
                return result
    except ClusterUnavailableError as e:
        log.error(
            "[%s %d] %s; exiting with %d so the job restarts and restores its checkpoint",
            info.role,
            info.index,
            e,
            RETRYABLE_EXIT_CODE,
        )
        if exit_on_retryable:
            logging.shutdown()
            os._exit(RETRYABLE_EXIT_CODE)  # TF's gRPC threads can block a normal exit
        raise


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # tf.compat.v1 deprecation notices


def _session_config(config: TrainConfig, filters: Sequence[str]) -> Any:
    return tf.compat.v1.ConfigProto(
        device_filters=list(filters),
        operation_timeout_in_ms=int(config.operation_timeout * 1000),
        allow_soft_placement=False,
    )


_SERVERS: dict[str, Any] = {}


def _server(info: cluster.ClusterInfo) -> Any:
    """This task's gRPC server, started once per process (TF cannot stop one; a second ``run`` in
    the same process, e.g. the next round of a stress test, reuses it)."""
    job = "chief" if info.role == "master" else info.role
    spec = {("chief" if k == "master" else k): v for k, v in info.cluster_spec().items() if k != "evaluator"}
    key = json.dumps([spec, job, info.index], sort_keys=True)
    if key not in _SERVERS:
        _SERVERS[key] = _new_server(spec, job, info.index)
    return _SERVERS[key]


def _new_server(spec: dict[str, Any], job: str, index: int) -> Any:
    return tf.distribute.Server(
        tf.train.ClusterSpec(spec), job_name=job, task_index=index, protocol="grpc", start=True
    )


def _serve_ps(info: cluster.ClusterInfo, config: TrainConfig) -> RunResult:
    """Serve variables until this PS's ``job_done`` flag is set by the chief."""
    t0 = time.perf_counter()
    server = _server(info)
    log.info("[ps %d] serving at %s", info.index, info.address)
    g = tf.Graph()
    with g.as_default(), tf.compat.v1.device(f"/job:ps/task:{info.index}"):
        handle = tf.raw_ops.VarHandleOp(
            dtype=tf.bool,
            shape=[],
            shared_name=f"{STATE_SCOPE}/job_done_{info.index}",
            container=config.container,
        )
        done = tf.raw_ops.ReadVariableOp(resource=handle, dtype=tf.bool)
    sess = tf.compat.v1.Session(
        server.target, graph=g, config=_session_config(config, [f"/job:ps/task:{info.index}"])
    )
    while True:
        try:
            if sess.run(done):
                break
        except tf.errors.OpError:
            pass  # not initialised yet (or restored right now): keep serving
        time.sleep(0.25)
    sess.close()
    log.info("[ps %d] job done after %.1f s; stopping", info.index, time.perf_counter() - t0)
    return RunResult(role="ps", rank=info.index, seconds=time.perf_counter() - t0)


class _Trainer:
    """One chief / worker / local process: build, start, train, finish."""

    def __init__(
        self,
        model: Model,
        config: TrainConfig,
        info: cluster.ClusterInfo,
        policy: PlacementPolicy,
        read: ReadFn,
    ) -> None:
        self.model, self.config, self.info, self.policy, self.read = model, config, info, policy, read
        self.distributed = info.framework == "tf"
        self.num_ps = len(info.cluster.get("ps", ())) if self.distributed else 1
        self.is_chief = info.is_chief if self.distributed else True
        self.rank, self.world = info.rank, info.world_size
        self.job = ("chief" if info.role == "master" else info.role) if self.distributed else "local"
        self.tag = f"[{self.job} {info.index}]"
        self.kinds = dict(model.raw_features())
        self.kinds[model.label] = "int64"
        if config.audit_column:
            self.kinds[config.audit_column] = "int64"
        self.model_dir = config.model_dir
        self.dir = ModelDir(
            config.model_dir, storage_options=config.storage_options, staging_dir=config.staging_dir
        )
        self.ckpts = _checkpoints.for_model_dir(self.dir, part_bytes=config.checkpoint_part_bytes)
        self.placement: dict[str, Any] | None = None
        self.shard_counts: dict[str, int] = {}
        self.planned_loads: tuple[list[float], list[float]] = ([], [])
        self.resident: list[int] = []
        self.traffic: TrafficCounter | None = None
        self.server: Any = None
        self.writer: Any = None
        self._failed_saves = 0
        self.generation = 0  # re-placements applied so far (the plan file's)
        self.rebalances: list[dict[str, Any]] = []
        self.rebalancer: _rebalancing.LiveRebalancer | None = None
        self.balance_plan: Any = None
        self.adaptive = self._adaptive_wanted()
        self.chief_policy: _adaptive.AdaptiveChief | None = None
        self.report: _adaptive.StragglerReport | None = None
        if self.is_chief:
            check_url(config.export_dir, config.storage_options, "export_dir")  # before, not after, training
            self.dir.makedirs()

    def _adaptive_wanted(self) -> bool:
        """Whether this run uses adaptive local batches (sync, ``straggler="adaptive"``, >= 2 replicas)."""
        cfg = self.config
        if cfg.sync and self.distributed and cfg.backup_workers >= self.world:
            raise TrainError(
                f"backup_workers={cfg.backup_workers} must be < the {self.world} replicas (chief + workers): "
                "a step needs at least one gradient"
            )
        if cfg.straggler != "adaptive":
            return False
        if not (cfg.sync and self.distributed and self.world > 1):
            if self.is_chief:
                log.warning(
                    "%s straggler='adaptive' needs synchronous training with >= 2 replicas (this run: "
                    "%d); training with one batch per step",
                    self.tag,
                    self.world,
                )
            return False
        return True

    @property
    def global_rows(self) -> int:
        """Adaptive: planned rows per step over all replicas (``N x micro_batches x g``)."""
        return self.world * self.config.adaptive.micro_batches * self.config.batch_size

    # ----------------------------------------------------------------------------- graph
    def _state_variables(self) -> None:
        with tf.compat.v1.variable_scope(STATE_SCOPE):
            self.positions = [
                tf.compat.v1.get_variable(f"data_state_{r}", initializer=tf.constant(""), trainable=False)
                for r in range(self.world)
            ]
            self.job_done = [
                tf.compat.v1.get_variable(f"job_done_{t}", initializer=tf.constant(False), trainable=False)
                for t in range(self.num_ps)
            ]
            # runtime re-placement: the generation the chief asks for, and each rank's answer
            self.replace_gen = tf.compat.v1.get_variable(
                "replace_generation", initializer=tf.constant(0, tf.int64), trainable=False
            )
            self.parked = [
                tf.compat.v1.get_variable(
                    f"parked_{r}", initializer=tf.constant(0, tf.int64), trainable=False
                )
                for r in range(self.world)
            ]
            self.gen_in = tf.compat.v1.placeholder(tf.int64, [])
            self.set_gen = self.replace_gen.assign(self.gen_in, read_value=False)
            self.set_parked = self.parked[self.rank].assign(self.gen_in, read_value=False)
            if self.adaptive:
                # adaptive batches: each replica's (local step, rows, compute seconds) of its last
                # step, and the chief's plan [applies_from, new units..., units before...]
                self.timing = [
                    tf.compat.v1.get_variable(
                        f"straggler_timing_{r}", initializer=tf.zeros([3], tf.float64), trainable=False
                    )
                    for r in range(self.world)
                ]
                equal = [self.config.adaptive.micro_batches] * self.world
                self.plan_var = tf.compat.v1.get_variable(
                    "straggler_plan",
                    initializer=tf.constant(_adaptive.plan_vector(0, equal, equal), tf.int64),
                    trainable=False,
                )
                self.timing_in = tf.compat.v1.placeholder(tf.float64, [3])
                self.set_timing = self.timing[self.rank].assign(self.timing_in, read_value=False)
                self.plan_in = tf.compat.v1.placeholder(tf.int64, [1 + 2 * self.world])
                # the chief's policies as JSON: checkpointed, and read by a restarted chief
                self.policy_var = tf.compat.v1.get_variable(
                    "straggler_policy", initializer=tf.constant(""), trainable=False
                )
                self.policy_in = tf.compat.v1.placeholder(tf.string, [])
                self.set_plan = tf.group(
                    self.plan_var.assign(self.plan_in, read_value=False),
                    self.policy_var.assign(self.policy_in, read_value=False),
                )

    def _model_and_train_op(self, features: Mapping[str, Any]) -> None:
        self.global_step = tf.compat.v1.train.get_or_create_global_step()
        logits = self.model.logits(
            {k: features[k] for k in self.model.raw_features()}, num_ps=self.num_ps, training=True
        )
        labels = tf.cast(features[self.model.label], tf.float32)
        row_losses = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
        self.loss = tf.reduce_mean(row_losses)
        self.batch_rows = tf.shape(labels)[0]
        # adaptive: N n / G on the mean of this replica's n rows (the averaged gradient is the
        # global-batch mean; adaptive.py); otherwise the plain mean
        grad_loss = (
            _adaptive.weighted_loss(row_losses, self.world, self.global_rows) if self.adaptive else self.loss
        )
        opt = self.model.optimizer()
        self.sync_opt = None
        if self.config.sync and self.world > 1:
            opt = tf.compat.v1.train.SyncReplicasOptimizer(
                opt,
                replicas_to_aggregate=self.world - self.config.backup_workers,
                total_num_replicas=self.world,
            )
            self.sync_opt = opt
        # minimize() in its two halves: the per-variable gradients are what the traffic count sees
        self.grads_and_vars = opt.compute_gradients(grad_loss)
        if self.adaptive:
            # sparse gradients summed over the replicas, each divided by N: the global-batch mean
            # like the dense ones (TF's sparse mean is per touched row; adaptive.py)
            self.grads_and_vars = _adaptive.scale_sparse(self.grads_and_vars, self.world)
            with _adaptive.summed_sparse_gradients():
                self.train_op = opt.apply_gradients(self.grads_and_vars, global_step=self.global_step)
        else:
            self.train_op = opt.apply_gradients(self.grads_and_vars, global_step=self.global_step)
        if self.adaptive:
            # forward + backward timed in the graph: from the start of the step's run to the last
            # gradient, before the push to the accumulators and the wait for the sync token
            self.t_start = tf.timestamp()
            done = [
                g.values if isinstance(g, tf.IndexedSlices) else g
                for g, _ in self.grads_and_vars
                if g is not None
            ]
            with tf.control_dependencies(done):
                self.t_grads = tf.timestamp()
        if self.sync_opt is not None:
            # built by SyncReplicasOptimizer for its hook; unused in the planning pass (quiet tf_should_use)
            getattr(self.sync_opt.ready_for_local_init_op, "mark_used", lambda: None)()

    def _plan(self) -> None:
        """Pass 1: build the model in a throw-away graph, snapshot its variables, ask the policy."""
        g = tf.Graph()
        with g.as_default():
            feats = {
                name: tf.compat.v1.placeholder(_tf_dtype(kind), [None]) for name, kind in self.kinds.items()
            }
            with self._cuts(planning=True):
                self._model_and_train_op(feats)
        self.snapshot = [
            v for v in snapshot(g, self.config.batch_size) if not v.name.startswith(f"{STATE_SCOPE}/")
        ]
        policy = self.policy
        replanned = (
            self.dir.read_json(_rebalancing.PLAN_FILE) if isinstance(policy, BalancedPlacement) else None
        )
        if replanned and isinstance(policy, BalancedPlacement):
            # a runtime re-placement chose this plan: every role builds with it
            policy.last = _rebalancing.plan_from_json(replanned["plan"])
            self.generation = int(replanned["generation"])
            self.rebalances = list(replanned.get("history") or [])
            self.plan = PlacementPlan(policy.last.assignment(), self.num_ps, policy.name)
        else:
            self.plan = self.policy.plan(self.snapshot, self.num_ps)
        if isinstance(self.policy, BalancedPlacement) and self.policy.last is not None:
            # the planning pass saw whole variables; the real graph cuts them at the plan's
            # counts, so the snapshot the report and checks compare against is the cut one
            self.shard_counts = self.policy.last.shard_counts()
            self.snapshot = _cut_snapshot(self.snapshot, self.policy.last)
            self.balance_plan = self.policy.last
        check_plan(self.plan, self.snapshot, self.num_ps)

    def _rebalancer(self) -> None:
        rule = getattr(self.policy, "rebalance", None)
        if rule is None or not self.is_chief or self.traffic is None or self.balance_plan is None:
            return
        if self.sync_opt is not None:
            log.warning("%s rebalance is for asynchronous training; sync=True keeps the placement", self.tag)
            return
        names = [v.op.name for _, v in self.grads_and_vars]
        self.rebalancer = _rebalancing.LiveRebalancer(
            self.balance_plan, names, getattr(self.policy, "window_steps", 50), rule
        )

    def _cuts(self, planning: bool = False) -> Any:
        """The partitioner override of the balanced policy (nothing for the other policies)."""
        if not isinstance(self.policy, BalancedPlacement):
            return contextlib.nullcontext()
        return shard_counts_scope(None if planning else self.shard_counts)

    def _build(self) -> None:
        self.graph = tf.Graph()
        with self.graph.as_default(), self.graph.container(self.config.container):
            if self.distributed:
                self._plan()
                strategy = PlanStrategy(self.plan, pinned=self._pinned)
                setter = tf.compat.v1.train.replica_device_setter(
                    ps_tasks=self.num_ps,
                    worker_device=f"/job:{self.job}/task:{self.info.index}",
                    ps_device="/job:ps",
                    cluster=None,
                    ps_strategy=strategy,
                )
                with tf.compat.v1.device(setter), self._cuts():
                    self._build_body()
                self.placement = placement_report(self.plan, self.snapshot, self.graph)
                self.planned_loads = (
                    [float(e["bytes"]) for e in self.placement["ps"]],
                    [float(e["traffic"]) for e in self.placement["ps"]],
                )
                self.resident = resident_bytes(self.graph, self.num_ps)
                self.placement = load_report(self.placement, self.planned_loads, None)
                if self.rebalances:
                    self.placement["rebalances"] = self.rebalances
                self._rebalancer()
                if self.shard_counts:
                    self.placement["shard_counts"] = self.shard_counts
                if strategy.unplanned:
                    log.warning(
                        "%s %d variables created outside the planning pass were placed round-robin: %s",
                        self.tag,
                        len(strategy.unplanned),
                        strategy.unplanned[:5],
                    )
            else:
                self._build_body()
                self.placement = None
            self.graph.finalize()

    def _build_body(self) -> None:
        self._state_variables()
        ds, self.holder = make_dataset(
            self.read,
            self.config.train_data,
            self.kinds,
            batch_size=self.config.batch_size,
            rank=self.rank,
            world_size=self.world,
            num_epochs=self.config.num_epochs,
            shuffle=self.config.shuffle,
            seed=self.config.seed,
            options=self.config.reader_options,
        )
        self.iterator = tf.compat.v1.data.make_initializable_iterator(ds)
        features, position = self.iterator.get_next()
        if self.adaptive:
            # a step is k fetched micro-batches fed as one local batch (adaptive.py)
            self.next_batch = (features, position)
            features = {
                name: tf.compat.v1.placeholder(_tf_dtype(kind), [None], name=f"local_{name}")
                for name, kind in self.kinds.items()
            }
            position = tf.compat.v1.placeholder(tf.string, [], name="local_position")
            self.feed_features, self.feed_position = features, position
        self.audit = features[self.config.audit_column] if self.config.audit_column else None
        self._model_and_train_op(features)
        # the batch's position is written in the same session.run as its update, in parallel with
        # it (a control dependency would add a PS round trip to every step); a run either
        # completes both or fails, and a failed run on a lost PS is undone by the restore anyway
        counted = []
        self.traffic = None
        if self.distributed:
            with tf.compat.v1.device(f"/job:{self.job}/task:{self.info.index}"):
                # read + increment of the global step: 8 bytes each way per step
                self.traffic = TrafficCounter(self.grads_and_vars, extra=[(self.global_step, 16)])
            counted.append(self.traffic.update)
        if self.adaptive:
            counted.append(self.set_timing)  # the previous step's timing rides with this step
        self.step_op = tf.group(
            self.train_op, self.positions[self.rank].assign(position, read_value=False), *counted
        )
        self.position_in = tf.compat.v1.placeholder(tf.string, [])
        self.set_position = self.positions[self.rank].assign(self.position_in, read_value=False)
        self.set_done = tf.group(*[v.assign(True, read_value=False) for v in self.job_done])
        self.uninitialized = tf.compat.v1.report_uninitialized_variables(tf.compat.v1.global_variables())
        self.init_op = tf.compat.v1.global_variables_initializer()
        self.local_init = tf.group(
            tf.compat.v1.local_variables_initializer(), tf.compat.v1.tables_initializer()
        )
        if self.is_chief:  # only the chief saves and restores
            self.ckpts.build(sharded=self.distributed)
        self.close_tokens = None
        if self.sync_opt is not None:
            self.sync_hook = self.sync_opt.make_session_run_hook(self.is_chief, num_tokens=-1)
            self.sync_hook.begin()
            # at the end the chief closes the token queue: a replica waiting for a token (a slow
            # one whose gradients were left out by backup_workers) gets OutOfRange and finishes
            # instead of blocking until it is killed
            queue = getattr(self.sync_opt, "_sync_token_queue", None)
            if queue is not None:
                self.close_tokens = queue.close(cancel_pending_enqueues=True)

    @staticmethod
    def _pinned(name: str) -> int | None:
        # the trainer's own state is not the policy's to place: positions on PS 0, job_done_t on
        # PS t (where that PS polls for it)
        if name.startswith(f"{STATE_SCOPE}/job_done_"):
            return int(name[len(f"{STATE_SCOPE}/job_done_") :])
        if name.startswith(f"{STATE_SCOPE}/"):
            return 0
        return None

    # ----------------------------------------------------------------------------- start-up
    def _session(self) -> Any:
        if self.distributed:
            if self.server is None:
                self.server = _server(self.info)
            filters = ["/job:ps", f"/job:{self.job}/task:{self.info.index}"]
            return tf.compat.v1.Session(
                self.server.target, graph=self.graph, config=_session_config(self.config, filters)
            )
        return tf.compat.v1.Session(graph=self.graph, config=_session_config(self.config, []))

    def _start_and_train(self, sess: Any, result: RunResult) -> None:
        t0 = time.perf_counter()
        how = self._chief_start(sess) if self.is_chief else None
        if how == "restored" and self.rebalances and "pause_s" not in self.rebalances[-1]:
            self._applied()
        if not self.is_chief:
            self._worker_start(sess)
        position = self._read_position(sess)
        result.ready_seconds = time.perf_counter() - t0
        result.ready_at = time.time()
        log.info(
            "%s ready in %.2f s (%s); position %s",
            self.tag,
            time.perf_counter() - t0,
            how or "chief initialised",
            "start" if position is None else json.dumps(position)[:200],
        )
        if self.is_chief and self.placement is not None:
            self.dir.write_json(PLACEMENT_REPORT, self.placement)
            result.placement = self.placement
        if position and position.get("done"):
            log.info("%s this rank's data was already done", self.tag)
        else:
            self.holder.state = position.get("data") if position else None
            sess.run([self.iterator.initializer, self.local_init])
            if self.adaptive:
                self._adaptive_start(sess)
            coord = tf.train.Coordinator()
            if self.sync_opt is not None:
                self.sync_hook.after_create_session(sess, coord)
            self._loop(sess, result)
            coord.request_stop()
        if self.is_chief and not result.replaced:
            self._chief_end(sess, result)

    def _uninitialized(self, sess: Any, deadline: float, what: str) -> list[str]:
        """Names of uninitialised variables, retrying while the PS are not reachable yet."""
        while True:
            try:
                return [n.decode() for n in sess.run(self.uninitialized)]
            except _RETRYABLE as e:
                if time.monotonic() >= deadline:
                    raise ReadyTimeoutError(
                        f"{self.tag} could not reach the parameter servers within ready_timeout="
                        f"{self.config.ready_timeout}s while {what}: {type(e).__name__}: "
                        f"{' '.join((e.message or '').split())[:200]}; check that the ps tasks are running"
                    ) from e
                time.sleep(self.config.ready_poll)

    def _chief_start(self, sess: Any) -> str:
        deadline = time.monotonic() + self.config.ready_timeout
        missing = self._uninitialized(sess, deadline, "initialising the model")
        if self.distributed and not missing:
            return "live"  # a chief restart with the PS still holding the model: keep the fresher state
        ckpt = self.ckpts.restore_latest(sess)
        if ckpt:
            log.info("%s restored %s", self.tag, self.dir.display + ckpt[len(self.dir.url) :])
            return "restored"
        sess.run(self.init_op)
        return "initialised"

    def _worker_start(self, sess: Any) -> None:
        # poll every ready_poll seconds (SessionManager would sleep 30 s between checks)
        deadline = time.monotonic() + self.config.ready_timeout
        while True:
            missing = self._uninitialized(sess, deadline, "waiting for the chief")
            if not missing:
                return
            if time.monotonic() >= deadline:
                raise ReadyTimeoutError(
                    f"{self.tag} waited ready_timeout={self.config.ready_timeout}s for the chief to initialise "
                    f"the model; still uninitialised: {missing[:3]} ({len(missing)} variables). Is the chief "
                    "running? Raise TrainConfig.ready_timeout if restoring a large checkpoint takes longer"
                )
            time.sleep(self.config.ready_poll)

    def _read_position(self, sess: Any) -> dict[str, Any] | None:
        raw = sess.run(self.positions[self.rank])
        return json.loads(raw) if raw else None

    # ----------------------------------------------------------------------------- train
    def train(self, carry: RunResult | None = None) -> RunResult:
        """Train this role; ``carry``: the result of the run a re-placement ended (its counts go on)."""
        t_start = time.perf_counter()
        result = carry or RunResult(role=self.job, rank=self.rank)
        result.replaced = False
        if self.is_chief:
            marker = self.dir.read_json(TRAINED_MARKER)
            if marker:
                log.info(
                    "%s %s exists: training finished before (global step %s); going to export",
                    self.tag,
                    TRAINED_MARKER,
                    marker.get("global_step"),
                )
                result.checkpoint, result.global_step = marker["checkpoint"], marker["global_step"]
                result.placement = self.dir.read_json(PLACEMENT_REPORT)
                return self._finish(result, t_start)
        self._build()
        with self.graph.as_default():
            return self._train_in_graph(result, t_start)

    def _train_in_graph(self, result: RunResult, t_start: float) -> RunResult:
        recoveries = 0
        while True:
            sess = self._session()
            try:
                self._start_and_train(sess, result)
                break
            except _RETRYABLE as e:
                what = f"{type(e).__name__}: {' '.join((e.message or '').split())[:240]}"
                if self.is_chief or recoveries >= MAX_WORKER_RECOVERIES:
                    raise ClusterUnavailableError(f"{self.tag} lost the parameter servers: {what}") from e
                # a worker keeps its process: reconnect, wait for the chief to restore the
                # checkpoint, and resume from the position restored with it
                recoveries += 1
                log.warning(
                    "%s lost the parameter servers (%s); waiting for the chief to restore "
                    "(recovery %d of %d)",
                    self.tag,
                    what,
                    recoveries,
                    MAX_WORKER_RECOVERIES,
                )
            finally:
                try:
                    sess.close()
                except tf.errors.OpError:
                    if not result.replaced:
                        raise  # (a re-placement's reset closed it already)
        result.seconds = time.perf_counter() - t_start
        if result.replaced:
            return result
        if self.is_chief:
            return self._finish(result, t_start)
        log.info(
            "%s done: %d steps, %d examples in %.1f s",
            self.tag,
            result.local_steps,
            result.examples,
            result.seconds,
        )
        return result

    def _loop(self, sess: Any, result: RunResult) -> None:
        cfg = self.config
        writer = None
        if self.is_chief:
            with tf.Graph().as_default():  # the v1 writer refuses eager mode; it adds no ops
                writer = self.writer = tf.compat.v1.summary.FileWriter(self.dir.writable())
        # the global step is a read from a PS: fetch it every step only when max_steps needs it
        step_gstep = cfg.max_steps is not None
        fetches = [self.step_op, self.loss, self.global_step if step_gstep else self.step_op, self.batch_rows]
        if self.audit is not None:
            fetches.append(self.audit)
        if self.adaptive:
            fetches += [self.t_start, self.t_grads]
        audit: list[np.ndarray] = []
        chunk = 0
        t_log = t_loop = time.perf_counter()
        ex_log = 0
        last_loss = float("nan")
        step = 0
        gstep = 0
        prev_timing = [0.0, 0.0, 0.0]  # adaptive: (local step, rows, compute seconds) of the last step
        try:
            while True:
                try:
                    if self.adaptive:
                        feed, t_input = self._take(sess)
                        feed[self.timing_in] = prev_timing
                        out = sess.run(fetches, feed)
                        compute = t_input + max(0.0, float(out[-1]) - float(out[-2]))
                        prev_timing = [float(step + 1), float(out[3]), compute]
                    else:
                        out = sess.run(fetches)
                    _, last_loss, gstep, rows = out[:4]
                    if self.audit is not None:
                        audit.append(out[4])
                except tf.errors.OutOfRangeError:
                    break
                step += 1
                if self.chief_policy is not None:
                    self._observe_timings(sess, writer)
                result.examples += int(rows)
                ex_log += int(rows)
                if step == 1 and not result.first_step_seconds:
                    # the first step also opens the reader: kept apart for steady-state rates
                    result.first_step_seconds = time.perf_counter() - t_loop
                    result.first_step_examples = int(rows)
                boundary = step % cfg.log_steps == 0 or (
                    self.is_chief and step % cfg.save_checkpoint_steps == 0
                )
                if boundary and self.distributed and not self.is_chief:
                    # a worker learns of a runtime re-placement with the global step it reads anyway
                    gstep, gen = sess.run([self.global_step, self.replace_gen])
                    if gen > self.generation:
                        self._park(sess, int(gen))
                        result.replaced = True
                        break
                elif boundary and not step_gstep:
                    gstep = sess.run(self.global_step)
                if step % cfg.log_steps == 0:
                    now = time.perf_counter()
                    eps = ex_log / max(now - t_log, 1e-9)
                    log.info(
                        "%s step %d global %d loss %.4f examples/s %.0f",
                        self.tag,
                        step,
                        gstep,
                        last_loss,
                        eps,
                    )
                    if writer is not None:
                        writer.add_summary(_summary({"loss": last_loss, "examples_per_sec": eps}), gstep)
                    info = StepInfo(
                        self.job, self.rank, step, int(gstep), float(last_loss), result.examples, now - t_log
                    )
                    if audit:
                        self._write_audit(audit, chunk)
                        audit, chunk = [], chunk + 1
                    for hook in cfg.hooks:
                        hook(info)
                    t_log, ex_log = now, 0
                if self.is_chief and step % cfg.save_checkpoint_steps == 0:
                    self._save_periodic(sess, gstep)
                if self.rebalancer is not None and step % self.rebalancer.window_steps == 0:
                    decision = self.rebalancer.window([int(c) for c in sess.run(self.traffic.counts)])  # type: ignore[union-attr]
                    if decision is not None:
                        log.info("%s rebalance window: %s", self.tag, decision.reason)
                        if decision.rebalance:
                            self._replace(sess, decision)
                            result.replaced = True
                            break
                if cfg.max_steps is not None and gstep >= cfg.max_steps:
                    break
        finally:
            if writer is not None:
                writer.close()
                self.writer = None
                self.dir.sync()
            if audit:
                self._write_audit(audit, chunk)
        result.train_seconds += time.perf_counter() - t_loop
        result.local_steps += step
        if self.report is not None:
            result.straggler = self.report.as_dict()
        if result.replaced:
            return  # the variables are being cleared: nothing more to read or mark
        if self.close_tokens is not None and cfg.max_steps is not None and gstep >= cfg.max_steps:
            # the global step fetched with a step may be read before or after that step's update,
            # so a replica can stop at max_steps while another starts one more step, whose
            # aggregate (needing this replica's gradients) never comes: closing the token queue
            # ends that replica's wait (OutOfRange) instead of leaving it blocked until killed.
            # Every step below max_steps is applied already, so no update is lost.
            sess.run(self.close_tokens)
        result.global_step = int(sess.run(self.global_step))
        # the position of the last applied batch is already stored; mark it done
        position = self._read_position(sess) or {}
        sess.run(self.set_position, {self.position_in: json.dumps({**position, "done": True})})

    # ----------------------------------------------------------------------------- adaptive batches
    def _adaptive_start(self, sess: Any) -> None:
        """Adaptive: the chief (re)starts from equal shares and owns the policies; every replica
        keeps a report of the micro-batch counts it applies."""
        g = self.config.batch_size
        if self.is_chief:
            self.chief_policy = _adaptive.AdaptiveChief(self.config.adaptive, self.world, g)
            self.report = self.chief_policy.report
            saved, gstep = sess.run([self.policy_var, self.global_step])
            if saved:
                self.chief_policy.load_state_dict(json.loads(saved), int(gstep))
                log.info(
                    "%s straggler: resumed the adaptive plan %s rows (flagged %s) at global step %d",
                    self.tag,
                    self.chief_policy.sizes(),
                    self.chief_policy.report.flagged,
                    int(gstep),
                )
            self._write_plan(sess, self.chief_policy.vector)
            opts = self.config.adaptive
            log.info(
                "%s straggler: adaptive local batches, %d rows per step over %d replicas in micro-batches "
                "of %d, re-planned every %d steps; slow = %.2fx the median per row for %d steps",
                self.tag,
                self.global_rows,
                self.world,
                g,
                opts.replan_every,
                opts.slow_factor,
                opts.slow_steps,
            )
        else:
            self.report = _adaptive.StragglerReport(g, self.global_rows)

    def _take(self, sess: Any) -> tuple[dict[Any, Any], float]:
        """The feed of this replica's next local batch (the plan's number of micro-batches, fewer
        at the end of its data) and the seconds it took; OutOfRangeError when no data is left."""
        t0 = time.perf_counter()
        # the first micro-batch comes with the global step and the plan (one run, one PS read)
        first, gstep, vector = sess.run([self.next_batch, self.global_step, self.plan_var])
        units = _adaptive.units_for([int(v) for v in vector], int(gstep), self.rank, self.world)
        if self.report is not None and (not self.report.applied or self.report.applied[-1]["units"] != units):
            self.report.applied.append({"global_step": int(gstep), "units": units})
        parts = [first]
        for _ in range(units - 1):
            try:
                parts.append(sess.run(self.next_batch))
            except tf.errors.OutOfRangeError:
                break  # the end of this replica's data: train on what there is
        if len(parts) == 1:
            features = parts[0][0]
        else:
            features = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
        feed: dict[Any, Any] = {self.feed_features[k]: v for k, v in features.items()}
        feed[self.feed_position] = parts[-1][1]  # the reader's position after the last micro-batch
        return feed, time.perf_counter() - t0

    def _observe_timings(self, sess: Any, writer: Any) -> None:
        """The chief after each step: read the timing slots, feed the policies, write a new plan."""
        policy = self.chief_policy
        if policy is None:
            return
        slots, gstep = sess.run([self.timing, self.global_step])
        line, vector = policy.observe([[float(x) for x in v] for v in slots], int(gstep))
        if line:
            log.warning("%s straggler: %s", self.tag, line)
        if vector is not None:
            self._write_plan(sess, vector)
            log.info(
                "%s straggler: local batches %s rows from global step %d", self.tag, policy.sizes(), vector[0]
            )
        if writer is not None and (line or vector is not None):
            values = {"straggler/slow_workers": float(len(policy.report.flagged))}
            values.update({f"straggler/local_batch/{r}": float(b) for r, b in enumerate(policy.sizes())})
            writer.add_summary(_summary(values), int(gstep))

    def _write_plan(self, sess: Any, vector: Sequence[int]) -> None:
        """The chief: the plan vector and the policies' state, in one run."""
        if self.chief_policy is None:
            return
        state = json.dumps(self.chief_policy.state_dict())
        sess.run(self.set_plan, {self.plan_in: list(vector), self.policy_in: state})

    # ----------------------------------------------------------------------------- re-placement
    def _park(self, sess: Any, generation: int) -> None:
        """A worker stops for re-placement ``generation``: its position is stored with its last
        step; it says it is parked and rebuilds from the new plan (rebalancing.py)."""
        sess.run(self.set_parked, {self.gen_in: generation})
        log.info("%s parked for re-placement %d; rebuilding from the new plan", self.tag, generation)

    def _replace(self, sess: Any, decision: Any) -> None:
        """The chief applies a re-placement: plan file, generation, parked workers, checkpoint,
        variables cleared on every PS (rebalancing.py)."""
        gen = self.generation + 1
        gstep = int(sess.run(self.global_step))
        entry = _rebalancing.history_entry(decision, self.balance_plan, gen, gstep)
        log.info(
            "%s re-placement %d at global step %d: %s; moving %s",
            self.tag,
            gen,
            gstep,
            decision.reason,
            "; ".join(entry["moved"]) or "nothing",
        )
        self.dir.write_json(
            _rebalancing.PLAN_FILE,
            {
                "generation": gen,
                "plan": _rebalancing.plan_to_json(decision.plan),
                "history": [*self.rebalances, entry],
            },
        )
        sess.run(self.set_gen, {self.gen_in: gen})
        deadline = time.monotonic() + self.config.ready_timeout
        while self.world > 1:
            parked = sess.run(self.parked)
            positions = sess.run(self.positions)
            waiting = [
                r
                for r in range(1, self.world)
                if int(parked[r]) < gen and not (positions[r] and json.loads(positions[r]).get("done"))
            ]
            if not waiting or time.monotonic() >= deadline:
                if waiting:
                    log.warning(
                        "%s workers %s did not park within ready_timeout=%gs: their updates after the "
                        "checkpoint are undone and their rows read again from its position",
                        self.tag,
                        waiting,
                        self.config.ready_timeout,
                    )
                break
            time.sleep(self.config.ready_poll)
        self._save(sess, int(sess.run(self.global_step)))
        # the old shards leave the PS: every variable of the job's container is cleared
        tf.compat.v1.Session.reset(
            self.server.target, [self.config.container] if self.config.container else None
        )

    def _applied(self) -> None:
        """The new chief restored into the new placement: record the pause in the history."""
        entry = self.rebalances[-1]
        entry["pause_s"] = round(time.time() - float(entry["decided_at"]), 3)
        log.info(
            "%s re-placement %d applied: pause %.2f s (decision to restored), %.0f bytes moved "
            "(lower bound %.0f), traffic max/mean %.3f -> planned %.3f",
            self.tag,
            entry["generation"],
            entry["pause_s"],
            entry["bytes_moved"],
            entry["min_bytes"],
            entry["before"].get("traffic", float("nan")),
            entry["after"].get("traffic", float("nan")),
        )
        doc = self.dir.read_json(_rebalancing.PLAN_FILE) or {}
        doc["history"] = self.rebalances
        self.dir.write_json(_rebalancing.PLAN_FILE, doc)
        if self.placement is not None:
            self.placement["rebalances"] = self.rebalances

    def _write_audit(self, values: list[np.ndarray], chunk: int) -> None:
        # one file per chunk of applied batches, so a killed process keeps what it logged
        buf = io.BytesIO()
        np.save(buf, np.concatenate(values))
        name = f"audit/rank{self.rank}-pid{os.getpid()}-g{self.generation}-{chunk:06d}.npy"  # a rebuild counts anew
        self.dir.write_bytes(name, buf.getvalue())

    def _save(self, sess: Any, gstep: int) -> str:
        t0 = time.perf_counter()
        if self.chief_policy is not None:  # the policies' newest speeds and flags go with it
            self._write_plan(sess, self.chief_policy.vector)
        path = self.ckpts.save(sess, int(gstep))
        log.info(
            "%s checkpoint %s (%.2f s)",
            self.tag,
            self.dir.display + path[len(self.dir.url) :],
            time.perf_counter() - t0,
        )
        if self.writer is not None and not self.dir.native:
            self.writer.flush()
            self.dir.sync()  # summaries reach an fsspec-only model_dir with each checkpoint
        return path

    def _save_periodic(self, sess: Any, gstep: int) -> None:
        """A periodic checkpoint. If it cannot be written (the store is unreachable after its
        client's retries), training goes on: the last committed checkpoint stays the latest, with
        its own reader positions, so a restore from it still loses no row; the next period tries
        again. MAX_FAILED_SAVES failures in a row, and any failure of the final save, raise. A
        lost PS (a TensorFlow error) always raises, so the job restarts."""
        try:
            self._save(sess, gstep)
            self._failed_saves = 0
        except tf.errors.OpError:
            raise
        except Exception as e:
            self._failed_saves += 1
            if self._failed_saves >= MAX_FAILED_SAVES:
                raise
            log.warning(
                "%s checkpoint at global step %d failed (%s: %s); training goes on and the last "
                "committed checkpoint stays the latest (%d of %d failures in a row)",
                self.tag,
                gstep,
                type(e).__name__,
                " ".join(str(e).split())[:200],
                self._failed_saves,
                MAX_FAILED_SAVES,
            )

    def _chief_end(self, sess: Any, result: RunResult) -> None:
        if self.distributed and self.world > 1:
            if self.close_tokens is not None:
                sess.run(self.close_tokens)
            if self.sync_opt is None or self.close_tokens is not None:
                self._wait_workers(sess)
        gstep = int(sess.run(self.global_step))
        result.global_step = gstep
        self._measured(sess, result)
        result.checkpoint = self._save(sess, gstep)
        self.dir.write_json(
            TRAINED_MARKER, {"checkpoint": result.checkpoint, "global_step": gstep, "time": time.time()}
        )
        if self.distributed:
            sess.run(self.set_done)

    def _measured(self, sess: Any, result: RunResult) -> None:
        """Add the measured per-PS load (the chief's steps) to the placement report; log, write it."""
        if self.placement is None or self.traffic is None:
            return
        steps, traffic = self.traffic.per_ps(sess, self.num_ps)
        self.placement = load_report(self.placement, self.planned_loads, (self.resident, traffic), steps)
        self.dir.write_json(PLACEMENT_REPORT, self.placement)
        result.placement = self.placement
        log.info("%s %s", self.tag, measured_line(self.placement, steps))

    def _wait_workers(self, sess: Any) -> None:
        t0 = time.monotonic()
        last_save = int(sess.run(self.global_step))
        pending: list[int] = []
        while time.monotonic() - t0 < self.config.worker_wait_timeout:
            raw = sess.run(self.positions)
            pending = [
                r for r, s in enumerate(raw) if r != self.rank and not (s and json.loads(s).get("done"))
            ]
            if not pending:
                log.info("%s all workers done (waited %.1f s)", self.tag, time.monotonic() - t0)
                return
            gstep = int(sess.run(self.global_step))
            if gstep - last_save >= self.config.save_checkpoint_steps:
                self._save_periodic(sess, gstep)
                last_save = gstep
            time.sleep(0.2)
        log.warning(
            "%s ranks %s not done after worker_wait_timeout=%ss; finishing without them",
            self.tag,
            pending,
            self.config.worker_wait_timeout,
        )

    # ----------------------------------------------------------------------------- export
    def _finish(self, result: RunResult, t_start: float) -> RunResult:
        cfg = self.config
        export_dir = cfg.export_dir or self.dir.join("export")
        checkpoint = _export.checkpoint_to_export(cfg, self.dir, self.model_dir, result)
        if checkpoint is None:
            result.seconds = time.perf_counter() - t_start
            return result
        predictor = _export.Predictor(self.model, self.ckpts.local_copy(checkpoint), self.num_ps)
        try:
            local_export = write_export(export_dir, self.dir, predictor.export, cfg.storage_options)
            result.export_dir = export_dir
            log.info("%s exported SavedModel to %s", self.tag, _export.redact_uri(export_dir))
            if cfg.eval_data:
                result.metrics, sample = _export.evaluate(
                    predictor, self.read, cfg.eval_data, keep=cfg.eval_predictions, options=cfg.reader_options
                )
                _export.record_eval(self.dir, self.tag, cfg.eval_data, result.metrics, sample)
                with tf.Graph().as_default():
                    writer = tf.compat.v1.summary.FileWriter(self.dir.writable("eval"))
                    values = {f"eval/{k}": result.metrics[k] for k in ("auc", "logloss")}
                    writer.add_summary(_summary(values), result.global_step)
                    writer.close()
                self.dir.sync("eval")
        finally:
            predictor.close()
        result.seconds = time.perf_counter() - t_start
        _export.publish_result(self.dir, cfg, local_export, result, lambda: self._metadata(result))
        return result

    def _metadata(self, result: RunResult) -> dict[str, Any]:
        return _export.result_metadata(
            result,
            mode="between_graph",
            model=self.model,
            config=self.config,
            model_dir=self.model_dir,
            cluster_spec=self.info.cluster,
            params={"sync": self.config.sync, "straggler": self.config.straggler},
        )


def _tf_dtype(kind: str) -> Any:
    return {"string": tf.string, "float32": tf.float32, "int64": tf.int64}[kind]


def _summary(values: Mapping[str, float]) -> Any:
    return tf.compat.v1.Summary(
        value=[tf.compat.v1.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()]
    )


def _cut_snapshot(whole: Sequence[VariableInfo], plan: Any) -> list[VariableInfo]:
    """``whole`` with every variable the balanced plan cuts replaced by its shards (pro rata rows)."""
    rows = plan.rows()
    out: list[VariableInfo] = []
    for v in whole:
        parts = rows.get(v.name, [])
        if len(parts) <= 1:
            out.append(v)
            continue
        total = sum(parts)
        for i, r in enumerate(parts):
            out.append(
                VariableInfo(
                    f"{v.name}/part_{i}",
                    (r, *v.shape[1:]),
                    v.dtype,
                    v.nbytes * r // total,
                    traffic=v.traffic * r / total,
                    kind=v.kind,
                    group=v.name,
                )
            )
    return out
