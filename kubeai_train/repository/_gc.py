"""Garbage collection: killed publishers' debris and, on request, old versions — never one that
an alias, a deployment or the maintained ``models.config`` still needs."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid

from kubeai_train.repository import _model_config
from kubeai_train.repository._aliases import aliases
from kubeai_train.repository._deployments import deployments
from kubeai_train.repository._storage import Store, info_mtime
from kubeai_train.repository._tree import Scan, Tree, parse_version
from kubeai_train.repository.config import check_model_name
from kubeai_train.repository.errors import InvalidArgumentError
from kubeai_train.repository.metadata import METADATA_FILE
from kubeai_train.repository.serving import served_versions
from kubeai_train.repository.types import GcReport

__all__ = ["gc"]

# The repository logs under one name, whichever of its modules speaks.
logger = logging.getLogger("kubeai_train.repository.repo")


def gc(
    tree: Tree,
    name: str | None,
    *,
    mode: str,
    keep_last: int | None,
    grace: float,
    serve_latest: int,
    dry_run: bool,
) -> GcReport:
    """What :meth:`ModelRepository.gc <kubeai_train.repository.repo.ModelRepository.gc>` does,
    for ``name`` or every model; ``mode`` is the repository's commit mode.

    Raises:
        InvalidArgumentError: ``keep_last`` < 1 or a negative ``grace``.
    """
    if keep_last is not None and (
        isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1
    ):
        raise InvalidArgumentError(
            f"keep_last must be an int >= 1 (the newest version is always kept), got {keep_last!r}"
        )
    if not isinstance(grace, (int, float)) or grace < 0:
        raise InvalidArgumentError(f"grace_seconds must be >= 0, got {grace!r}")
    names = [check_model_name(name)] if name is not None else tree.models()
    report = GcReport(dry_run=dry_run)
    now = time.time()

    def old(mtime: float | None) -> bool:
        return grace == 0 or (mtime is not None and now - mtime >= grace)

    def remove(path: str, is_tree: bool) -> None:
        report.removed_debris.append(tree.store.uri(path))
        if not dry_run:
            (tree.store.rm_tree if is_tree else tree.store.rm_file)(path)

    for n in names:
        scan = tree.scan(n)
        changed = False
        for sid, mtime in sorted(scan.staging.items()):
            if old(mtime):
                remove(tree.kdir(n, "staging", sid), True)
        for tid in sorted(scan.trash):  # versions an earlier gc took out but did not finish deleting
            remove(tree.kdir(n, "trash", tid), True)
        live_claims: set[int] = set()
        for cname, info in sorted(scan.claims.items()):
            v = parse_version(cname.split(".", 1)[0])
            cpath = tree.kdir(n, "claims", cname)
            if v is None or v in scan.committed or v in scan.damaged:
                remove(cpath, False)
                continue
            created = info_mtime(info)
            try:
                created = float(json.loads(tree.store.read(cpath) or b"{}").get("created", created))
            except (ValueError, TypeError, AttributeError):
                pass
            if old(created):
                if v in scan.uncommitted:
                    remove(tree.vdir(n, v), True)
                    scan.uncommitted.pop(v)
                remove(cpath, False)
            else:
                live_claims.add(v)
        for v, files in sorted(scan.uncommitted.items()):
            if v in live_claims:
                continue
            if mode == "rename":
                # Renamed publishes are never partial: a metadata-less directory here was put
                # by hand (or by a marker-mode publisher whose stale claim was handled above).
                report.damaged.append((n, v, "no metadata: not published by the repository; left in place"))
                continue
            mtimes = [info_mtime(i) for i in files.values()]
            known = [m for m in mtimes if m is not None]
            newest = max(known) if known and len(known) == len(mtimes) else None
            if old(newest):
                remove(tree.vdir(n, v), True)
        for rel, mtime in sorted(scan.temp_files.items()):
            if old(mtime):
                remove(tree.kdir(n, rel), False)
        for v, problem in sorted(scan.damaged.items()):
            report.damaged.append((n, v, problem))
        if keep_last is not None and scan.committed:
            changed |= _gc_versions(tree, n, scan, keep_last, serve_latest, report, dry_run)
        if changed and not dry_run:
            _model_config.refresh(tree, n, serve_latest)
    if report.removed_debris or report.removed_versions:
        logger.info(
            "gc%s: %d versions, %d debris paths",
            " (dry run)" if dry_run else "",
            len(report.removed_versions),
            len(report.removed_debris),
        )
    return report


def _protected(
    tree: Tree, name: str, committed: list[int], keep_last: int, serve_latest: int
) -> dict[int, str]:
    protected: dict[int, str] = {}
    for v in committed[-keep_last:]:
        protected.setdefault(v, "newest")
    named = aliases(tree, name)
    for a, v in named.items():
        protected.setdefault(v, f"alias:{a}")
    for d in deployments(tree, name):
        protected.setdefault(d.version, f"deployed:{d.service}")
    for v in served_versions(committed, named, serve_latest):
        protected.setdefault(v, "served")
    return protected


def _gc_versions(
    tree: Tree, name: str, scan: Scan, keep_last: int, serve_latest: int, report: GcReport, dry_run: bool
) -> bool:
    committed = sorted(scan.committed)
    protected = _protected(tree, name, committed, keep_last, serve_latest)
    doomed = [v for v in committed[:-keep_last] if v not in protected]
    if doomed and not dry_run:
        # An alias or deployment recorded since the first look protects too; what remains
        # is the window between this look and the delete (gc is an operator's tool).
        protected = _protected(tree, name, committed, keep_last, serve_latest)
    changed = False
    for v in committed[:-keep_last]:
        if v in protected:
            report.kept.append((name, v, protected[v]))
            continue
        report.removed_versions.append((name, v))
        if dry_run:
            continue
        vdir = tree.vdir(name, v)
        if tree.store.local:
            # One atomic rename takes the whole version out of the base path (a poller sees
            # it complete or gone), then the copy in the trash is deleted at leisure.
            trash = tree.kdir(name, "trash", f"{v}-{uuid.uuid4().hex[:8]}")
            tree.store.makedirs(tree.kdir(name, "trash"))
            os.rename(vdir, trash)
            tree.store.rm_tree(trash)
        else:
            tree.store.rm_file(Store.join(vdir, METADATA_FILE))  # uncommit first
            tree.store.rm_tree(vdir)
        tree.forget(name, v)
        changed = True
    return changed
