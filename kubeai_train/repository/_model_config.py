"""Keeps ``<name>/.kubeai/models.config`` equal to what :mod:`kubeai_train.repository.serving`
renders for the repository's state; every publish, alias change and gc calls :func:`refresh`."""

from __future__ import annotations

import logging

from kubeai_train.repository._aliases import read_aliases
from kubeai_train.repository._tree import Tree
from kubeai_train.repository.config import redact_url
from kubeai_train.repository.errors import RepositoryError
from kubeai_train.repository.serving import MODEL_CONFIG_FILE, render_model_config, served_versions

__all__ = ["read", "refresh"]

# The repository logs under one name, whichever of its modules speaks.
logger = logging.getLogger("kubeai_train.repository.repo")


def refresh(tree: Tree, name: str, serve_latest: int) -> None:
    """Rewrite ``models.config`` until it matches the repository state (converges under
    concurrent writers: each re-checks after its own write). Failures are logged, not raised:
    the version is already committed. ``serve_latest`` 0: the file is not maintained."""
    if serve_latest == 0:
        return
    path = tree.kdir(name, MODEL_CONFIG_FILE)
    try:
        for _ in range(5):
            scan = tree.scan(name)
            if not scan.committed:
                return
            aliases = {
                a: v for a, v in read_aliases(tree, name, scan.alias_files).items() if v in scan.committed
            }
            latest = scan.committed[max(scan.committed)]
            text = render_model_config(
                name,
                tree.store.uri(tree.mdir(name)),
                served_versions(sorted(scan.committed), aliases, serve_latest),
                aliases,
                latest.metadata.get("framework"),
            ).encode()
            if tree.store.read(path) == text:
                return
            tree.store.write_atomic(path, text)
    except (OSError, RepositoryError) as e:
        logger.warning("could not update %s: %s: %s", redact_url(tree.store.uri(path)), type(e).__name__, e)


def read(tree: Tree, name: str) -> str | None:
    """The current ``models.config`` text of ``name`` (None before the first publish)."""
    data = tree.store.read(tree.kdir(name, MODEL_CONFIG_FILE))
    return None if data is None else data.decode()
