"""Variable placement over parameter servers under the one name it had before the package was
split by mode.

The policies and :func:`check_plan` live in :mod:`kubeai_train.tf.placement_policies` (both
modes), the snapshot of a graph and the ``replica_device_setter`` bridge in
:mod:`kubeai_train.tf.between_graph.placement`, the coordinator's variable-creator scope in
:mod:`kubeai_train.tf.coordinator.placement`. This module re-exports the first two so code
written against ``kubeai_train.tf.placement`` keeps working; the package itself imports the
modules above, never this one (so the coordinator mode does not import the between-graph one).
"""

from __future__ import annotations

from kubeai_train.tf.between_graph.placement import PlanStrategy, actual_placement, placement_report, snapshot
from kubeai_train.tf.placement_policies import GreedyBytesPlacement, RoundRobinPlacement, check_plan

__all__ = [
    "GreedyBytesPlacement",
    "PlanStrategy",
    "RoundRobinPlacement",
    "actual_placement",
    "check_plan",
    "placement_report",
    "snapshot",
]
