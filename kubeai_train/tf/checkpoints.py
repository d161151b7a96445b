"""Checkpoints of both modes under the one name they had before the package was split by mode.

The shared part (state file, staged store, :func:`restore_newest`, the retryable errors) lives in
:mod:`kubeai_train.tf.checkpoint_store`, the between-graph savers in
:mod:`kubeai_train.tf.between_graph.checkpoints`, the coordinator's object checkpoints in
:mod:`kubeai_train.tf.coordinator.checkpoints`. This module re-exports the first two so code
written against ``kubeai_train.tf.checkpoints`` keeps working; the package itself imports the
modules above, never this one (so the coordinator mode does not import the between-graph one).
"""

from __future__ import annotations

from kubeai_train.tf.between_graph.checkpoints import (
    DEFAULT_PART_BYTES,
    NativeCheckpoints,
    StagedCheckpoints,
    for_model_dir,
    plan_parts,
)
from kubeai_train.tf.checkpoint_store import (
    PREFIX,
    RETRYABLE_ERRORS,
    STATE_FILE,
    CheckpointCorruptError,
    StagedStore,
    parse_state,
    restore_newest,
    state_text,
)

__all__ = [
    "DEFAULT_PART_BYTES",
    "PREFIX",
    "RETRYABLE_ERRORS",
    "STATE_FILE",
    "CheckpointCorruptError",
    "NativeCheckpoints",
    "StagedCheckpoints",
    "StagedStore",
    "for_model_dir",
    "parse_state",
    "plan_parts",
    "restore_newest",
    "state_text",
]
