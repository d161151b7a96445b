"""SavedModel export (raw features in, click probability out), evaluation and publishing.

The chief calls these after the final checkpoint, in a fresh local graph: the model is rebuilt
for inference on placeholders named after the raw columns (the same feature transforms as in
training, so serving needs no preprocessing code), the checkpoint is restored into it, and the
SavedModel is written to a temporary directory and renamed into place. Evaluation runs the same
graph over the eval data, so the reported metrics are those of exactly what was exported.

Shared by both modes (between-graph ``trainer`` and ``coordinator``): :func:`model_metadata`
(what a published version records) and the JSON markers in ``model_dir`` (:func:`read_marker`,
:func:`write_marker`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from kubeai_train.tf import metrics
from kubeai_train.tf.model_dir import ModelDir
from kubeai_train.tf.reading import ReadFn, clean_batch, reader_options
from kubeai_train.tf.types import Model, RunResult, TrainConfig, TrainError

__all__ = [
    "PUBLISHED_MARKER",
    "SIGNATURE",
    "TRAINED_MARKER",
    "Predictor",
    "evaluate",
    "export_saved_model",
    "find_published",
    "model_metadata",
    "placement_load",
    "publish",
    "publish_once",
    "read_marker",
    "redact_uri",
    "write_marker",
]

log = logging.getLogger("kubeai_train.tf")

SIGNATURE = "serving_default"
#: in ``model_dir``: the final checkpoint and global step, written once training is done.
TRAINED_MARKER = "_TRAINED.json"
#: in ``model_dir``: the version that checkpoint was published as (a restarted chief does not
#: publish it again).
PUBLISHED_MARKER = "_PUBLISHED.json"
_DTYPES = {"string": tf.string, "float32": tf.float32}


class Predictor:
    """The model restored from a checkpoint in a local inference graph (no cluster needed)."""

    def __init__(self, model: Model, checkpoint: str, num_ps: int) -> None:
        self.model = model
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.inputs = {
                name: tf.compat.v1.placeholder(_DTYPES[kind], [None], name=name)
                for name, kind in model.raw_features().items()
            }
            self.logits = tf.identity(model.logits(self.inputs, num_ps=num_ps, training=False), name="logits")
            self.probability = tf.sigmoid(self.logits, name="probability")
            saver = tf.compat.v1.train.Saver(tf.compat.v1.global_variables())
        self.session = tf.compat.v1.Session(graph=self.graph)
        try:
            # inside the graph: Saver.restore decides graph vs eager mode by the calling context,
            # and a chief that skips training (a restart after _TRAINED.json) calls this eagerly
            with self.graph.as_default():
                saver.restore(self.session, checkpoint)
        except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as e:
            raise TrainError(f"cannot restore the model from checkpoint {checkpoint!r}: {e.message}") from e

    def predict(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        feed = {self.inputs[name]: batch[name] for name in self.inputs}
        return self.session.run(self.probability, feed)

    def export(self, export_dir: str) -> str:
        """Write the SavedModel to ``export_dir`` (atomically: a temp dir, then a rename)."""
        tmp = f"{export_dir.rstrip('/')}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with self.graph.as_default():
            builder = tf.compat.v1.saved_model.Builder(tmp)
            sig = tf.compat.v1.saved_model.predict_signature_def(
                inputs=dict(self.inputs), outputs={"probability": self.probability, "logits": self.logits}
            )
            builder.add_meta_graph_and_variables(
                self.session,
                [tf.compat.v1.saved_model.tag_constants.SERVING],
                signature_def_map={SIGNATURE: sig},
                strip_default_attrs=True,
            )
            builder.save()
        shutil.rmtree(export_dir, ignore_errors=True)
        os.makedirs(os.path.dirname(os.path.abspath(export_dir)), exist_ok=True)
        os.replace(tmp, export_dir)
        return export_dir

    def close(self) -> None:
        self.session.close()


def export_saved_model(model: Model, checkpoint: str, export_dir: str, num_ps: int) -> str:
    """Export the model of ``checkpoint`` as a SavedModel taking raw features; returns the path."""
    p = Predictor(model, checkpoint, num_ps)
    try:
        return p.export(export_dir)
    finally:
        p.close()


def evaluate(
    predictor: Predictor,
    read_fn: ReadFn,
    uri: str,
    *,
    batch_size: int = 4096,
    keep: int = 0,
    options: Mapping[str, Any] | None = None,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """AUC and log loss over all of ``uri``; also returns the first ``keep`` rows and predictions."""
    model = predictor.model
    kinds = dict(model.raw_features())
    kinds[model.label] = "int64"
    ds = read_fn(
        uri,
        columns=list(kinds),
        batch_size=batch_size,
        rank=0,
        world_size=1,
        num_epochs=1,
        shuffle=False,
        seed=0,
        **reader_options(kinds, options or {}),
    )
    labels, probs = [], []
    sample: dict[str, list[np.ndarray]] = {}
    kept = 0
    t0 = time.perf_counter()
    for raw in ds:
        batch = clean_batch(raw, kinds)
        p = predictor.predict(batch)
        labels.append(batch[model.label])
        probs.append(p)
        if kept < keep:
            n = min(keep - kept, len(p))
            for name, arr in batch.items():
                sample.setdefault(name, []).append(arr[:n])
            kept += n
    if not labels:
        raise TrainError(f"eval data {uri!r} has no rows; point eval_data at a non-empty data set")
    y, p = np.concatenate(labels), np.concatenate(probs)
    kept_sample = {k: np.concatenate(v) for k, v in sample.items()}
    if kept_sample:
        # The reference predictions are made on the sample as one batch: a kernel's summation order
        # (hence the last bit of a float) may depend on the batch shape, so "predicts exactly the
        # same" is only meaningful for the same inputs in the same shape.
        kept_sample["__prediction__"] = np.asarray(predictor.predict(kept_sample))
    result = {
        "auc": metrics.auc(y, p),
        "logloss": metrics.logloss(y, p),
        "rows": int(y.size),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return result, kept_sample


def publish(repo_uri: str, name: str, export_dir: str, metadata: Mapping[str, Any]) -> Any:
    """Publish ``export_dir`` as a new version of ``name`` in the model repository at ``repo_uri``."""
    from kubeai_train.repository import ModelRepository

    mv = ModelRepository(repo_uri).publish(name, export_dir, metadata=json.loads(json.dumps(dict(metadata))))
    log.info("published %s version %s at %s", mv.name, mv.version, mv.uri)
    return mv


def find_published(
    repo_uri: str, name: str, model_dir: str, checkpoint: str, global_step: int
) -> tuple[int, str, dict[str, Any]] | None:
    """The version of ``name`` the repository already holds from this ``model_dir``'s ``checkpoint``.

    A job restarted after it trained (an ExitCode restart, a re-run pipeline) finds the version its
    earlier run published by the version's recorded lineage (``model_dir``, ``checkpoint``), so it
    neither exports again nor publishes a duplicate; it logs one line saying where it is.

    Returns:
        (version, uri, eval metrics) of the newest such version, or None when there is none.
    """
    from kubeai_train.repository import ModelRepository
    from kubeai_train.repository.announce import announce

    want = (redact_uri(model_dir), redact_uri(checkpoint))
    for mv in reversed(ModelRepository(repo_uri).versions(name)):
        lineage = mv.metadata.get("lineage") or {}
        if (lineage.get("model_dir"), lineage.get("checkpoint")) == want:
            log.info(
                "%s/%s already published from %s checkpoint %d: %s",
                name,
                mv.version,
                want[0],
                global_step,
                mv.uri,
            )
            announce(mv, existing=True)
            return (
                int(mv.version),
                str(mv.uri),
                dict(mv.metadata.get("eval") or mv.metadata.get("metrics") or {}),
            )
    return None


def publish_once(
    model_dir: str | ModelDir,
    repo_uri: str,
    name: str,
    export_dir: str,
    checkpoint: str | None,
    metadata: Callable[[], Mapping[str, Any]],
) -> tuple[int, str]:
    """Publish ``export_dir`` unless ``checkpoint`` was published to ``repo_uri`` already (PUBLISHED_MARKER).

    Args:
        model_dir: the job's model directory (holds the marker; a path, URL or ModelDir).
        repo_uri: the model repository.
        name: the model name.
        export_dir: the SavedModel to publish (a local directory or any URL the repository reads).
        checkpoint: the checkpoint it was exported from.
        metadata: builds the version's metadata (called only when publishing).

    Returns:
        (version, uri) of the published version, new or the one the marker names.
    """
    d = model_dir if isinstance(model_dir, ModelDir) else ModelDir(model_dir)
    published = d.read_json(PUBLISHED_MARKER)
    # the marker counts only for the repository it names: the same job pointed at another
    # repository publishes there
    repo = redact_uri(repo_uri)
    if published and published.get("checkpoint") == checkpoint and published.get("repo") == repo:
        log.info("%s already published as version %s", redact_uri(checkpoint), published["version"])
        from kubeai_train.repository import ModelRepository, RepositoryError
        from kubeai_train.repository.announce import announce

        try:
            announce(ModelRepository(repo_uri).get(name, version=int(published["version"])), existing=True)
        except RepositoryError:  # the report is a courtesy; the marker already answered
            pass
        return int(published["version"]), str(published["uri"])
    mv = publish(repo_uri, name, export_dir, metadata())
    version, uri = int(mv.version), str(mv.uri)
    d.write_json(PUBLISHED_MARKER, {"version": version, "uri": uri, "checkpoint": checkpoint, "repo": repo})
    return version, uri


#: the eval rows and their predictions, in the model dir (both modes)
EVAL_SAMPLE = "eval_sample.npz"


def checkpoint_to_export(
    config: TrainConfig, store: ModelDir, model_dir: str, result: RunResult
) -> str | None:
    """The finish step's first check in both modes: the checkpoint to export, unless published.

    A re-run of a finished job returns the version it published instead of exporting again.

    Returns:
        The checkpoint to export, or None when it is published already (``result`` then carries
        the published version, its URI and metrics).

    Raises:
        TrainError: there is no checkpoint to export.
    """
    if result.checkpoint is None:
        raise TrainError(f"no checkpoint to export in {store.display}")
    if config.model_repo:
        found = find_published(
            config.model_repo, config.model_name, model_dir, result.checkpoint, result.global_step
        )
        if found:
            result.version, result.model_uri, result.metrics = found
            return None
    return result.checkpoint


def record_eval(store: ModelDir, tag: str, eval_data: str, metrics: Mapping[str, float], sample: Any) -> None:
    """Write the eval sample into the model dir and log the eval metrics (both modes)."""
    buf = io.BytesIO()
    np.savez(buf, **sample)
    store.write_bytes(EVAL_SAMPLE, buf.getvalue())
    log.info(
        "%s eval on %s: auc %.4f logloss %.4f (%d rows)",
        tag,
        eval_data,
        metrics["auc"],
        metrics["logloss"],
        metrics["rows"],
    )


def publish_result(
    store: ModelDir,
    config: TrainConfig,
    local_export: str,
    result: RunResult,
    metadata: Callable[[], Mapping[str, Any]],
) -> None:
    """Publish the export once when the job has a model repository (both modes' last step)."""
    if config.model_repo:
        result.version, result.model_uri = publish_once(
            store,
            config.model_repo,
            config.model_name,
            local_export,
            result.checkpoint,
            metadata,
        )


def result_metadata(
    result: RunResult,
    *,
    mode: str,
    model: Any,
    config: Any,
    model_dir: str,
    cluster_spec: Mapping[str, Sequence[str]],
    params: Mapping[str, Any],
    lineage: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`model_metadata` for a run's result (what both trainers record)."""
    return model_metadata(
        mode=mode,
        model=model,
        config=config,
        metrics=result.metrics,
        checkpoint=result.checkpoint,
        global_step=result.global_step,
        placement=result.placement,
        model_dir=model_dir,
        cluster_spec=cluster_spec,
        params=params,
        lineage=lineage,
    )


def model_metadata(
    *,
    mode: str,
    model: Any,
    config: Any,
    metrics: Mapping[str, float],
    checkpoint: str | None,
    global_step: int,
    placement: Mapping[str, Any] | None,
    model_dir: str,
    cluster_spec: Mapping[str, Sequence[str]],
    params: Mapping[str, Any] | None = None,
    lineage: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The metadata a published version records, the same shape for both modes.

    Args:
        mode: ``"between_graph"`` or ``"coordinator"``.
        model: the user's model (``raw_features()`` and ``params()``).
        config: the job's ``TrainConfig``.
        metrics: the chief's eval metrics (``auc``, ``logloss``, ...).
        checkpoint: the checkpoint the export was restored from.
        global_step: the global step of that checkpoint.
        placement: the placement report (or None).
        model_dir: the job's model directory.
        cluster_spec: role -> task addresses (only the counts are recorded).
        params: the mode's own hyper-parameters (added to the recorded params).
        lineage: the mode's own lineage entries.

    Returns:
        A JSON-able dict: metrics, eval, framework, mode, params, signature, dataset, lineage,
        and ``placement`` (planned vs measured per-PS load, see :func:`placement_load`) when the
        report has per-PS loads.
        Data URIs never carry credentials.
    """
    summary = None
    if placement:
        summary = {
            "policy": placement.get("policy"),
            "bytes_per_ps": [p["bytes"] for p in placement.get("ps", [])],
        }
        if "applied" in placement:
            summary["applied"] = placement["applied"]
    load = placement_load(placement)
    common = {
        **model.params(),
        **config.params,
        "batch_size": config.batch_size,
        "num_epochs": config.num_epochs,
        **(params or {}),
    }
    out = {
        "metrics": {k: v for k, v in metrics.items() if k in ("auc", "logloss")},
        "eval": dict(metrics),
        "framework": "tf",
        "mode": mode,
        "params": common,
        "signature": {
            "name": SIGNATURE,
            "inputs": dict(model.raw_features()),
            "outputs": {"probability": "float32", "logits": "float32"},
        },
        "dataset": {"uri": redact_uri(config.train_data)},
        "lineage": {
            "train_data": redact_uri(config.train_data),
            "eval_data": redact_uri(config.eval_data),
            "checkpoint": redact_uri(checkpoint),
            "global_step": global_step,
            "model_dir": redact_uri(model_dir),
            "params": {**common, "seed": config.seed},
            "cluster": {role: len(addrs) for role, addrs in cluster_spec.items()},
            "placement": summary,
            **(lineage or {}),
        },
    }
    if load is not None:
        out["placement"] = load
    return out


def placement_load(placement: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The planned vs measured per-PS load of a placement report, as published metadata records it.

    Returns:
        ``{"policy", "num_ps", "ps": [{"task", "planned_bytes", "planned_traffic",
        "measured_bytes", "measured_traffic"}], "max_over_mean"}`` (measured keys only where the
        report has them), or None for a report without per-PS planned loads.
    """
    if not placement or not placement.get("ps") or "planned_bytes" not in placement["ps"][0]:
        return None
    keys = ("task", "planned_bytes", "planned_traffic", "measured_bytes", "measured_traffic")
    return {
        "policy": placement.get("policy"),
        "num_ps": placement.get("num_ps", len(placement["ps"])),
        "ps": [{k: e[k] for k in keys if k in e} for e in placement["ps"]],
        "max_over_mean": placement.get("max_over_mean"),
    }


def redact_uri(uri: str | None) -> str | None:
    """A data URI without any ``user:password@`` part (metadata must never carry secrets)."""
    return None if uri is None else re.sub(r"//[^/@]*@", "//***@", uri)


def read_marker(path: str) -> Any:
    """The JSON object in ``path`` (a path TensorFlow reads or any fsspec URL), or None if there is none."""
    folder, _, name = path.rstrip("/").rpartition("/")
    return ModelDir(folder or ".").read_json(name)


def write_marker(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a temporary file renamed into place; one PUT
    on object stores)."""
    folder, _, name = path.rstrip("/").rpartition("/")
    ModelDir(folder or ".").write_json(name, obj)
