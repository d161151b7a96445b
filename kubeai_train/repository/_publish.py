"""Publishing: collect the source files, then commit them as a new version by one of the two
protocols of :mod:`kubeai_train.repository.repo` — ``rename`` of a staging directory (local
paths) or a claimed number with the metadata written last (``marker``, object stores).
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import fsspec

from kubeai_train.repository._storage import Store
from kubeai_train.repository._tree import Tree, open_fs, parse_version, size_problem
from kubeai_train.repository.config import redact_url, resolve_storage_options
from kubeai_train.repository.errors import (
    ConcurrentPublishError,
    IntegrityError,
    RepositoryError,
    SourceNotFoundError,
)
from kubeai_train.repository.metadata import METADATA_FILE
from kubeai_train.repository.types import FileEntry

__all__ = ["Record", "publish_marker", "publish_rename", "source_files"]

# The repository logs under one name, whichever of its modules speaks.
logger = logging.getLogger("kubeai_train.repository.repo")

_MAX_ATTEMPTS = 200

#: ``record(version, manifest)``: the metadata file's bytes for the version being committed.
Record = Callable[[int, list[FileEntry]], bytes]


def source_files(path: str | os.PathLike[str]) -> tuple[Any, list[tuple[str, str]]]:
    """The filesystem of ``path`` and its files as ``(relative path, full path)``, sorted.

    Raises:
        SourceNotFoundError: ``path`` is not a string or path, cannot be opened, does not exist
            or holds no files.
    """
    try:
        src = os.fspath(path)
    except TypeError:
        src = None
    if not isinstance(src, str) or not src:
        raise SourceNotFoundError(f"publish needs a directory or file to publish, got {path!r}")
    if "://" in src:
        protocol = fsspec.utils.get_protocol(src)
        try:
            src_fs, src_path = open_fs(src, protocol, resolve_storage_options(protocol, None))
        except (ImportError, ValueError, TypeError) as e:
            raise SourceNotFoundError(f"cannot open {redact_url(src)!r}: {type(e).__name__}: {e}") from e
    else:
        src_fs, src_path = fsspec.filesystem("file"), os.path.abspath(src)
    if not src_fs.exists(src_path):
        raise SourceNotFoundError(f"nothing to publish at {redact_url(src)!r}: it does not exist", path=src)
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


def _copy_all(
    store: Store, src_fs: Any, files: list[tuple[str, str]], dest: str, fsync: bool
) -> list[FileEntry]:
    manifest = []
    for rel, src in files:
        size, sha = store.copy_in(src_fs, src, Store.join(dest, rel), fsync=fsync)
        manifest.append(FileEntry(rel, size, sha))
    return manifest


def publish_rename(
    tree: Tree, name: str, src_fs: Any, files: list[tuple[str, str]], record: Record
) -> tuple[int, bytes]:
    """Stage, fsync and rename into the next free number; returns it and the metadata written.

    Raises:
        ConcurrentPublishError: every number tried was taken by another publisher.
    """
    store = tree.store
    staging = tree.kdir(name, "staging", uuid.uuid4().hex)
    store.makedirs(staging)
    try:
        manifest = _copy_all(store, src_fs, files, staging, fsync=True)
        for _attempt in range(_MAX_ATTEMPTS):
            v = _next_version(tree, name)
            data = record(v, manifest)
            store.write_atomic(Store.join(staging, METADATA_FILE), data)
            store.fsync_dir(staging)
            if store.rename_dir_noreplace(staging, tree.vdir(name, v)):
                store.fsync_dir(tree.mdir(name))
                return v, data
            logger.debug("%s/%d was taken by another publisher; trying the next number", name, v)
        raise ConcurrentPublishError(
            f"could not allocate a version of {name!r} after {_MAX_ATTEMPTS} attempts; too many racing publishers"
        )
    except BaseException:
        store.rm_tree(staging)
        raise


def _next_version(tree: Tree, name: str) -> int:
    top = tree.store.listdir(tree.mdir(name))
    return max([0] + [v for n in top if (v := parse_version(n)) is not None]) + 1


def _claim(tree: Tree, name: str) -> tuple[int, str]:
    store = tree.store
    claims_dir = tree.kdir(name, "claims")
    for attempt in range(_MAX_ATTEMPTS):
        claimed = [parse_version(c.split(".", 1)[0]) for c in store.listdir(claims_dir)]
        v = max([_next_version(tree, name) - 1] + [c for c in claimed if c is not None]) + 1
        mine = f"{v}.{uuid.uuid4().hex}.json"
        body = {"version": v, "created": time.time(), "host": socket.gethostname(), "pid": os.getpid()}
        store.write_new(Store.join(claims_dir, mine), json.dumps(body).encode())
        rivals = [c for c in store.listdir(claims_dir) if c.startswith(f"{v}.") and c != mine]
        if not rivals and not store.tree(tree.vdir(name, v)):
            return v, Store.join(claims_dir, mine)
        store.rm_file(Store.join(claims_dir, mine))
        logger.debug("%s/%d is contested (%d rival claims); withdrawing", name, v, len(rivals))
        time.sleep(random.uniform(0, min(0.2, 0.002 * 2**attempt)))
    raise ConcurrentPublishError(
        f"could not claim a version of {name!r} after {_MAX_ATTEMPTS} attempts; too many racing publishers"
    )


def publish_marker(
    tree: Tree, name: str, src_fs: Any, files: list[tuple[str, str]], record: Record, grace_seconds: float
) -> tuple[int, bytes]:
    """Claim a number, upload under it, check the listing, write the metadata last; returns the
    number and the metadata written. On any failure the version's files and the claim go.

    Raises:
        ConcurrentPublishError: no number could be claimed.
        RepositoryError: gc removed the claim during the upload (it took over ``grace_seconds``).
        IntegrityError: the uploaded files are not listed with their sizes.
    """
    store = tree.store
    v, claim = _claim(tree, name)
    vdir = tree.vdir(name, v)
    committed = False
    try:
        manifest = _copy_all(store, src_fs, files, vdir, fsync=store.local)
        if store.read(claim) is None:
            raise RepositoryError(
                f"the claim of {name}/{v} was removed while uploading (gc judged this publisher dead: "
                f"the upload took longer than grace_seconds={grace_seconds}); publish again"
            )
        problem = size_problem(tuple(manifest), store.tree(vdir))
        if problem:
            raise IntegrityError(f"{name}/{v}: after upload, {problem}; publish again", name=name, version=v)
        data = record(v, manifest)
        store.write_atomic(Store.join(vdir, METADATA_FILE), data)
        committed = True
        return v, data
    finally:
        if not committed:
            store.rm_tree(vdir)
        store.rm_file(claim)
