"""TensorFlow parameter-server training for CTR-style models with large embedding tables.

Write a :class:`Model` (raw columns in, logits out) and call :func:`run` from every process of a
TF job: parameter servers serve, the chief and the workers each build the graph in their own
process (between-graph replication), read their own share of the data through
``kubeai_train.data``, and train asynchronously (or synchronously). Variables are placed on the
PS by one :class:`PlacementPolicy` (round-robin by default; :class:`BalancedPlacement` also
decides how many shards each table gets; every run measures the per-PS load), embedding tables
are sharded over the PS, start-up and shutdown never hang, the chief checkpoints (every
reader's position included), a lost PS makes the job exit with a retryable code and restore, and
the chief exports a SavedModel taking raw features and publishes it to the model repository.

``run(model, config, mode="coordinator", options=...)`` runs the TF2 coordinator mode instead
(ParameterServerStrategy + ClusterCoordinator, a ``tf.Module`` model): see :mod:`.coordinator`.

Importing this package imports TensorFlow.
"""

# first: imports TensorFlow once, quietly (TF_CPP_MIN_LOG_LEVEL=2 unless set, no CPU-only CUDA /
# absl start-up lines; see _tf); every module below finds it in sys.modules
from kubeai_train.tf import _tf  # noqa: F401  # isort: skip
from kubeai_train.tf import coordinator
from kubeai_train.tf.balanced import BalancedPlacement
from kubeai_train.tf.entry import MODES, run
from kubeai_train.tf.features import CtrFeatures, partitioner
from kubeai_train.tf.models import DeepFM, DeepFMParams
from kubeai_train.tf.placement_policies import GreedyBytesPlacement, RoundRobinPlacement
from kubeai_train.tf.types import (
    RETRYABLE_EXIT_CODE,
    ClusterUnavailableError,
    Model,
    PlacementError,
    PlacementPlan,
    PlacementPolicy,
    ReadyTimeoutError,
    RunResult,
    StepInfo,
    TrainConfig,
    TrainError,
    VariableInfo,
)

__all__ = [
    "MODES",
    "RETRYABLE_EXIT_CODE",
    "BalancedPlacement",
    "ClusterUnavailableError",
    "CtrFeatures",
    "DeepFM",
    "DeepFMParams",
    "GreedyBytesPlacement",
    "Model",
    "PlacementError",
    "PlacementPlan",
    "PlacementPolicy",
    "ReadyTimeoutError",
    "RoundRobinPlacement",
    "RunResult",
    "StepInfo",
    "TrainConfig",
    "TrainError",
    "VariableInfo",
    "coordinator",
    "partitioner",
    "run",
]
