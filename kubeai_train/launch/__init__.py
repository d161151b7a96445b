"""Run one training job locally or on Kubernetes, with the same environment everywhere.

A ``JobSpec`` (framework, replicas per role, what to run, and the Kubernetes-only parts) comes
from CLI flags (``python -m kubeai_train.launch``) or a YAML job file (``JobSpec.from_yaml``)
and goes to a target. The local target (``run_local`` / ``LocalJob``) runs the replicas as
supervised processes with exactly the variables the Kubeflow training-operator injects
(``TF_CONFIG``; ``MASTER_ADDR``/``RANK``/``WORLD_SIZE``/``PET_*``; torchrun's for several
processes per node), fails fast, restarts by the operator's rules and leaves no orphans. The
Kubernetes target (``kubeai_train.launch.k8s``, extra ``k8s``) renders TFJob / PyTorchJob
manifests validated against the CRDs and the operator's webhook rules, and submits them.
``run_processes`` is the helper multi-process tests use.
"""

from kubeai_train.launch.local import LocalJob, run_local
from kubeai_train.launch.procs import ProcessesResult, run_processes
from kubeai_train.launch.types import JobFailedError, JobSpec, LaunchError, SpecError

__all__ = [
    "JobFailedError",
    "JobSpec",
    "LaunchError",
    "LocalJob",
    "ProcessesResult",
    "SpecError",
    "run_local",
    "run_processes",
]
