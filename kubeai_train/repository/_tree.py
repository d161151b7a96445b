"""The repository's tree on its filesystem: paths, one classified listing per model, and the
parsed metadata of committed versions (cached by the metadata file's size and mtime).

Every other part of the repository (publish, aliases, deployments, integrity, gc) works on a
:class:`Tree`; :class:`~kubeai_train.repository.repo.ModelRepository` owns one.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec

from kubeai_train.repository._storage import Store, info_mtime
from kubeai_train.repository.config import check_model_name
from kubeai_train.repository.errors import (
    InvalidArgumentError,
    InvalidMetadataError,
    RepositoryConfigError,
    RepositoryError,
)
from kubeai_train.repository.metadata import METADATA_FILE, parse_record
from kubeai_train.repository.types import FileEntry, ModelVersion

__all__ = [
    "KDIR",
    "Scan",
    "Tree",
    "check_version",
    "fmt_list",
    "now_iso",
    "open_fs",
    "parse_version",
    "size_problem",
]

KDIR = ".kubeai"
_MAX_VERSION_DIGITS = 18  # TF Serving parses version directories as int64

#: Protocols whose fsspec implementation kubeai_train tunes; the hook is imported only for them.
_FS_SETUP = {
    "oss": ("kubeai_train.data.oss", "install", "oss:// needs ossfs: pip install 'kubeai_train[oss]'")
}


def open_fs(root: str, protocol: str, opts: dict[str, Any]) -> tuple[Any, str]:
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


def parse_version(s: str) -> int | None:
    """The version a directory name stands for, or None. ``"007"`` counts (TF Serving would load
    it as 7) so numbering never collides with it, but only canonical names are ours."""
    if s.isascii() and s.isdigit() and len(s) <= _MAX_VERSION_DIGITS:
        return int(s)
    return None


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def check_version(version: object) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidArgumentError(f"version must be an int >= 1, got {version!r}", value=version)
    return version


def fmt_list(items: list[Any], limit: int = 20) -> str:
    if not items:
        return "none"
    shown = ", ".join(str(x) for x in items[-limit:])
    return shown if len(items) <= limit else f"... {shown} ({len(items)} in all)"


def size_problem(manifest: tuple[FileEntry, ...], files: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Why the listed ``files`` do not hold ``manifest`` (a file missing or of another size), or
    None when they do."""
    for f in manifest:
        info = files.get(f.path)
        if info is None:
            return f"file {f.path} is missing"
        size = info.get("size")
        if size is not None and int(size) != f.size:
            return f"file {f.path} has {size} bytes, manifest says {f.size}"
    return None


@dataclass
class Scan:
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


class Tree:
    """The models under ``root`` of ``store``; see the layout in :mod:`kubeai_train.repository.repo`.

    Args:
        store: the filesystem primitives.
        root: the root's path on that filesystem.
        verify_on_read: a scan accepts a version only when every manifest file is listed with
            its size.

    Safe to use from several threads (the metadata cache is the only shared state).
    """

    def __init__(self, store: Store, root: str, verify_on_read: bool) -> None:
        self.store = store
        self.root = root
        self.verify_on_read = verify_on_read
        self._cache: dict[tuple[str, int], tuple[tuple[Any, ...], ModelVersion]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------- paths
    def mdir(self, name: str) -> str:
        return Store.join(self.root, name)

    def vdir(self, name: str, version: int) -> str:
        return Store.join(self.root, name, str(version))

    def kdir(self, name: str, *parts: str) -> str:
        return Store.join(self.root, name, KDIR, *parts)

    # ------------------------------------------------------------------------------- reading
    def models(self) -> list[str]:
        """Names of the model directories under the root, sorted."""
        out = []
        for n, info in self.store.listdir(self.root).items():
            if info.get("type") != "directory":
                continue
            try:
                out.append(check_model_name(n))
            except RepositoryError:
                continue
        return sorted(out)

    def load(self, name: str, version: int, meta_info: dict[str, Any]) -> ModelVersion:
        """The version whose metadata file was listed with ``meta_info`` (parsed once per
        size and mtime of that file).

        Raises:
            InvalidMetadataError: the file is unreadable, vanished, or describes another version.
        """
        key = (name, version)
        stamp = (meta_info.get("size"), info_mtime(meta_info))
        hit = self._cache.get(key)
        if hit is not None and hit[0] == stamp and stamp[1] is not None:
            return hit[1]
        data = self.store.read(Store.join(self.vdir(name, version), METADATA_FILE))
        if data is None:
            raise InvalidMetadataError(f"metadata of {name}/{version} vanished while reading")
        meta, manifest = parse_record(data, name, version)
        mv = ModelVersion(name, version, self.store.uri(self.vdir(name, version)), meta, manifest)
        with self._lock:
            self._cache[key] = (stamp, mv)
        return mv

    def forget(self, name: str, version: int) -> None:
        """Drop a removed version from the metadata cache."""
        with self._lock:
            self._cache.pop((name, version), None)

    def scan(self, name: str) -> Scan:
        """List ``<root>/<name>`` once and classify everything in it."""
        scan = Scan()
        # Empty integer directories exist only on local disks (object stores have no empty
        # prefixes); one listing of the files is enough elsewhere.
        top_dirs = self.store.listdir(self.mdir(name)) if self.store.local else {}
        tree = self.store.tree(self.mdir(name))
        groups: dict[str, dict[str, dict[str, Any]]] = {}
        for rel, info in tree.items():
            head, _, rest = rel.partition("/")
            if rest:
                groups.setdefault(head, {})[rest] = info
        for head in top_dirs:
            v = parse_version(head)
            if v is not None:
                scan.max_seen = max(scan.max_seen, v)
        for head, files in groups.items():
            if head == KDIR:
                _classify_internal(files, scan)
                continue
            v = parse_version(head)
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
                mv = self.load(name, v, meta_info)
            except InvalidMetadataError as e:
                scan.damaged[v] = str(e)
                continue
            problem = size_problem(mv.manifest, files) if self.verify_on_read else None
            if problem:
                scan.damaged[v] = problem
            else:
                scan.committed[v] = mv
        return scan


def _classify_internal(files: dict[str, dict[str, Any]], scan: Scan) -> None:
    """Sort the files under ``<name>/.kubeai/`` into the scan's debris and alias lists."""
    for rel, info in files.items():
        parts = rel.split("/")
        mtime = info_mtime(info)
        if parts[0] == "staging" and len(parts) >= 2:
            prev = scan.staging.get(parts[1])
            scan.staging[parts[1]] = mtime if prev is None or (mtime is not None and mtime > prev) else prev
        elif parts[0] == "trash" and len(parts) >= 2:
            scan.trash.add(parts[1])
        elif parts[0] == "claims" and len(parts) == 2:
            scan.claims[parts[1]] = info
        elif parts[0] == "aliases" and len(parts) == 2 and parts[1].endswith(".json") and parts[1][0] != ".":
            scan.alias_files.append(parts[1])
        if parts[-1].startswith(".tmp-") and parts[0] != "staging":
            scan.temp_files[rel] = mtime
