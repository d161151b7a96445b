"""The model repository: versioned, atomic publishes on any fsspec filesystem.

Layout under the root (TF Serving's base path for each model)::

    <root>/<name>/<version>/...                  the model's files, as exported
    <root>/<name>/<version>/_kubeai_version.json metadata + manifest; its presence commits the version
    <root>/<name>/.kubeai/aliases/<alias>.json   one file per alias, replaced in one atomic write
    <root>/<name>/.kubeai/deployments/*.json     append-only deployment records
    <root>/<name>/.kubeai/models.config          TF Serving config listing only committed versions
    <root>/<name>/.kubeai/staging/<uuid>/        local publishes in progress (renamed into place)
    <root>/<name>/.kubeai/claims/<v>.<uuid>.json object-store publishes in progress
    <root>/<name>/.kubeai/trash/<v>-<id>/        local versions gc took out, being deleted

How a version becomes visible (``commit`` mode):

* ``rename`` (local paths, NFS, PVCs): the files and the metadata are written to a staging
  directory, fsynced, and the directory is renamed to ``<version>``. ``rename(2)`` of a directory
  is atomic and fails when the target exists and is not empty, so racing publishers in any
  processes end up with distinct numbers (the loser takes the next one). A server polling the
  base path sees a version complete or not at all.
* ``marker`` (object stores, where a prefix has no atomic rename): the publisher claims a number
  by writing ``claims/<v>.<uuid>.json`` and re-listing: it keeps ``v`` only if its claim is the
  only one for ``v`` and ``<v>/`` holds no object; otherwise it withdraws and takes a higher
  number. With a store whose listings are strongly consistent (OSS, S3, GCS, the memory and
  local filesystems) two publishers can both withdraw but never both keep a number. Files go
  under ``<v>/``, then the metadata file is written last in one PUT; readers accept a version
  only when that file exists, parses, and every manifest file is listed with its size. On a
  store with eventually consistent listings the claim step could let two publishers share a
  number; the second commit would then overwrite the first's metadata, and readers would reject
  the version whose files no longer match — no partial version is ever accepted, but one
  publish could be lost. Object-store pollers (TF Serving) should read the maintained
  ``models.config`` (see :mod:`kubeai_train.repository.serving`).

A publisher killed at any point leaves no version that :meth:`ModelRepository.versions` or
:meth:`ModelRepository.get` return; :meth:`ModelRepository.gc` removes its debris once it is
older than the grace period.

This module holds the one public class; the parts it delegates to are modules of this package:
``_tree`` (paths, the classified listing of a model, the metadata cache), ``_publish`` (both
commit protocols), ``_aliases``, ``_deployments``, ``_model_config`` (keeping ``models.config``
current), ``_integrity`` (verify, download) and ``_gc``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from kubeai_train.repository import _aliases, _deployments, _gc, _integrity, _model_config, _publish
from kubeai_train.repository._storage import Store
from kubeai_train.repository._tree import KDIR as KDIR  # where it was before the split
from kubeai_train.repository._tree import Tree, check_version, fmt_list, open_fs
from kubeai_train.repository.announce import announce
from kubeai_train.repository.config import (
    RepositoryConfig,
    check_alias,
    check_model_name,
    check_service,
    describe_options,
    redact_url,
    resolve_storage_options,
)
from kubeai_train.repository.errors import (
    InvalidArgumentError,
    InvalidMetadataError,
    ModelNotFoundError,
    RepositoryConfigError,
    VersionNotFoundError,
)
from kubeai_train.repository.metadata import (
    build_record,
    git_code_version,
    parse_parent,
    parse_record,
    record_bytes,
)
from kubeai_train.repository.serving import MODEL_CONFIG_FILE
from kubeai_train.repository.types import Deployment, FileEntry, GcReport, ModelVersion

__all__ = ["ModelRepository"]

logger = logging.getLogger(__name__)


class ModelRepository:
    """Versioned models under one root: ``<root>/<name>/<version>/``.

    Args:
        root: a local path or any fsspec URL (``oss://bucket/models``, ``s3://...``,
            ``memory://models``).
        storage_options: fsspec options for the root's filesystem; each key given here wins over
            the environment (for ``oss://``: ``OSS_ENDPOINT``, ``OSS_ACCESS_KEY_ID``,
            ``OSS_ACCESS_KEY_SECRET``, ``OSS_SESSION_TOKEN``).
        commit: ``"auto"`` (rename on local paths, marker elsewhere), ``"rename"`` or ``"marker"``;
            see the module docstring.
        grace_seconds: age below which gc presumes debris belongs to a live publisher.
        serve_latest: newest versions listed in ``models.config`` besides aliased ones (0: do
            not maintain the file).
        verify_on_read: accept a listed version only when every manifest file is present with
            its size (one listing per model, no content read).

    Raises:
        RepositoryConfigError: the root or a setting is unusable (names the value).

    Instances are safe to use from several threads and pickle (for process pools).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        storage_options: Mapping[str, Any] | None = None,
        *,
        commit: str = "auto",
        grace_seconds: float = 3600.0,
        serve_latest: int = 1,
        verify_on_read: bool = True,
    ) -> None:
        root_s = os.fspath(root) if isinstance(root, os.PathLike) else root
        if not isinstance(root_s, str):
            raise RepositoryConfigError(f"repository root must be a path or URL string, got {root!r}")
        protocol = fsspec.utils.get_protocol(root_s) if root_s.strip() else "file"
        opts = resolve_storage_options(protocol, storage_options)
        self.config = RepositoryConfig(
            root=root_s,
            storage_options=opts,
            commit=commit,
            grace_seconds=grace_seconds,
            serve_latest=serve_latest,
            verify_on_read=verify_on_read,
        )
        try:
            fs, path = open_fs(root_s, protocol, opts)
        except (ImportError, ValueError, TypeError) as e:
            raise RepositoryConfigError(
                f"cannot open repository root {redact_url(root_s)!r}: {type(e).__name__}: {e}"
            ) from e
        local = isinstance(fs, LocalFileSystem)
        if local:
            path = os.path.abspath(os.path.expanduser(path))
        self._tree = Tree(Store(fs, local), path.rstrip("/") or "/", verify_on_read)
        self.mode = ("rename" if local else "marker") if commit == "auto" else commit
        if self.mode == "rename" and not local:
            raise RepositoryConfigError(
                f"commit='rename' needs a local path (atomic directory rename); {redact_url(root_s)!r} is "
                f"{fs.protocol!r}: use commit='marker' or 'auto'"
            )
        logger.info(
            "model repository %s: filesystem %s, commit by %s, storage options: %s",
            redact_url(root_s),
            type(fs).__name__,
            self.mode,
            describe_options(opts),
        )

    def __reduce__(self):
        c = self.config
        return (
            _rebuild_repo,
            (c.root, dict(c.storage_options), self.mode, c.grace_seconds, c.serve_latest, c.verify_on_read),
        )

    def __repr__(self) -> str:
        return f"ModelRepository({redact_url(self.config.root)!r}, commit={self.mode!r})"

    # ------------------------------------------------------------------------------- paths
    @property
    def root_uri(self) -> str:
        """The root as users address it (local path or URL; no credentials)."""
        return redact_url(self._tree.store.uri(self._tree.root))

    def model_uri(self, name: str) -> str:
        """``<root>/<name>``: the base path to point TF Serving (or any poller) at."""
        return self._tree.store.uri(self._tree.mdir(check_model_name(name)))

    def model_config_uri(self, name: str) -> str:
        """Where the maintained TF Serving ``models.config`` of ``name`` lives."""
        return self._tree.store.uri(self._tree.kdir(check_model_name(name), MODEL_CONFIG_FILE))

    # ------------------------------------------------------------------------------- reading
    def models(self) -> list[str]:
        """Names of the model directories under the root, sorted."""
        return self._tree.models()

    def versions(self, name: str) -> list[ModelVersion]:
        """Committed, intact versions of ``name``, oldest first ([] when there are none).

        A version is listed only once its commit is complete (rename done / metadata written) and,
        with ``verify_on_read``, every manifest file is present with its size.
        """
        return [mv for _, mv in sorted(self._tree.scan(check_model_name(name)).committed.items())]

    def get(self, name: str, version: int | None = None, alias: str | None = None) -> ModelVersion:
        """The newest committed version of ``name``, or the given ``version`` / ``alias``.

        Raises:
            InvalidNameError / InvalidArgumentError: bad name, version or both version and alias.
            ModelNotFoundError: ``name`` has no committed version (lists the models that exist).
            AliasNotFoundError: the alias is not set (lists the aliases).
            VersionNotFoundError: the version is not committed and intact (lists those that are).
        """
        name = check_model_name(name)
        if version is not None and alias is not None:
            raise InvalidArgumentError(
                f"give version or alias, not both (got version={version!r}, alias={alias!r})"
            )
        if alias is not None:
            version = _aliases.alias_version(self._tree, name, alias)
        if version is not None:
            check_version(version)
        scan = self._tree.scan(name)
        if not scan.committed:
            raise ModelNotFoundError(
                f"model {name!r} has no committed version under {self.root_uri}; models: {fmt_list(self.models())}",
                name=name,
            )
        if version is None:
            return scan.committed[max(scan.committed)]
        mv = scan.committed.get(version)
        if mv is None:
            extra = (
                f" (version {version} exists but is damaged: {scan.damaged[version]})"
                if version in scan.damaged
                else ""
            )
            via = f" (alias {alias!r})" if alias is not None else ""
            raise VersionNotFoundError(
                f"model {name!r} has no version {version}{via}{extra}; versions: {fmt_list(sorted(scan.committed))}",
                name=name,
                version=version,
            )
        return mv

    # ------------------------------------------------------------------------------- publishing
    def publish(
        self,
        name: str,
        path: str | os.PathLike[str],
        metadata: Mapping[str, Any] | None = None,
        *,
        parent: int | str | None = None,
        dataset: str | Mapping[str, Any] | None = None,
        code_version: str | None = None,
    ) -> ModelVersion:
        """Publish the directory (or single file) at ``path`` as the next version of ``name``.

        Args:
            name: the model name (one safe directory level).
            path: a local directory or file, or an fsspec URL of one.
            metadata: ``framework``, ``signature``, ``metrics``, ``params``, ``dataset``,
                ``code_version``, ``parent`` and any extra JSON-serialisable keys. Numpy scalars
                are converted; secret-looking values are redacted.
            parent: the version this one was trained from: an int (same model) or
                ``"model:version"``; it must exist.
            dataset: the training data: a URI or ``{"uri", "partition", "digest"}``.
            code_version: defaults to the git sha of the working directory (``-dirty`` with
                uncommitted changes) or ``KUBEAI_CODE_VERSION``.

        Returns:
            The committed version. Two concurrent publishers get distinct numbers; numbers only grow.

        Raises:
            InvalidNameError, InvalidMetadataError, SourceNotFoundError: bad input, before anything
                is written.
            VersionNotFoundError: ``parent`` does not exist.
            ConcurrentPublishError: no number could be allocated after many attempts.
            OSError and fsspec errors from the storage: nothing is committed; debris is removed
                when possible, else by :meth:`gc`.
        """
        name = check_model_name(name)
        src_fs, files = _publish.source_files(path)
        if metadata is not None and not isinstance(metadata, Mapping):
            raise InvalidMetadataError(f"metadata must be a dict, got {type(metadata).__name__}")
        meta = dict(metadata or {})
        parent_ref = parse_parent(parent if parent is not None else meta.get("parent"), name)
        if parent_ref is not None:
            try:
                self.get(parent_ref["name"], parent_ref["version"])
            except (ModelNotFoundError, VersionNotFoundError) as e:
                raise VersionNotFoundError(
                    f"parent {parent_ref['name']}/{parent_ref['version']} is not a committed version: {e}",
                    name=parent_ref["name"],
                    version=parent_ref["version"],
                ) from e
        cv = code_version if code_version is not None else meta.pop("code_version", None)
        if cv is None:
            cv = git_code_version()

        def record(v: int, manifest: list[FileEntry]) -> bytes:
            return record_bytes(
                build_record(name, v, manifest, meta, parent=parent, dataset=dataset, code_version=cv)
            )

        record(1, [])  # validate the metadata before touching storage
        t0 = time.monotonic()
        if self.mode == "rename":
            v, data = _publish.publish_rename(self._tree, name, src_fs, files, record)
        else:
            v, data = _publish.publish_marker(
                self._tree, name, src_fs, files, record, self.config.grace_seconds
            )
        meta, manifest = parse_record(data, name, v)
        mv = ModelVersion(name, v, self._tree.store.uri(self._tree.vdir(name, v)), meta, manifest)
        logger.info(
            "published %s/%d: %d files, %d bytes in %.2fs at %s",
            name,
            v,
            len(mv.manifest),
            mv.size,
            time.monotonic() - t0,
            redact_url(mv.uri),
        )
        announce(mv)
        self._refresh_model_config(name)
        return mv

    # ------------------------------------------------------------------------------- serving config
    def _refresh_model_config(self, name: str) -> None:
        _model_config.refresh(self._tree, name, self.config.serve_latest)

    def model_config(self, name: str) -> str | None:
        """The current TF Serving ``models.config`` text of ``name`` (None before the first publish)."""
        return _model_config.read(self._tree, check_model_name(name))

    # ------------------------------------------------------------------------------- aliases
    def aliases(self, name: str) -> dict[str, int]:
        """``alias -> version`` of ``name``, sorted by alias."""
        return _aliases.aliases(self._tree, check_model_name(name))

    def set_alias(self, name: str, alias: str, version: int) -> ModelVersion:
        """Point ``alias`` at a committed ``version`` with one atomic write (readers see the old
        or the new version, never neither). Returns that version.

        Raises:
            InvalidNameError: unsafe alias (all digits counts as unsafe: it reads as a version).
            VersionNotFoundError: the version is not committed.
        """
        name = check_model_name(name)
        alias = check_alias(alias)
        mv = self.get(name, check_version(version))
        _aliases.write_alias(self._tree, name, alias, mv.version)
        self._refresh_model_config(name)
        return mv

    def remove_alias(self, name: str, alias: str) -> None:
        """Delete ``alias``. Raises AliasNotFoundError (listing the aliases) when it is not set."""
        name = check_model_name(name)
        _aliases.remove_alias(self._tree, name, alias)
        self._refresh_model_config(name)

    # ------------------------------------------------------------------------------- deployments
    def record_deployment(
        self,
        name: str,
        version: int,
        service: str,
        *,
        environment: str | None = None,
        endpoint: str | None = None,
        status: str = "deployed",
        note: str | None = None,
    ) -> Deployment:
        """Record that ``service`` (in ``environment``) now runs ``version`` — or, with
        ``status="undeployed"``, no longer runs it.

        A slot is ``(service, environment)``: a new ``deployed`` record replaces the slot's
        previous version (record a canary as its own service, e.g. ``rec-svc/canary``). Records
        are append-only files, so concurrent recorders never lose one.

        Raises:
            InvalidNameError: unsafe service or environment.
            VersionNotFoundError: deploying a version that is not committed.
        """
        name = check_model_name(name)
        service = check_service(service)
        if environment is not None:
            environment = check_service(environment)
        check_version(version)
        if status == "deployed":
            self.get(name, version)
        return _deployments.record_deployment(
            self._tree,
            name,
            version,
            service,
            environment=environment,
            endpoint=endpoint,
            status=status,
            note=note,
        )

    def deployments(self, name: str, *, history: bool = False) -> list[Deployment]:
        """Where versions of ``name`` run now: the latest record of each (service, environment)
        slot whose status is ``deployed``, sorted by service. ``history=True``: every record,
        oldest first."""
        return _deployments.deployments(self._tree, check_model_name(name), history=history)

    # ------------------------------------------------------------------------------- integrity
    def _resolve(self, name: str, version: int | None, alias: str | None) -> int:
        if version is not None and alias is not None:
            raise InvalidArgumentError(
                f"give version or alias, not both (got version={version!r}, alias={alias!r})"
            )
        if alias is not None:
            return _aliases.alias_version(self._tree, name, alias)
        if version is None:
            return self.get(name).version
        return check_version(version)

    def verify(self, name: str, version: int | None = None, *, alias: str | None = None) -> ModelVersion:
        """Read every file of a version and check it against the manifest (size and sha256).

        ``version`` None means the newest committed one. A damaged version (one that
        :meth:`versions` hides) can be verified by number to learn which file is wrong.

        Raises:
            VersionNotFoundError: no metadata for that version (not committed).
            IntegrityError: a file is missing, has another size or sha256, or is not in the
                manifest; the message and ``.path`` name the file.
        """
        name = check_model_name(name)
        return _integrity.verify(self._tree, name, self._resolve(name, version, alias))

    def download(
        self,
        name: str,
        version: int | None,
        local_dir: str | os.PathLike[str],
        *,
        alias: str | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Copy a committed version into ``local_dir``, checking every file's sha256 on the way.

        The copy lands in a temporary sibling directory renamed to ``local_dir`` at the end, so
        ``local_dir`` holds a complete, verified version or is left as it was. The version's
        metadata file comes along.

        Raises:
            InvalidArgumentError: ``local_dir`` exists and is not empty (pass ``overwrite=True``).
            IntegrityError: a file does not match the manifest (names the file).
        """
        name = check_model_name(name)
        mv = self.get(name, self._resolve(name, version, alias))
        return _integrity.download(self._tree, mv, local_dir, overwrite)

    # ------------------------------------------------------------------------------- gc
    def gc(
        self,
        name: str | None = None,
        *,
        keep_last: int | None = None,
        grace_seconds: float | None = None,
        dry_run: bool = False,
    ) -> GcReport:
        """Remove killed publishers' debris and, with ``keep_last``, old versions.

        Debris older than ``grace_seconds`` (default: the repository's): staging directories,
        version directories without metadata (uncommitted; with ``commit="rename"`` only those
        with a claim, since renamed publishes are never partial and other integer directories
        were put there by hand), claims, temporary files. Claims of
        committed versions go at any age. With ``keep_last=N``, committed versions other than the
        newest N are removed — except aliased versions, currently deployed versions and those the
        maintained ``models.config`` serves, which are never deleted. A version's metadata file
        is deleted first, so a half-finished removal is an uncommitted directory (more debris),
        never a visible partial version. Damaged versions are reported, not deleted.

        Raises:
            InvalidArgumentError: ``keep_last`` < 1 or a negative ``grace_seconds``.
        """
        return _gc.gc(
            self._tree,
            name,
            mode=self.mode,
            keep_last=keep_last,
            grace=self.config.grace_seconds if grace_seconds is None else grace_seconds,
            serve_latest=self.config.serve_latest,
            dry_run=dry_run,
        )


def _rebuild_repo(
    root, storage_options, commit, grace_seconds, serve_latest, verify_on_read
) -> ModelRepository:
    return ModelRepository(
        root,
        storage_options,
        commit=commit,
        grace_seconds=grace_seconds,
        serve_latest=serve_latest,
        verify_on_read=verify_on_read,
    )
