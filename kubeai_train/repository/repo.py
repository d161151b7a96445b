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
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from kubeai_train.repository._storage import Store, info_mtime
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
    AliasNotFoundError,
    ConcurrentPublishError,
    IntegrityError,
    InvalidArgumentError,
    InvalidMetadataError,
    ModelNotFoundError,
    RepositoryConfigError,
    RepositoryError,
    SourceNotFoundError,
    VersionNotFoundError,
)
from kubeai_train.repository.metadata import (
    METADATA_FILE,
    build_record,
    git_code_version,
    parse_parent,
    parse_record,
    record_bytes,
)
from kubeai_train.repository.serving import MODEL_CONFIG_FILE, render_model_config, served_versions
from kubeai_train.repository.types import Deployment, FileEntry, GcReport, ModelVersion

__all__ = ["ModelRepository"]

logger = logging.getLogger(__name__)

KDIR = ".kubeai"
_MAX_ATTEMPTS = 200
_MAX_VERSION_DIGITS = 18  # TF Serving parses version directories as int64


#: Protocols whose fsspec implementation kubeai_train tunes; the hook is imported only for them.
_FS_SETUP = {
    "oss": ("kubeai_train.data.oss", "install", "oss:// needs ossfs: pip install 'kubeai_train[oss]'")
}


def _open_fs(root: str, protocol: str, opts: dict[str, Any]) -> tuple[Any, str]:
    """fsspec filesystem and path of ``root``.

    ``oss://`` uses the project's ossfs subclass (``kubeai_train.data.oss``: one flat listing per
    ``find``, correct appends of multi-block uploads, retries). Remote filesystems get an instance
    of their own (``skip_instance_cache``), so this repository's listing-cache invalidation never
    races another user of a shared instance.
    """
    setup = _FS_SETUP.get(protocol)
    if setup is not None:
        module, func, hint = setup
        try:
            getattr(importlib.import_module(module), func)()
        except ImportError as e:
            raise RepositoryConfigError(hint) from e
    if protocol not in ("file", "local", "memory"):
        opts = {"skip_instance_cache": True, **opts}
    return fsspec.core.url_to_fs(root, **opts)


def _parse_version(s: str) -> int | None:
    """The version a directory name stands for, or None. ``"007"`` counts (TF Serving would load
    it as 7) so numbering never collides with it, but only canonical names are ours."""
    if s.isascii() and s.isdigit() and len(s) <= _MAX_VERSION_DIGITS:
        return int(s)
    return None


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _check_version(version: object) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidArgumentError(f"version must be an int >= 1, got {version!r}", value=version)
    return version


def _fmt_list(items: list[Any], limit: int = 20) -> str:
    if not items:
        return "none"
    shown = ", ".join(str(x) for x in items[-limit:])
    return shown if len(items) <= limit else f"... {shown} ({len(items)} in all)"


