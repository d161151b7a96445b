"""The one entry point of ``kubeai_train.tf``: ``run(model, config, mode=...)`` for both modes.

``mode="between_graph"`` (the default) runs :func:`kubeai_train.tf.between_graph.run` (TF1-style graphs,
every worker reads its own data); ``mode="coordinator"`` runs
:func:`kubeai_train.tf.coordinator.run` (TF2 ParameterServerStrategy + ClusterCoordinator). This
module imports both (the coordinator imports the trainer), so neither has to import the other's
dispatcher.
"""

from __future__ import annotations

from typing import Any

from kubeai_train.tf import coordinator
from kubeai_train.tf.between_graph import trainer
from kubeai_train.tf.coordinator.types import CoordinatorOptions
from kubeai_train.tf.reading import ReadFn
from kubeai_train.tf.types import PlacementPolicy, RunResult, TrainConfig, TrainError

__all__ = ["MODES", "run"]

MODES = ("between_graph", "coordinator")


def run(
    model: Any,
    config: TrainConfig,
    *,
    mode: str = "between_graph",
    placement: PlacementPolicy | str | None = None,
    read_fn: ReadFn | None = None,
    options: CoordinatorOptions | None = None,
    exit_on_retryable: bool = True,
) -> RunResult:
    """Run this process's role of a TF job in the chosen mode (every process calls this).

    Args:
        model: a :class:`~kubeai_train.tf.Model` (between-graph) or a
            :class:`~kubeai_train.tf.coordinator.ModuleModel` (coordinator).
        config: the training configuration; every role must get the same one.
        mode: ``"between_graph"`` (default) or ``"coordinator"``.
        placement: the placement policy or its name: ``"round_robin"`` (the default),
            ``"greedy_bytes"`` or ``"balanced"`` (see :mod:`kubeai_train.tf.balanced`).
        read_fn: the reader (default ``kubeai_train.data.read``).
        options: coordinator-mode options (``mode="coordinator"`` only).
        exit_on_retryable: on a lost PS, exit with RETRYABLE_EXIT_CODE instead of raising.

    Returns:
        RunResult of this process (the chief's holds the metrics, placement and version).

    Raises:
        TrainError: an unknown mode, options given to the between-graph mode, or what the
            mode's own ``run`` raises.
    """
    if mode == "coordinator":
        return coordinator.run(
            model,
            config,
            options=options,
            placement=placement,
            read_fn=read_fn,
            exit_on_retryable=exit_on_retryable,
        )
    if mode != "between_graph":
        raise TrainError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if options is not None:
        raise TrainError(
            "options (CoordinatorOptions) apply to mode='coordinator' only: drop them or pass mode='coordinator'"
        )
    return trainer.run(
        model, config, placement=placement, read_fn=read_fn, exit_on_retryable=exit_on_retryable
    )
