"""Contracts of TensorFlow parameter-server training: placement, configuration, models, errors.

Nothing here imports TensorFlow, so a placement policy (and the ``balance/`` planner that plugs
in next) can be written and unit-tested on hand-made snapshots without a cluster. The same
contracts serve the between-graph mode (``kubeai_train.tf.run``) and the coordinator mode that
follows it: a policy sees a :class:`VariableInfo` snapshot and returns a :class:`PlacementPlan`.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "STRAGGLER_MODES",
    "AdaptiveBatching",
    "RunResult",
    "RETRYABLE_EXIT_CODE",
    "ClusterUnavailableError",
    "Model",
    "PlacementError",
    "PlacementPlan",
    "PlacementPolicy",
    "ReadyTimeoutError",
    "StepInfo",
    "TrainConfig",
    "TrainError",
    "VariableInfo",
]

#: The exit code of a chief (or worker) that lost a parameter server: >= 128 so that a TFJob's
#: ``restartPolicy: ExitCode`` and the local launcher treat it as retryable and bring it back,
#: after which it restores the last checkpoint.
RETRYABLE_EXIT_CODE = 138

_SECRET = re.compile(r"storage_options|key|secret|token|password|credential", re.I)


class TrainError(Exception):
    """Base of kubeai_train.tf errors; carries its message only, so it pickles."""


class PlacementError(TrainError, ValueError):
    """A placement policy returned a plan that does not fit the snapshot or the PS count."""


class ReadyTimeoutError(TrainError, TimeoutError):
    """A worker waited longer than ``ready_timeout`` for the chief to initialise the model."""


class ClusterUnavailableError(TrainError, ConnectionError):
    """A parameter server went away (or came back empty) mid-run; the job must restore."""

    exit_code = RETRYABLE_EXIT_CODE


@dataclass(frozen=True)
class VariableInfo:
    """One variable (or one shard of a partitioned variable) as a placement policy sees it.

    Attributes:
        name: the variable op name, e.g. ``"deepfm/emb_v/part_1"``.
        shape: its (shard's) shape.
        dtype: its dtype name, e.g. ``"float32"``.
        nbytes: the bytes it holds (shape x dtype size), optimizer slots colocated with it included.
        traffic: an estimate of the bytes moved per training step (read + update); for an
            embedding shard, the looked-up rows rather than the whole table.
        kind: ``"embedding"``, ``"dense"`` or ``"state"`` (step counters, data positions).
        group: the partitioned variable a shard belongs to (its name without ``/part_N``).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    traffic: float = 0.0
    kind: str = "dense"
    group: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise PlacementError("VariableInfo.name must not be empty")
        if self.nbytes < 0:
            raise PlacementError(f"VariableInfo {self.name!r}: nbytes must be >= 0, got {self.nbytes}")
        if self.traffic < 0 or math.isnan(self.traffic):
            raise PlacementError(f"VariableInfo {self.name!r}: traffic must be >= 0, got {self.traffic}")


@dataclass(frozen=True)
class PlacementPlan:
    """Which parameter server holds each variable / shard.

    Attributes:
        assignment: variable name -> PS task index.
        num_ps: the number of parameter servers planned for.
        policy: the name of the policy that made the plan.
    """

    assignment: Mapping[str, int]
    num_ps: int
    policy: str = ""

    def __post_init__(self) -> None:
        if self.num_ps < 1:
            raise PlacementError(f"num_ps must be >= 1, got {self.num_ps}")
        for name, task in self.assignment.items():
            if not isinstance(task, int) or not 0 <= task < self.num_ps:
                raise PlacementError(
                    f"plan puts {name!r} on ps {task!r}; valid tasks are 0..{self.num_ps - 1}"
                )

    def validate(self, variables: Sequence[VariableInfo]) -> None:
        """Raise PlacementError if a variable of the snapshot has no place."""
        missing = [v.name for v in variables if v.name not in self.assignment]
        if missing:
            raise PlacementError(
                f"placement plan of {self.policy or 'policy'} leaves {len(missing)} variables "
                f"unplaced, e.g. {missing[:3]}; a policy must place every variable it is given"
            )

    def report(self, variables: Sequence[VariableInfo]) -> dict[str, Any]:
        """Bytes, traffic and variables per PS, and the max/mean byte imbalance."""
        by_name = {v.name: v for v in variables}
        per_ps: list[dict[str, Any]] = [
            {"task": t, "bytes": 0, "traffic": 0.0, "variables": []} for t in range(self.num_ps)
        ]
        for name, task in sorted(self.assignment.items()):
            info = by_name.get(name)
            entry = per_ps[task]
            entry["variables"].append(name)
            if info is not None:
                entry["bytes"] += info.nbytes
                entry["traffic"] += info.traffic
        loads = [e["bytes"] for e in per_ps]
        mean = sum(loads) / len(loads)
        return {
            "policy": self.policy,
            "num_ps": self.num_ps,
            "ps": per_ps,
            "bytes_max_over_mean": (max(loads) / mean) if mean else 1.0,
        }


class PlacementPolicy(ABC):
    """Decides a parameter server for every variable / shard: a pure function of a snapshot.

    The trainer builds the model once in a throw-away graph to take the snapshot, calls
    :meth:`plan`, and plugs the plan into ``replica_device_setter`` as its ``ps_strategy``; every
    role computes the same plan from the same snapshot, so the policy must be deterministic.
    """

    name: str = "policy"

    @abstractmethod
    def plan(self, variables: Sequence[VariableInfo], num_ps: int) -> PlacementPlan:
        """Return a plan placing every variable of ``variables`` on one of ``num_ps`` servers."""


@dataclass(frozen=True)
class StepInfo:
    """What a per-step callback sees (hooks observe; they cannot change the step)."""

    role: str
    rank: int
    local_step: int
    global_step: int
    loss: float
    examples: int
    seconds: float


#: What ``TrainConfig.straggler`` accepts.
STRAGGLER_MODES = ("none", "adaptive", "backup")


@dataclass(frozen=True)
class AdaptiveBatching:
    """How ``straggler="adaptive"`` sizes each replica's local batch in synchronous training.

    The reader's ``batch_size`` is the *micro-batch* (``g`` rows, the granularity of a local
    batch); a replica takes a whole number ``k_i >= 1`` of micro-batches per step. At equal
    shares each takes ``micro_batches`` of them, so the global batch is ``world x micro_batches
    x batch_size`` rows and stays that while the shares follow the replicas' measured speed.
    The same settings (and defaults) as ``kubeai_train.torch.AdaptiveBatching``.

    Attributes:
        micro_batches: micro-batches per replica at equal shares (the resolution of a re-plan).
        replan_every: the chief's observed steps between re-plans (R).
        hysteresis: adopt a new plan only when it predicts a step at least this fraction shorter.
        smoothing: weight of the newest step in a replica's speed (exponential average, (0, 1]).
        slow_factor: a replica is slow when its compute time per row exceeds this many times the
            median of the others' (k, > 1) ...
        slow_steps: ... for this many consecutive steps (m); as many normal steps clear it.
    """

    micro_batches: int = 8
    replan_every: int = 10
    hysteresis: float = 0.05
    smoothing: float = 0.5
    slow_factor: float = 1.5
    slow_steps: int = 2

    def __post_init__(self) -> None:
        for name in ("micro_batches", "replan_every", "slow_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TrainError(f"adaptive.{name} must be an integer >= 1, got {value!r}")
        h, s, k = self.hysteresis, self.smoothing, self.slow_factor
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not 0 <= h < 1:
            raise TrainError(f"adaptive.hysteresis must be a fraction in [0, 1), got {h!r}")
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 1:
            raise TrainError(f"adaptive.smoothing must be in (0, 1], got {s!r}")
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not (math.isfinite(k) and k > 1):
            raise TrainError(
                f"adaptive.slow_factor must be a finite number > 1 (times the median), got {k!r}"
            )


@dataclass
class TrainConfig:
    """How to train; every role of a job gets the same config.

    Attributes:
        model_dir: checkpoints, summaries, markers, the placement report. A path TensorFlow
            writes (local, gs://; shared by the chief and the PS, as on a TFJob volume: each PS
            writes its own checkpoint shard) or any fsspec URL (oss://bucket/dir: the chief
            writes checkpoints part by part through local staging, see
            :mod:`kubeai_train.tf.between_graph.checkpoints`).
        storage_options: fsspec options for an fsspec-only model_dir / export_dir (default: from
            the environment, e.g. ``OSS_ENDPOINT`` and the ``OSS_ACCESS_KEY_*`` variables).
        staging_dir: local scratch space for files bound for an fsspec-only model_dir (default:
            a directory under ``tempfile.gettempdir()``). Needs room for one checkpoint part.
        checkpoint_part_bytes: with an fsspec-only model_dir, the most bytes of variables the
            chief reads into memory and staging per checkpoint part (default 64 MiB: in
            ``benchmarks/bench_tf_checkpoint.py`` parts that size saved a 488 MiB table faster
            and with a third of the chief memory of 256 MiB parts).
        train_data: the training data URI (anything ``kubeai_train.data.read`` opens).
        eval_data: the eval data URI; the chief measures AUC and log loss there after training.
        batch_size: rows per step per worker.
        num_epochs: passes over the training data (each worker reads its share once per epoch).
        shuffle / seed: passed to the reader.
        save_checkpoint_steps: the chief checkpoints every N of its own steps (and at the end).
        log_steps: loss and examples/s logged (and written as summaries) every N local steps.
        sync: synchronous updates through SyncReplicasOptimizer (needs ``max_steps``).
        backup_workers: with ``sync``, gradients of this many replicas per step are not waited for
            (``straggler="backup"``; 1 when ``straggler="backup"`` leaves it 0).
        straggler: slow-worker mitigation of synchronous training: ``"none"``, ``"backup"``
            (``backup_workers`` replicas per step are dropped: the slow ones; the bias is written
            down in :mod:`kubeai_train.straggler.backup`) or ``"adaptive"`` (a fixed global batch
            with local batches that follow each replica's measured speed, gradients weighted so
            the average is the global-batch mean; see
            :mod:`kubeai_train.tf.between_graph.adaptive`). Both need ``sync=True``.
        adaptive: the settings of ``straggler="adaptive"``.
        max_steps: stop at this global step (required with ``sync``; optional otherwise).
        ready_timeout: seconds a worker waits for the chief to initialise / restore the model.
        ready_poll: seconds between readiness polls (SessionManager waits 30 s; we poll fast).
        worker_wait_timeout: seconds the chief waits, after its own data is done, for the workers
            to finish theirs before the final checkpoint.
        operation_timeout: seconds after which one session.run call fails (no step hangs forever).
        export_dir: where the chief writes the SavedModel (default ``<model_dir>/export``).
        model_repo / model_name: publish the SavedModel there (skipped when model_repo is None).
        eval_predictions: how many eval predictions to keep beside the export for verification.
        reader_options: extra keyword arguments for ``kubeai_train.data.read``.
        params: free-form parameters recorded in the published lineage.
        hooks: callables given a :class:`StepInfo` every ``log_steps`` steps.
        container: the resource container of every variable of the job on the PS (default: the
            server's default). Jobs, or rounds of a stress test, that share long-lived PS processes
            stay apart by using different containers.
        audit_column: an int64 column (e.g. a row id) whose values for every applied batch each
            trainer writes to ``<model_dir>/audit/rank<R>-pid<P>-<chunk>.npy`` (flushed every
            ``log_steps``), to verify who read what.
    """

    model_dir: str
    train_data: str
    eval_data: str | None = None
    batch_size: int = 512
    num_epochs: int = 1
    shuffle: bool = True
    seed: int = 0
    save_checkpoint_steps: int = 500
    log_steps: int = 100
    sync: bool = False
    backup_workers: int = 0
    straggler: str = "none"
    adaptive: AdaptiveBatching = field(default_factory=AdaptiveBatching)
    max_steps: int | None = None
    ready_timeout: float = 300.0
    ready_poll: float = 0.1
    worker_wait_timeout: float = 900.0
    operation_timeout: float = 120.0
    export_dir: str | None = None
    model_repo: str | None = None
    model_name: str = "ctr"
    eval_predictions: int = 2048
    reader_options: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    hooks: Sequence[Callable[[StepInfo], None]] = ()
    audit_column: str | None = None
    container: str = ""
    storage_options: dict[str, Any] = field(default_factory=dict)
    staging_dir: str | None = None
    checkpoint_part_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if not self.model_dir:
            raise TrainError("model_dir must be set: checkpoints and the export go there")
        if not self.train_data:
            raise TrainError("train_data must be set to a data URI, e.g. /data/ctr/train")
        for name in (
            "batch_size",
            "num_epochs",
            "save_checkpoint_steps",
            "log_steps",
            "checkpoint_part_bytes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TrainError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise TrainError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.sync and self.max_steps is None:
            raise TrainError("sync=True needs max_steps: synchronous replicas stop together at a global step")
        if not isinstance(self.backup_workers, int) or isinstance(self.backup_workers, bool):
            raise TrainError(f"backup_workers must be an integer >= 0, got {self.backup_workers!r}")
        if self.backup_workers < 0:
            raise TrainError(f"backup_workers must be >= 0, got {self.backup_workers}")
        if self.straggler not in STRAGGLER_MODES:
            raise TrainError(f"straggler must be one of {', '.join(STRAGGLER_MODES)}, got {self.straggler!r}")
        if self.straggler != "none" and not self.sync:
            raise TrainError(
                f"straggler={self.straggler!r} mitigates slow workers in synchronous training; "
                "set sync=True (asynchronous training does not wait for them)"
            )
        if not isinstance(self.adaptive, AdaptiveBatching):
            raise TrainError(f"adaptive must be an AdaptiveBatching, got {type(self.adaptive).__name__}")
        if self.straggler == "adaptive" and self.backup_workers:
            raise TrainError(
                f"straggler='adaptive' aggregates every replica's gradient; got backup_workers="
                f"{self.backup_workers}: use straggler='backup' or backup_workers=0"
            )
        if self.backup_workers and not self.sync:
            raise TrainError("backup_workers only applies with sync=True")
        # backup workers are the "backup" mitigation whichever way they are asked for
        if self.straggler == "backup" and not self.backup_workers:
            self.backup_workers = 1
        elif self.backup_workers and self.straggler == "none":
            self.straggler = "backup"
        for name in ("ready_timeout", "ready_poll", "worker_wait_timeout", "operation_timeout"):
            if getattr(self, name) <= 0:
                raise TrainError(f"{name} must be > 0 seconds, got {getattr(self, name)}")

    def describe(self) -> dict[str, Any]:
        """The configuration as plain data for logs: no callables, no secrets (reader options that
        may carry credentials, such as ``storage_options``, show their keys only; URIs lose any
        ``user:password@`` part)."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("hooks",)}
        out["hooks"] = len(self.hooks)
        out["adaptive"] = dict(self.adaptive.__dict__)
        out["reader_options"] = {
            k: (sorted(v) if isinstance(v, Mapping) else "***") if _SECRET.search(k) else v
            for k, v in self.reader_options.items()
        }
        out["storage_options"] = sorted(self.storage_options)  # keys only: values carry credentials
        for k in ("train_data", "eval_data", "model_repo", "model_dir", "export_dir"):
            if isinstance(out.get(k), str):
                out[k] = re.sub(r"//[^/@]*@", "//***@", out[k])
        return out


class Model(ABC):
    """What a user writes: raw columns in, logits out. Built once per process and graph.

    Attributes:
        label: the label column (0/1).
    """

    label: str = "label"

    @abstractmethod
    def raw_features(self) -> Mapping[str, str]:
        """Raw input columns -> ``"string"`` or ``"float32"``; the serving signature takes these."""

    @abstractmethod
    def logits(self, features: Mapping[str, Any], *, num_ps: int, training: bool) -> Any:
        """Build the model on a dict of raw feature tensors (shape ``[batch]``) and return logits
        ``[batch]``. Create variables with ``tf.compat.v1.get_variable``; pass
        ``kubeai_train.tf.partitioner(num_ps, ...)`` for tables to shard over the PS."""

    @abstractmethod
    def optimizer(self) -> Any:
        """A ``tf.compat.v1.train.Optimizer``."""

    def params(self) -> dict[str, Any]:
        """Hyper-parameters recorded in the published lineage."""
        return {}


@dataclass
class RunResult:
    """What ``run`` returns in this process (the chief's has metrics and the published version)."""

    role: str
    rank: int
    local_steps: int = 0
    examples: int = 0
    global_step: int = 0
    seconds: float = 0.0
    checkpoint: str | None = None
    export_dir: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    version: int | None = None
    model_uri: str | None = None
    placement: dict[str, Any] | None = None
    #: this run ended for a runtime re-placement: ``run`` rebuilds and continues (internal)
    replaced: bool = False
    ready_seconds: float = 0.0
    ready_at: float = 0.0
    train_seconds: float = 0.0
    first_step_seconds: float = 0.0
    first_step_examples: int = 0
    #: with ``straggler="adaptive"``: plans, slow-worker detections and speeds (the chief's in
    #: full; a worker's holds the micro-batch counts it applied)
    straggler: dict[str, Any] | None = None