@dataclass
class _Scan:
    """One listing of a model directory, classified."""

    committed: dict[int, ModelVersion] = field(default_factory=dict)
    damaged: dict[int, str] = field(default_factory=dict)
    uncommitted: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    foreign: list[str] = field(default_factory=list)
    max_seen: int = 0
    claims: dict[str, dict[str, Any]] = field(default_factory=dict)
    staging: dict[str, float | None] = field(default_factory=dict)
    trash: set[str] = field(default_factory=set)
    temp_files: dict[str, float | None] = field(default_factory=dict)
    alias_files: list[str] = field(default_factory=list)


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
            fs, path = _open_fs(root_s, protocol, opts)
        except (ImportError, ValueError, TypeError) as e:
            raise RepositoryConfigError(
                f"cannot open repository root {redact_url(root_s)!r}: {type(e).__name__}: {e}"
            ) from e
        local = isinstance(fs, LocalFileSystem)
        if local:
            path = os.path.abspath(os.path.expanduser(path))
        self._store = Store(fs, local)
        self._root = path.rstrip("/") or "/"
        self.mode = ("rename" if local else "marker") if commit == "auto" else commit
        if self.mode == "rename" and not local:
            raise RepositoryConfigError(
                f"commit='rename' needs a local path (atomic directory rename); {redact_url(root_s)!r} is "
                f"{fs.protocol!r}: use commit='marker' or 'auto'"
            )
        self._cache: dict[tuple[str, int], tuple[tuple[Any, ...], ModelVersion]] = {}
        self._lock = threading.Lock()
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
        return redact_url(self._store.uri(self._root))

    def _mdir(self, name: str) -> str:
        return Store.join(self._root, name)

    def _vdir(self, name: str, version: int) -> str:
        return Store.join(self._root, name, str(version))

    def _kdir(self, name: str, *parts: str) -> str:
        return Store.join(self._root, name, KDIR, *parts)

    def model_uri(self, name: str) -> str:
        """``<root>/<name>``: the base path to point TF Serving (or any poller) at."""
        return self._store.uri(self._mdir(check_model_name(name)))

    def model_config_uri(self, name: str) -> str:
        """Where the maintained TF Serving ``models.config`` of ``name`` lives."""
        return self._store.uri(self._kdir(check_model_name(name), MODEL_CONFIG_FILE))

    # ------------------------------------------------------------------------------- reading
    def models(self) -> list[str]:
        """Names of the model directories under the root, sorted."""
        out = []
        for n, info in self._store.listdir(self._root).items():
            if info.get("type") != "directory":
                continue
            try:
                out.append(check_model_name(n))
            except RepositoryError:
                continue
        return sorted(out)

    def _load(self, name: str, version: int, meta_info: dict[str, Any]) -> ModelVersion:
        key = (name, version)
        stamp = (meta_info.get("size"), info_mtime(meta_info))
        hit = self._cache.get(key)
        if hit is not None and hit[0] == stamp and stamp[1] is not None:
            return hit[1]
        data = self._store.read(Store.join(self._vdir(name, version), METADATA_FILE))
        if data is None:
            raise InvalidMetadataError(f"metadata of {name}/{version} vanished while reading")
        meta, manifest = parse_record(data, name, version)
        mv = ModelVersion(name, version, self._store.uri(self._vdir(name, version)), meta, manifest)
        with self._lock:
            self._cache[key] = (stamp, mv)
        return mv

    @staticmethod
    def _size_problem(manifest: tuple[FileEntry, ...], files: Mapping[str, Mapping[str, Any]]) -> str | None:
        for f in manifest:
            info = files.get(f.path)
            if info is None:
                return f"file {f.path} is missing"
            size = info.get("size")
            if size is not None and int(size) != f.size:
                return f"file {f.path} has {size} bytes, manifest says {f.size}"
        return None

    def _scan(self, name: str) -> _Scan:
        scan = _Scan()
        # Empty integer directories exist only on local disks (object stores have no empty
        # prefixes); one listing of the files is enough elsewhere.
        top_dirs = self._store.listdir(self._mdir(name)) if self._store.local else {}
        tree = self._store.tree(self._mdir(name))
        groups: dict[str, dict[str, dict[str, Any]]] = {}
        for rel, info in tree.items():
            head, _, rest = rel.partition("/")
            if rest:
                groups.setdefault(head, {})[rest] = info
        for head in top_dirs:
            v = _parse_version(head)
            if v is not None:
                scan.max_seen = max(scan.max_seen, v)
        for head, files in groups.items():
            if head == KDIR:
                self._classify_internal(files, scan)
                continue
            v = _parse_version(head)
            if v is None:
                continue
            scan.max_seen = max(scan.max_seen, v)
            if head != str(v):
                scan.foreign.append(head)
                continue
            meta_info = files.get(METADATA_FILE)
            if meta_info is None:
                scan.uncommitted[v] = files
                continue
            try:
                mv = self._load(name, v, meta_info)
            except InvalidMetadataError as e:
                scan.damaged[v] = str(e)
                continue
            problem = self._size_problem(mv.manifest, files) if self.config.verify_on_read else None
            if problem:
                scan.damaged[v] = problem
            else:
                scan.committed[v] = mv
        return scan

    @staticmethod
    def _classify_internal(files: dict[str, dict[str, Any]], scan: _Scan) -> None:
        for rel, info in files.items():
            parts = rel.split("/")
            mtime = info_mtime(info)
            if parts[0] == "staging" and len(parts) >= 2:
                prev = scan.staging.get(parts[1])
                scan.staging[parts[1]] = (
                    mtime if prev is None or (mtime is not None and mtime > prev) else prev
                )
            elif parts[0] == "trash" and len(parts) >= 2:
                scan.trash.add(parts[1])
            elif parts[0] == "claims" and len(parts) == 2:
                scan.claims[parts[1]] = info
            elif (
                parts[0] == "aliases"
                and len(parts) == 2
                and parts[1].endswith(".json")
                and parts[1][0] != "."
            ):
                scan.alias_files.append(parts[1])
            if parts[-1].startswith(".tmp-") and parts[0] != "staging":
                scan.temp_files[rel] = mtime

    def versions(self, name: str) -> list[ModelVersion]:
        """Committed, intact versions of ``name``, oldest first ([] when there are none).

        A version is listed only once its commit is complete (rename done / metadata written) and,
        with ``verify_on_read``, every manifest file is present with its size.
        """
        return [mv for _, mv in sorted(self._scan(check_model_name(name)).committed.items())]

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
            version = self._alias_version(name, alias)
        if version is not None:
            _check_version(version)
        scan = self._scan(name)
        if not scan.committed:
            raise ModelNotFoundError(
                f"model {name!r} has no committed version under {self.root_uri}; models: {_fmt_list(self.models())}",
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
                f"model {name!r} has no version {version}{via}{extra}; versions: {_fmt_list(sorted(scan.committed))}",
                name=name,
                version=version,
            )
        return mv

    # ------------------------------------------------------------------------------- publishing
    def _source_files(self, path: str | os.PathLike[str]) -> tuple[Any, list[tuple[str, str]]]:
        try:
            src = os.fspath(path)
        except TypeError:
            src = None
        if not isinstance(src, str) or not src:
            raise SourceNotFoundError(f"publish needs a directory or file to publish, got {path!r}")
        if "://" in src:
            protocol = fsspec.utils.get_protocol(src)
            try:
                src_fs, src_path = _open_fs(src, protocol, resolve_storage_options(protocol, None))
            except (ImportError, ValueError, TypeError) as e:
                raise SourceNotFoundError(f"cannot open {redact_url(src)!r}: {type(e).__name__}: {e}") from e
        else:
            src_fs, src_path = fsspec.filesystem("file"), os.path.abspath(src)
        if not src_fs.exists(src_path):
            raise SourceNotFoundError(
                f"nothing to publish at {redact_url(src)!r}: it does not exist", path=src
            )
        if src_fs.isfile(src_path):
            return src_fs, [(src_path.rsplit("/", 1)[-1], src_path)]
        files = []
        base = src_path.strip("/")
        for full, info in sorted(src_fs.find(src_path, detail=True).items()):
            if info.get("type") == "directory":
                continue
            rel = full.lstrip("/")[len(base) :].lstrip("/") if full.lstrip("/").startswith(base + "/") else ""
            if not rel or ".." in rel.split("/"):
                raise SourceNotFoundError(f"cannot place {full!r} relative to {redact_url(src)!r}", path=src)
            if rel == METADATA_FILE:
                # A downloaded or another repository's version: its record describes that
                # version, not this one; the new record is written by this publish.
                logger.info("not publishing %s from %s (the repository writes its own)", rel, redact_url(src))
                continue
            files.append((rel, full))
        if not files:
            raise SourceNotFoundError(
                f"nothing to publish at {redact_url(src)!r}: the directory has no files", path=src
            )
        return src_fs, files

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
        src_fs, files = self._source_files(path)
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
            v, data = self._publish_rename(name, src_fs, files, record)
        else:
            v, data = self._publish_marker(name, src_fs, files, record)
        meta, manifest = parse_record(data, name, v)
        mv = ModelVersion(name, v, self._store.uri(self._vdir(name, v)), meta, manifest)
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

    def _copy_all(self, src_fs: Any, files: list[tuple[str, str]], dest: str, fsync: bool) -> list[FileEntry]:
        manifest = []
        for rel, src in files:
            size, sha = self._store.copy_in(src_fs, src, Store.join(dest, rel), fsync=fsync)
            manifest.append(FileEntry(rel, size, sha))
        return manifest

    def _publish_rename(
        self, name: str, src_fs: Any, files: list[tuple[str, str]], record
    ) -> tuple[int, bytes]:
        store = self._store
        staging = self._kdir(name, "staging", uuid.uuid4().hex)
        store.makedirs(staging)
        try:
            manifest = self._copy_all(src_fs, files, staging, fsync=True)
            for _attempt in range(_MAX_ATTEMPTS):
                v = self._next_version(name)
                data = record(v, manifest)
                store.write_atomic(Store.join(staging, METADATA_FILE), data)
                store.fsync_dir(staging)
                if store.rename_dir_noreplace(staging, self._vdir(name, v)):
                    store.fsync_dir(self._mdir(name))
                    return v, data
                logger.debug("%s/%d was taken by another publisher; trying the next number", name, v)
            raise ConcurrentPublishError(
                f"could not allocate a version of {name!r} after {_MAX_ATTEMPTS} attempts; too many racing publishers"
            )
        except BaseException:
            store.rm_tree(staging)
            raise

    def _next_version(self, name: str) -> int:
        top = self._store.listdir(self._mdir(name))
        return max([0] + [v for n in top if (v := _parse_version(n)) is not None]) + 1

    def _claim(self, name: str) -> tuple[int, str]:
        store = self._store
        claims_dir = self._kdir(name, "claims")
        for attempt in range(_MAX_ATTEMPTS):
            claimed = [_parse_version(c.split(".", 1)[0]) for c in store.listdir(claims_dir)]
            v = max([self._next_version(name) - 1] + [c for c in claimed if c is not None]) + 1
            mine = f"{v}.{uuid.uuid4().hex}.json"
            body = {"version": v, "created": time.time(), "host": socket.gethostname(), "pid": os.getpid()}
            store.write_new(Store.join(claims_dir, mine), json.dumps(body).encode())
            rivals = [c for c in store.listdir(claims_dir) if c.startswith(f"{v}.") and c != mine]
            if not rivals and not store.tree(self._vdir(name, v)):
                return v, Store.join(claims_dir, mine)
            store.rm_file(Store.join(claims_dir, mine))
            logger.debug("%s/%d is contested (%d rival claims); withdrawing", name, v, len(rivals))
            time.sleep(random.uniform(0, min(0.2, 0.002 * 2**attempt)))
        raise ConcurrentPublishError(
            f"could not claim a version of {name!r} after {_MAX_ATTEMPTS} attempts; too many racing publishers"
        )

    def _publish_marker(
        self, name: str, src_fs: Any, files: list[tuple[str, str]], record
    ) -> tuple[int, bytes]:
        store = self._store
        v, claim = self._claim(name)
        vdir = self._vdir(name, v)
        committed = False
        try:
            manifest = self._copy_all(src_fs, files, vdir, fsync=store.local)
            if store.read(claim) is None:
                raise RepositoryError(
                    f"the claim of {name}/{v} was removed while uploading (gc judged this publisher dead: "
                    f"the upload took longer than grace_seconds={self.config.grace_seconds}); publish again"
                )
            problem = self._size_problem(tuple(manifest), store.tree(vdir))
            if problem:
                raise IntegrityError(
                    f"{name}/{v}: after upload, {problem}; publish again", name=name, version=v
                )
            data = record(v, manifest)
            store.write_atomic(Store.join(vdir, METADATA_FILE), data)
            committed = True
            return v, data
        finally:
            if not committed:
                store.rm_tree(vdir)
            store.rm_file(claim)

    # ------------------------------------------------------------------------------- serving config
    def _refresh_model_config(self, name: str) -> None:
        """Rewrite ``models.config`` until it matches the repository state (converges under
        concurrent writers: each re-checks after its own write). Failures are logged, not raised:
        the version is already committed."""
        if self.config.serve_latest == 0:
            return
        path = self._kdir(name, MODEL_CONFIG_FILE)
        try:
            for _ in range(5):
                scan = self._scan(name)
                if not scan.committed:
                    return
                aliases = {
                    a: v for a, v in self._read_aliases(name, scan.alias_files).items() if v in scan.committed
                }
                latest = scan.committed[max(scan.committed)]
                text = render_model_config(
                    name,
                    self._store.uri(self._mdir(name)),
                    served_versions(sorted(scan.committed), aliases, self.config.serve_latest),
                    aliases,
                    latest.metadata.get("framework"),
                ).encode()
                if self._store.read(path) == text:
                    return
                self._store.write_atomic(path, text)
        except (OSError, RepositoryError) as e:
            logger.warning(
                "could not update %s: %s: %s", redact_url(self._store.uri(path)), type(e).__name__, e
            )

    def model_config(self, name: str) -> str | None:
        """The current TF Serving ``models.config`` text of ``name`` (None before the first publish)."""
        data = self._store.read(self._kdir(check_model_name(name), MODEL_CONFIG_FILE))
        return None if data is None else data.decode()

    # ------------------------------------------------------------------------------- aliases
    def aliases(self, name: str) -> dict[str, int]:
        """``alias -> version`` of ``name``, sorted by alias."""
        name = check_model_name(name)
        names = [f for f in self._store.listdir(self._kdir(name, "aliases")) if f.endswith(".json")]
        return self._read_aliases(name, [f for f in names if not f.startswith(".")])

    def _read_aliases(self, name: str, fnames: list[str]) -> dict[str, int]:
        out = {}
        adir = self._kdir(name, "aliases")
        for fname in sorted(fnames):
            data = self._store.read(Store.join(adir, fname))
            if data is None:
                continue  # removed since the listing
            try:
                out[fname[: -len(".json")]] = int(json.loads(data or b"")["version"])
            except (ValueError, KeyError, TypeError):
                logger.warning("ignoring unreadable alias file %s", fname)
        return out

    def _alias_version(self, name: str, alias: str) -> int:
        check_alias(alias)
        known = self.aliases(name)
        if alias not in known:
            listed = ", ".join(f"{a}={v}" for a, v in known.items()) or "none"
            raise AliasNotFoundError(
                f"model {name!r} has no alias {alias!r}; aliases: {listed}", name=name, alias=alias
            )
        return known[alias]

    def set_alias(self, name: str, alias: str, version: int) -> ModelVersion:
        """Point ``alias`` at a committed ``version`` with one atomic write (readers see the old
        or the new version, never neither). Returns that version.

        Raises:
            InvalidNameError: unsafe alias (all digits counts as unsafe: it reads as a version).
            VersionNotFoundError: the version is not committed.
        """
        name = check_model_name(name)
        alias = check_alias(alias)
        mv = self.get(name, _check_version(version))
        previous = None
        old = self._store.read(self._kdir(name, "aliases", f"{alias}.json"))
        if old is not None:
            try:
                previous = int(json.loads(old)["version"])
            except (ValueError, KeyError, TypeError):
                previous = None
        body = {"alias": alias, "version": mv.version, "previous": previous, "updated": _now_iso()}
        self._store.write_atomic(self._kdir(name, "aliases", f"{alias}.json"), json.dumps(body).encode())
        logger.info("alias %s/%s -> %d (was %s)", name, alias, mv.version, previous)
        self._refresh_model_config(name)
        return mv

    def remove_alias(self, name: str, alias: str) -> None:
        """Delete ``alias``. Raises AliasNotFoundError (listing the aliases) when it is not set."""
        name = check_model_name(name)
        self._alias_version(name, alias)
        self._store.rm_file(self._kdir(name, "aliases", f"{alias}.json"))
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
        _check_version(version)
        if status == "deployed":
            self.get(name, version)
        dep = Deployment(
            name=name,
            version=version,
            service=service,
            status=status,
            environment=environment,
            endpoint=redact_url(endpoint) if endpoint else None,
            recorded=_now_iso(),
            note=note,
        )
        fname = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
        self._store.write_new(self._kdir(name, "deployments", fname), json.dumps(dep.to_json()).encode())
        logger.info("deployment %s/%d %s on %s", name, version, status, service)
        return dep

    def deployments(self, name: str, *, history: bool = False) -> list[Deployment]:
        """Where versions of ``name`` run now: the latest record of each (service, environment)
        slot whose status is ``deployed``, sorted by service. ``history=True``: every record,
        oldest first."""
        name = check_model_name(name)
        ddir = self._kdir(name, "deployments")
        records = []
        for fname in sorted(self._store.listdir(ddir)):
            if not fname.endswith(".json") or fname.startswith("."):
                continue
            try:
                d = json.loads(self._store.read(Store.join(ddir, fname)) or b"")
                records.append(Deployment(**d))
            except (ValueError, TypeError, RepositoryError):
                logger.warning("ignoring unreadable deployment record %s", fname)
        if history:
            return records
        slots: dict[tuple[str, str | None], Deployment] = {}
        for d in records:
            slots[(d.service, d.environment)] = d
        return sorted(
            (d for d in slots.values() if d.status == "deployed"),
            key=lambda d: (d.service, d.environment or ""),
        )

    # ------------------------------------------------------------------------------- integrity
    def _resolve(self, name: str, version: int | None, alias: str | None) -> int:
        if version is not None and alias is not None:
            raise InvalidArgumentError(
                f"give version or alias, not both (got version={version!r}, alias={alias!r})"
            )
        if alias is not None:
            return self._alias_version(name, alias)
        if version is None:
            return self.get(name).version
        return _check_version(version)

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
        v = self._resolve(name, version, alias)
        vdir = self._vdir(name, v)
        files = self._store.tree(vdir)
        if METADATA_FILE not in files:
            committed = sorted(self._scan(name).committed)
            raise VersionNotFoundError(
                f"model {name!r} has no committed version {v}; versions: {_fmt_list(committed)}",
                name=name,
                version=v,
            )
        try:
            mv = self._load(name, v, files[METADATA_FILE])
        except InvalidMetadataError as e:
            raise IntegrityError(
                f"{name}/{v}: {METADATA_FILE} is corrupt: {e}", name=name, version=v, path=METADATA_FILE
            ) from e
        for f in mv.manifest:
            if f.path not in files:
                raise IntegrityError(
                    f"{name}/{v}: file {f.path} is missing", name=name, version=v, path=f.path
                )
            size, sha = self._store.sha256(Store.join(vdir, f.path))
            if size != f.size:
                raise IntegrityError(
                    f"{name}/{v}: file {f.path} has {size} bytes, the manifest says {f.size}",
                    name=name,
                    version=v,
                    path=f.path,
                )
            if sha != f.sha256:
                raise IntegrityError(
                    f"{name}/{v}: file {f.path} has sha256 {sha}, the manifest says {f.sha256}",
                    name=name,
                    version=v,
                    path=f.path,
                )
        expected = {f.path for f in mv.manifest} | {METADATA_FILE}
        extra = sorted(set(files) - expected)
        if extra:
            raise IntegrityError(
                f"{name}/{v}: file {extra[0]} is not in the manifest"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""),
                name=name,
                version=v,
                path=extra[0],
            )
        return mv

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
        dest = Path(local_dir).expanduser().absolute()
        if dest.exists() and not dest.is_dir():
            raise InvalidArgumentError(f"download target {dest} is a file; give a directory")
        if dest.is_dir() and any(dest.iterdir()) and not overwrite:
            raise InvalidArgumentError(
                f"download target {dest} is not empty; choose an empty directory or pass overwrite=True"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.download-{uuid.uuid4().hex[:8]}"
        local = Store(fsspec.filesystem("file"), True)
        vdir = self._vdir(name, mv.version)
        try:
            for f in mv.manifest:
                src = Store.join(vdir, f.path)
                try:
                    size, sha = local.copy_in(self._store.fs, src, str(tmp / f.path))
                except FileNotFoundError as e:
                    raise IntegrityError(
                        f"{name}/{mv.version}: file {f.path} is missing",
                        name=name,
                        version=mv.version,
                        path=f.path,
                    ) from e
                if (size, sha) != (f.size, f.sha256):
                    raise IntegrityError(
                        f"{name}/{mv.version}: file {f.path} has sha256 {sha} ({size} bytes), "
                        f"the manifest says {f.sha256} ({f.size} bytes)",
                        name=name,
                        version=mv.version,
                        path=f.path,
                    )
            meta = self._store.read(Store.join(vdir, METADATA_FILE))
            (tmp / METADATA_FILE).write_bytes(meta or b"")
            if dest.exists():
                local.rm_tree(str(dest))
            os.rename(tmp, dest)
        except BaseException:
            local.rm_tree(str(tmp))
            raise
        return dest

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
        if keep_last is not None and (
            isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1
        ):
            raise InvalidArgumentError(
                f"keep_last must be an int >= 1 (the newest version is always kept), got {keep_last!r}"
            )
        grace = self.config.grace_seconds if grace_seconds is None else grace_seconds
        if not isinstance(grace, (int, float)) or grace < 0:
            raise InvalidArgumentError(f"grace_seconds must be >= 0, got {grace!r}")
        names = [check_model_name(name)] if name is not None else self.models()
        report = GcReport(dry_run=dry_run)
        now = time.time()

        def old(mtime: float | None) -> bool:
            return grace == 0 or (mtime is not None and now - mtime >= grace)

        def remove(path: str, tree: bool) -> None:
            report.removed_debris.append(self._store.uri(path))
            if not dry_run:
                (self._store.rm_tree if tree else self._store.rm_file)(path)

        for n in names:
            scan = self._scan(n)
            changed = False
            for sid, mtime in sorted(scan.staging.items()):
                if old(mtime):
                    remove(self._kdir(n, "staging", sid), True)
            for tid in sorted(scan.trash):  # versions an earlier gc took out but did not finish deleting
                remove(self._kdir(n, "trash", tid), True)
            live_claims: set[int] = set()
            for cname, info in sorted(scan.claims.items()):
                v = _parse_version(cname.split(".", 1)[0])
                cpath = self._kdir(n, "claims", cname)
                if v is None or v in scan.committed or v in scan.damaged:
                    remove(cpath, False)
                    continue
                created = info_mtime(info)
                try:
                    created = float(json.loads(self._store.read(cpath) or b"{}").get("created", created))
                except (ValueError, TypeError, AttributeError):
                    pass
                if old(created):
                    if v in scan.uncommitted:
                        remove(self._vdir(n, v), True)
                        scan.uncommitted.pop(v)
                    remove(cpath, False)
                else:
                    live_claims.add(v)
            for v, files in sorted(scan.uncommitted.items()):
                if v in live_claims:
                    continue
                if self.mode == "rename":
                    # Renamed publishes are never partial: a metadata-less directory here was put
                    # by hand (or by a marker-mode publisher whose stale claim was handled above).
                    report.damaged.append(
                        (n, v, "no metadata: not published by the repository; left in place")
                    )
                    continue
                mtimes = [info_mtime(i) for i in files.values()]
                known = [m for m in mtimes if m is not None]
                newest = max(known) if known and len(known) == len(mtimes) else None
                if old(newest):
                    remove(self._vdir(n, v), True)
            for rel, mtime in sorted(scan.temp_files.items()):
                if old(mtime):
                    remove(self._kdir(n, rel), False)
            for v, problem in sorted(scan.damaged.items()):
                report.damaged.append((n, v, problem))
            if keep_last is not None and scan.committed:
                changed |= self._gc_versions(n, scan, keep_last, report, dry_run)
            if changed and not dry_run:
                self._refresh_model_config(n)
        if report.removed_debris or report.removed_versions:
            logger.info(
                "gc%s: %d versions, %d debris paths",
                " (dry run)" if dry_run else "",
                len(report.removed_versions),
                len(report.removed_debris),
            )
        return report

    def _protected(self, name: str, committed: list[int], keep_last: int) -> dict[int, str]:
        protected: dict[int, str] = {}
        for v in committed[-keep_last:]:
            protected.setdefault(v, "newest")
        aliases = self.aliases(name)
        for a, v in aliases.items():
            protected.setdefault(v, f"alias:{a}")
        for d in self.deployments(name):
            protected.setdefault(d.version, f"deployed:{d.service}")
        for v in served_versions(committed, aliases, self.config.serve_latest):
            protected.setdefault(v, "served")
        return protected

    def _gc_versions(self, name: str, scan: _Scan, keep_last: int, report: GcReport, dry_run: bool) -> bool:
        committed = sorted(scan.committed)
        protected = self._protected(name, committed, keep_last)
        doomed = [v for v in committed[:-keep_last] if v not in protected]
        if doomed and not dry_run:
            # An alias or deployment recorded since the first look protects too; what remains
            # is the window between this look and the delete (gc is an operator's tool).
            protected = self._protected(name, committed, keep_last)
        changed = False
        for v in committed[:-keep_last]:
            if v in protected:
                report.kept.append((name, v, protected[v]))
                continue
            report.removed_versions.append((name, v))
            if dry_run:
                continue
            vdir = self._vdir(name, v)
            if self._store.local:
                # One atomic rename takes the whole version out of the base path (a poller sees
                # it complete or gone), then the copy in the trash is deleted at leisure.
                trash = self._kdir(name, "trash", f"{v}-{uuid.uuid4().hex[:8]}")
                self._store.makedirs(self._kdir(name, "trash"))
                os.rename(vdir, trash)
                self._store.rm_tree(trash)
            else:
                self._store.rm_file(Store.join(vdir, METADATA_FILE))  # uncommit first
                self._store.rm_tree(vdir)
            self._cache.pop((name, v), None)
            changed = True
        return changed


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
