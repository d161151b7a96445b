"""Aliases: ``<name>/.kubeai/aliases/<alias>.json``, one file per alias, each replaced in one
atomic write, so a reader sees an alias's old or new version, never neither."""

from __future__ import annotations

import json
import logging

from kubeai_train.repository._storage import Store
from kubeai_train.repository._tree import Tree, now_iso
from kubeai_train.repository.config import check_alias
from kubeai_train.repository.errors import AliasNotFoundError

__all__ = ["alias_version", "aliases", "read_aliases", "remove_alias", "write_alias"]

# The repository logs under one name, whichever of its modules speaks.
logger = logging.getLogger("kubeai_train.repository.repo")


def _path(tree: Tree, name: str, alias: str) -> str:
    return tree.kdir(name, "aliases", f"{alias}.json")


def aliases(tree: Tree, name: str) -> dict[str, int]:
    """``alias -> version`` of ``name`` (a checked model name), sorted by alias."""
    names = [f for f in tree.store.listdir(tree.kdir(name, "aliases")) if f.endswith(".json")]
    return read_aliases(tree, name, [f for f in names if not f.startswith(".")])


def read_aliases(tree: Tree, name: str, fnames: list[str]) -> dict[str, int]:
    """``alias -> version`` from the listed alias files ``fnames``; unreadable ones are logged
    and skipped, vanished ones skipped."""
    out = {}
    adir = tree.kdir(name, "aliases")
    for fname in sorted(fnames):
        data = tree.store.read(Store.join(adir, fname))
        if data is None:
            continue  # removed since the listing
        try:
            out[fname[: -len(".json")]] = int(json.loads(data or b"")["version"])
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring unreadable alias file %s", fname)
    return out


def alias_version(tree: Tree, name: str, alias: str) -> int:
    """The version ``alias`` points at.

    Raises:
        InvalidNameError: unsafe alias.
        AliasNotFoundError: the alias is not set (lists the aliases).
    """
    check_alias(alias)
    known = aliases(tree, name)
    if alias not in known:
        listed = ", ".join(f"{a}={v}" for a, v in known.items()) or "none"
        raise AliasNotFoundError(
            f"model {name!r} has no alias {alias!r}; aliases: {listed}", name=name, alias=alias
        )
    return known[alias]


def write_alias(tree: Tree, name: str, alias: str, version: int) -> int | None:
    """Point ``alias`` at ``version`` (checked by the caller) in one atomic write; returns the
    version it pointed at before (None when unset or unreadable)."""
    previous = None
    old = tree.store.read(_path(tree, name, alias))
    if old is not None:
        try:
            previous = int(json.loads(old)["version"])
        except (ValueError, KeyError, TypeError):
            previous = None
    body = {"alias": alias, "version": version, "previous": previous, "updated": now_iso()}
    tree.store.write_atomic(_path(tree, name, alias), json.dumps(body).encode())
    logger.info("alias %s/%s -> %d (was %s)", name, alias, version, previous)
    return previous


def remove_alias(tree: Tree, name: str, alias: str) -> None:
    """Delete ``alias``. Raises AliasNotFoundError (listing the aliases) when it is not set."""
    alias_version(tree, name, alias)
    tree.store.rm_file(_path(tree, name, alias))
