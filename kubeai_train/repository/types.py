"""Contracts of the model repository: the value types publishers and readers exchange.

A :class:`ModelVersion` is one committed, immutable version of a model: its number, where it
lives, its metadata (framework, signature, metrics, params, dataset, code version, parent,
created time) and its :class:`FileEntry` manifest (every file with size and sha256). A
:class:`Deployment` records which service runs which version; :class:`GcReport` says what a
garbage collection removed and why. Everything here is plain data that serialises to JSON.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubeai_train.repository.errors import InvalidMetadataError

__all__ = ["Deployment", "FileEntry", "GcReport", "ModelVersion"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class FileEntry:
    """One file of a version.

    Attributes:
        path: POSIX path relative to the version directory (``variables/variables.index``).
        size: bytes.
        sha256: lowercase hex digest of the content.
    """

    path: str
    size: int
    sha256: str

    def __post_init__(self) -> None:
        if not self.path or self.path.startswith("/") or ".." in self.path.split("/"):
            raise InvalidMetadataError(
                f"manifest path {self.path!r} must be relative and stay inside the version"
            )
        if not isinstance(self.size, int) or self.size < 0:
            raise InvalidMetadataError(
                f"manifest size of {self.path!r} must be an int >= 0, got {self.size!r}"
            )
        if not isinstance(self.sha256, str) or not _SHA256.match(self.sha256):
            raise InvalidMetadataError(
                f"manifest sha256 of {self.path!r} must be 64 hex digits, got {self.sha256!r}"
            )

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class ModelVersion:
    """One committed version of a model.

    Attributes:
        name: the model name.
        version: the version number (>= 1; numbers only grow).
        uri: the version directory (a local path for local roots, else a URL), what a server
            loads: ``<root>/<name>/<version>``.
        metadata: everything recorded at publish time except the manifest: ``framework``,
            ``signature``, ``metrics``, ``params``, ``dataset`` (``uri``, ``partition``,
            ``digest``), ``code_version``, ``parent`` (``{"name", "version"}``), ``created``
            (ISO 8601 UTC), ``publisher`` and any extra keys the publisher gave.
        manifest: every file of the version with size and sha256, sorted by path.
    """

    name: str
    version: int
    uri: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    manifest: tuple[FileEntry, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.version, int) or isinstance(self.version, bool) or self.version < 1:
            raise InvalidMetadataError(f"version must be an int >= 1, got {self.version!r}")

    @property
    def metrics(self) -> dict[str, Any]:
        """The metrics recorded at publish time (``{}`` when none)."""
        return dict(self.metadata.get("metrics") or {})

    @property
    def created(self) -> str | None:
        """ISO 8601 UTC time of the publish."""
        return self.metadata.get("created")

    @property
    def parent(self) -> dict[str, Any] | None:
        """``{"name": ..., "version": ...}`` of the version this one was trained from, if any."""
        return self.metadata.get("parent")

    @property
    def size(self) -> int:
        """Total bytes of the version's files."""
        return sum(f.size for f in self.manifest)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "uri": self.uri,
            "metadata": dict(self.metadata),
            "manifest": [f.to_json() for f in self.manifest],
        }


@dataclass(frozen=True)
class Deployment:
    """One record of where a version runs.

    Attributes:
        name, version: the model version.
        service: the inference service (``rec-svc``); with ``environment`` it identifies the
            deployment slot, so a canary (two versions in one service) is two records.
        status: ``"deployed"`` or ``"undeployed"``.
        environment: free-form (``prod``, ``staging``), or None.
        endpoint: where the service answers, or None.
        recorded: ISO 8601 UTC time of the record.
        note: free text.
    """

    name: str
    version: int
    service: str
    status: str = "deployed"
    environment: str | None = None
    endpoint: str | None = None
    recorded: str = ""
    note: str | None = None

    def __post_init__(self) -> None:
        if self.status not in ("deployed", "undeployed"):
            raise InvalidMetadataError(
                f"deployment status must be 'deployed' or 'undeployed', got {self.status!r}"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "service": self.service,
            "status": self.status,
            "environment": self.environment,
            "endpoint": self.endpoint,
            "recorded": self.recorded,
            "note": self.note,
        }


@dataclass
class GcReport:
    """What :meth:`ModelRepository.gc` did (or would do, with ``dry_run``).

    Attributes:
        removed_versions: ``(name, version)`` of committed versions removed by ``keep_last``.
        removed_debris: paths of killed publishers' staging directories, uncommitted version
            directories, stale claims and temporary files that were removed.
        kept: ``(name, version, reason)`` for versions ``keep_last`` would have removed but that
            are protected (``"alias:<a>"``, ``"deployed:<service>"``, ``"latest"``).
        damaged: ``(name, version, problem)`` for versions with metadata whose files no longer
            match; gc leaves them for a person to look at.
        dry_run: True when nothing was deleted.
    """

    removed_versions: list[tuple[str, int]] = field(default_factory=list)
    removed_debris: list[str] = field(default_factory=list)
    kept: list[tuple[str, int, str]] = field(default_factory=list)
    damaged: list[tuple[str, int, str]] = field(default_factory=list)
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "removed_versions": [list(x) for x in self.removed_versions],
            "removed_debris": list(self.removed_debris),
            "kept": [list(x) for x in self.kept],
            "damaged": [list(x) for x in self.damaged],
            "dry_run": self.dry_run,
        }
