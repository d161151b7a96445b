"""TF2 coordinator mode (ParameterServerStrategy + ClusterCoordinator); see :mod:`.trainer`.

Modules: ``trainer`` (the run loop, serving, export), ``input`` (chief- and worker-side readers),
``checkpoints`` (object checkpoints, staged upload), ``placement`` (applying a placement plan),
``balanced`` (the balanced plan's partitioner, per-PS load measured live), ``models``
(``tf.Module`` models), ``optim`` (the optimizer), ``types`` (options and the model
contract).
"""

from kubeai_train.tf.coordinator.models import DeepFMModule, DeepFMModuleModel, TablesModel, TablesModule
from kubeai_train.tf.coordinator.trainer import (
    DONE_MARKER,
    MODE,
    PLACEMENT_REPORT,
    PUBLISHED_MARKER,
    TRAINED_MARKER,
    RunResult,
    check_export_dir,
    load_serving,
    run,
    write_native,
)
from kubeai_train.tf.coordinator.types import CoordinatorOptions, ModuleModel

__all__ = [
    "DONE_MARKER",
    "MODE",
    "PLACEMENT_REPORT",
    "PUBLISHED_MARKER",
    "TRAINED_MARKER",
    "CoordinatorOptions",
    "DeepFMModule",
    "DeepFMModuleModel",
    "ModuleModel",
    "RunResult",
    "TablesModel",
    "TablesModule",
    "check_export_dir",
    "load_serving",
    "run",
    "write_native",
]
