"""Legacy Keras ``Model.fit`` under ParameterServerStrategy (tf-keras, ``TF_USE_LEGACY_KERAS=1``).

Keras 3's ``fit`` does not support ParameterServerStrategy; tf-keras (Keras 2) does: its ``fit``
creates a ClusterCoordinator itself and schedules the train steps onto the workers. TensorFlow
resolves ``tf.keras`` lazily, on first attribute access, from ``TF_USE_LEGACY_KERAS``; importing
this module sets it to ``1`` before that first access, so ``tf.keras`` in the user's model code is
tf-keras. If something already resolved ``tf.keras`` to Keras 3 in this process, :func:`fit`
raises instead of mixing the two (set ``TF_USE_LEGACY_KERAS=1`` in the job's environment, e.g.
``python -m kubeai_train.launch ... --env TF_USE_LEGACY_KERAS=1``, or import this module first).

``fit(build, dataset_fn, config)`` runs every role like :func:`kubeai_train.tf.coordinator.run`:
ps and workers serve (same servers, same done marker); the chief connects, builds the model under
the strategy with variables placed by the placement policy (the same planning pass and variable
creator as the coordinator mode), and calls ``model.fit`` with a ``DatasetCreator`` over
``dataset_fn`` (a function of an ``InputContext``, run for each worker; for files read on the
workers shard them with ``tf.distribute.coordinator.experimental_get_current_worker_index()``),
``steps_per_epoch`` (required: the datasets must repeat) and ``BackupAndRestore`` in
``<model_dir>/backup`` (a restarted chief resumes at the last epoch boundary). Then it saves the
model as a SavedModel to ``<model_dir>/export``.

``model_dir`` may be any fsspec URL (oss://...): the placement report, the export (saved in local
staging, then uploaded) and the done marker go through :class:`~kubeai_train.tf.model_dir.ModelDir`.
Keras' own callbacks write through TensorFlow's file system only, so there is no
``BackupAndRestore`` in such a model_dir (a restarted chief starts again at epoch 0; a warning
says so), and a user's ``ModelCheckpoint`` / ``BackupAndRestore`` / ``TensorBoard`` whose path
TensorFlow cannot write is rejected in one line before anything starts.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

os.environ["TF_USE_LEGACY_KERAS"] = "1"

import tensorflow as tf

from kubeai_train import cluster
from kubeai_train.tf.coordinator.placement import PlanApplier, infos, snapshot_build, verify
from kubeai_train.tf.coordinator.trainer import (
    DONE_MARKER,
    PLACEMENT_REPORT,
    _cluster_spec,
    _serve,
    _setup_logging,
)
from kubeai_train.tf.coordinator.types import CoordinatorOptions
from kubeai_train.tf.model_dir import ModelDir, redact, tf_writes, write_export
from kubeai_train.tf.placement_policies import RoundRobinPlacement, check_plan
from kubeai_train.tf.types import PlacementPolicy, RunResult, TrainError

__all__ = ["FitConfig", "fit", "legacy_keras"]

log = logging.getLogger("kubeai_train.tf")


def legacy_keras() -> Any:
    """``tf.keras`` as tf-keras; raises TrainError if this process already resolved it to Keras 3."""
    keras = tf.keras
    if not keras.__name__.startswith("tf_keras"):
        raise TrainError(
            f"tf.keras is {keras.__name__} (Keras 3), whose Model.fit does not support "
            "ParameterServerStrategy; set TF_USE_LEGACY_KERAS=1 in the job's environment or import "
            "kubeai_train.tf.keras_ps before anything touches tf.keras (pip install tf-keras)"
        )
    return keras


@dataclass
class FitConfig:
    """What ``fit`` needs beyond the model and data.

    Attributes:
        model_dir: backups (BackupAndRestore), the placement report, the export: a path
            TensorFlow writes or any fsspec URL (then without backups, see the module doc).
        epochs / steps_per_epoch: passed to ``Model.fit`` (``steps_per_epoch`` is required under
            ParameterServerStrategy: the per-worker datasets repeat).
        batch_size: recorded for the placement snapshot's traffic estimate.
        options: the coordinator-mode options (partitioner, connect timeout, done poll).
        fit_kwargs: more keyword arguments for ``Model.fit`` (callbacks are appended to ours).
        storage_options: fsspec options for an fsspec-only model_dir (default: from the
            environment, e.g. the ``OSS_*`` variables).
        staging_dir: local scratch space for the export bound for an fsspec-only model_dir.
    """

    model_dir: str
    epochs: int = 1
    steps_per_epoch: int = 100
    batch_size: int = 512
    options: CoordinatorOptions = field(default_factory=CoordinatorOptions)
    fit_kwargs: dict[str, Any] = field(default_factory=dict)
    storage_options: dict[str, Any] = field(default_factory=dict)
    staging_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.model_dir:
            raise TrainError("model_dir must be set: backups and the export go there")
        for name in ("epochs", "steps_per_epoch", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise TrainError(f"{name} must be an integer >= 1, got {v!r}")


def fit(
    build: Callable[[], Any],
    dataset_fn: Callable[[Any], Any],
    config: FitConfig,
    *,
    placement: PlacementPolicy | None = None,
) -> RunResult:
    """Run this process's role of a legacy-Keras ``fit`` job (see the module doc).

    Args:
        build: returns a compiled ``tf.keras`` (tf-keras) model with all its variables created
            (build it on an input shape); called once in a throw-away graph for the placement
            snapshot and once under the strategy.
        dataset_fn: ``dataset_fn(input_context) -> tf.data.Dataset`` of ``(features, labels)``
            batches, repeated.
        config: see :class:`FitConfig`.
        placement: the placement policy (default round-robin).

    Returns:
        RunResult; the chief's has ``placement``, ``global_step`` (optimizer iterations),
        ``metrics`` (the last epoch's logs) and ``export_dir``.

    Raises:
        TrainError: a model_dir nobody can write, or a Keras callback writing where TensorFlow
            cannot (both before any server starts).
    """
    _setup_logging()
    keras = legacy_keras()
    model_dir = ModelDir(
        config.model_dir, storage_options=config.storage_options, staging_dir=config.staging_dir
    )
    user_callbacks = list(config.fit_kwargs.pop("callbacks", []))
    check_callbacks(user_callbacks)
    info = cluster.current()
    opts = config.options
    if info.framework == "tf" and info.role in ("ps", "worker"):
        return _serve(info, model_dir, opts)
    if info.framework == "tf" and info.role not in ("chief", "master"):
        raise TrainError(f"legacy Keras fit uses chief, ps and worker tasks; this is a {info.role}")
    model_dir.makedirs()
    result = RunResult(role="chief" if info.framework == "tf" else "local", rank=0)
    t0 = time.perf_counter()
    callbacks: list[Any] = []
    if model_dir.native:
        callbacks.append(keras.callbacks.BackupAndRestore(model_dir.join("backup")))
    else:
        log.warning(
            "model_dir %s is not one TensorFlow writes: Keras' BackupAndRestore cannot back up there, "
            "so a restarted chief starts again at epoch 0 (use a path TensorFlow writes, e.g. a shared "
            "volume or gs://, to resume at the last epoch)",
            model_dir.display,
        )
    callbacks += user_callbacks
    if info.framework != "tf":
        model = build()
        history = model.fit(dataset_fn(tf.distribute.InputContext()), epochs=config.epochs,
                            steps_per_epoch=config.steps_per_epoch, callbacks=callbacks, **config.fit_kwargs)  # fmt: skip
    else:
        os.environ["GRPC_FAIL_FAST"] = "use_caller"
        num_ps = len(info.cluster.get("ps", ()))
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        parts = tf.distribute.experimental.partitioners
        partitioner = (
            parts.FixedShardsPartitioner(opts.fixed_shards)
            if opts.fixed_shards
            else parts.MinSizePartitioner(
                min_shard_bytes=opts.min_shard_bytes, max_shards=opts.max_shards or num_ps
            )
        )
        strategy = tf.distribute.ParameterServerStrategy(resolver, variable_partitioner=partitioner)
        policy = placement or RoundRobinPlacement()
        planned = [p for p in snapshot_build(build, partitioner) if p.trainable]
        snap = infos(planned, config.batch_size)
        plan = policy.plan(snap, num_ps)
        check_plan(plan, snap, num_ps)
        applier = _TrainableApplier(planned, plan)
        with tf.variable_creator_scope(applier), strategy.scope():
            model = build()
        applier.finish()
        report = plan.report(snap)
        report.update(verify(applier))
        report["mode"] = "keras_fit"
        result.placement = report
        model_dir.write_json(PLACEMENT_REPORT, report)
        creator = keras.utils.experimental.DatasetCreator(dataset_fn)
        history = model.fit(creator, epochs=config.epochs, steps_per_epoch=config.steps_per_epoch,
                            callbacks=callbacks, **config.fit_kwargs)  # fmt: skip
    result.metrics = {k: float(v[-1]) for k, v in history.history.items()}
    result.global_step = int(model.optimizer.iterations.numpy())
    export_dir = model_dir.join("export")
    write_export(
        export_dir, model_dir, lambda path: model.save(path, save_format="tf"), config.storage_options
    )
    result.export_dir = export_dir
    result.seconds = time.perf_counter() - t0
    log.info(
        "[%s] fit done: %s, %d steps, exported to %s",
        result.role,
        result.metrics,
        result.global_step,
        model_dir.display + export_dir[len(model_dir.url) :],
    )
    if info.framework == "tf":
        model_dir.write_json(DONE_MARKER, {"time": time.time(), "cluster": _cluster_spec(info)})
    return result


#: the path attribute of each Keras callback that writes files (through TensorFlow's file system)
_CALLBACK_PATHS = {"ModelCheckpoint": "filepath", "BackupAndRestore": "backup_dir", "TensorBoard": "log_dir"}


def check_callbacks(callbacks: Sequence[Any]) -> None:
    """Reject a Keras callback that would write where TensorFlow cannot (oss://, s3://, ...).

    Raises:
        TrainError: naming the callback, its path (credentials masked) and what to do.
    """
    for cb in callbacks:
        for cls in type(cb).__mro__:
            attr = _CALLBACK_PATHS.get(cls.__name__)
            path = getattr(cb, attr, None) if attr else None
            if isinstance(path, str) and not tf_writes(path):
                raise TrainError(
                    f"{type(cb).__name__}({attr}={redact(path)!r}): Keras callbacks write through "
                    f"TensorFlow's file system, which cannot write {path.split('://', 1)[0]}://; give it a "
                    "local path, a shared volume or gs:// (fit puts the placement report and the export in "
                    "an fsspec model_dir itself)"
                )


class _TrainableApplier(PlanApplier):
    """The plan applier for Keras: variables outside the plan (optimizer iterations, metric
    totals, BackupAndRestore's epoch counter) go round-robin by TensorFlow, as without a policy;
    the planned ones must still come in the planned order (else one warning, see the base)."""

    def __call__(self, next_creator: Callable[..., Any], **kwargs: Any) -> Any:
        raw = (kwargs.get("name") or "").split(":")[0]
        nxt = self.planned[self._next].raw_name if self._next < len(self.planned) else None
        if "colocate_with" not in kwargs and self._pin is None and raw != nxt:
            return next_creator(**kwargs)
        return super().__call__(next_creator, **kwargs)
