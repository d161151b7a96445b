"""PyTorch DDP training of CTR models on CPU clusters.

``init()`` builds the process group from :mod:`kubeai_train.cluster` (gloo on CPU, nccl with
CUDA) under our launcher, ``torchrun`` or a PyTorchJob, with a timeout that turns a dead or
hung peer into :class:`PeerFailedError` on every rank; :func:`run` maps that to a retryable exit
code so the launcher restarts the job. :class:`Trainer` wraps a model in DDP with sparse
embedding gradients (SparseAdam for ``sparse=True`` tables, Adam for the rest), keeps ranks with
uneven data in lockstep until the last row, writes atomic checkpoints (model, optimizers, the
data position of every rank) and resumes from them, and computes exact AUC / log loss over all
ranks. ``TrainConfig(straggler="adaptive")`` sizes each rank's local batch by its measured
speed at a fixed global batch and reports slow ranks (:mod:`kubeai_train.torch.adaptive`);
``straggler="backup"`` lets up to ``backup_workers`` ranks flagged slow sit steps out, taking
no batch (:mod:`kubeai_train.torch.backup`).
:func:`export` writes a TorchScript program that takes hashed ids and raw floats, with the hashing
declared as a versioned preprocessing step (``kubeai_train.serving.load_predictor`` applies it to
raw rows); :func:`publish` puts it into the model repository with metrics and lineage.

Example::

    from kubeai_train import data
    from kubeai_train import torch as kt

    def main():
        with kt.process_group() as ctx:
            features = kt.CTRFeatures(buckets=1 << 16)
            model = kt.DLRM(features.sizes, len(features.dense))
            trainer = kt.Trainer(model, features, kt.TrainConfig(checkpoint_dir="/ckpt"), ctx)
            opts = features.read_options()  # columns, hashing in the reader, NaN for null floats
            trainer.fit(data.read("/data/train", batch_size=1024, shuffle=True, **opts), epochs=2)
            print(trainer.evaluate(data.read("/data/eval", **opts)))  # exact AUC over all ranks

    kt.run(main)
"""

from kubeai_train.torch.adaptive import StragglerReport
from kubeai_train.torch.backup import BackupReport
from kubeai_train.torch.checkpoint import CheckpointStore
from kubeai_train.torch.exporter import export, load, publish
from kubeai_train.torch.features import CTRFeatures, hash_column
from kubeai_train.torch.group import DistContext, guard, init, process_group, run, shutdown
from kubeai_train.torch.model import DLRM
from kubeai_train.torch.optim import SplitOptimizer, split_parameters
from kubeai_train.torch.trainer import FitResult, Trainer
from kubeai_train.torch.types import (
    RETRYABLE_EXIT_CODE,
    STRAGGLER_MODES,
    AdaptiveBatching,
    CheckpointError,
    ConfigError,
    ExportError,
    PeerFailedError,
    TorchTrainError,
    TrainConfig,
)

__all__ = [
    "DLRM",
    "RETRYABLE_EXIT_CODE",
    "STRAGGLER_MODES",
    "AdaptiveBatching",
    "BackupReport",
    "CTRFeatures",
    "CheckpointError",
    "CheckpointStore",
    "ConfigError",
    "DistContext",
    "ExportError",
    "FitResult",
    "PeerFailedError",
    "SplitOptimizer",
    "StragglerReport",
    "TorchTrainError",
    "TrainConfig",
    "Trainer",
    "export",
    "guard",
    "hash_column",
    "init",
    "load",
    "process_group",
    "publish",
    "run",
    "shutdown",
    "split_parameters",
]
