"""Versioned model repository on any filesystem: trainers publish, inference servers load.

``ModelRepository(root)`` works on a local path (NFS, PVC) or any fsspec URL (``oss://``,
``s3://``, ``memory://``). ``publish(name, export_dir, metadata)`` copies a model to
``<root>/<name>/<version>/`` — TF Serving's base-path layout, integer versions that only grow —
and records its lineage (framework, signature, metrics, params, dataset, git sha, parent
version) with a sha256 manifest of every file. A publish is atomic: on local paths a staging
directory is renamed into place; on object stores the metadata file is written last and readers
accept only versions whose manifest checks out, while a maintained ``models.config`` tells TF
Serving exactly which versions are committed. Racing publishers get distinct versions; a killed
publisher leaves only debris that ``gc`` removes. Aliases (``production``) move with one atomic
write; ``record_deployment`` / ``deployments`` say which service runs which version, and ``gc``
never deletes an aliased or deployed version. ``python -m kubeai_train.repository`` is the CLI.

Example::

    from kubeai_train.repository import ModelRepository
    repo = ModelRepository("oss://bucket/models")
    mv = repo.publish("ctr", "/tmp/export", metadata={"framework": "tensorflow", "metrics": {"auc": 0.81}})
    repo.set_alias("ctr", "production", mv.version)
    repo.get("ctr", alias="production").uri
"""

from kubeai_train.repository.errors import (
    AliasNotFoundError,
    ConcurrentPublishError,
    IntegrityError,
    InvalidArgumentError,
    InvalidMetadataError,
    InvalidNameError,
    ModelNotFoundError,
    RepositoryConfigError,
    RepositoryError,
    SourceNotFoundError,
    VersionNotFoundError,
)
from kubeai_train.repository.repo import ModelRepository
from kubeai_train.repository.types import Deployment, FileEntry, GcReport, ModelVersion

__all__ = [
    "AliasNotFoundError",
    "ConcurrentPublishError",
    "Deployment",
    "FileEntry",
    "GcReport",
    "IntegrityError",
    "InvalidArgumentError",
    "InvalidMetadataError",
    "InvalidNameError",
    "ModelNotFoundError",
    "ModelRepository",
    "ModelVersion",
    "RepositoryConfigError",
    "RepositoryError",
    "SourceNotFoundError",
    "VersionNotFoundError",
]
