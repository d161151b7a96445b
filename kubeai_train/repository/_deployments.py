"""Deployments: which service runs which version, as append-only records under
``<name>/.kubeai/deployments/`` (one new file per record, so concurrent recorders never lose one).
"""

from __future__ import annotations

import json
import logging
import time
import uuid

from kubeai_train.repository._storage import Store
from kubeai_train.repository._tree import Tree, now_iso
from kubeai_train.repository.config import redact_url
from kubeai_train.repository.errors import RepositoryError
from kubeai_train.repository.types import Deployment

__all__ = ["deployments", "record_deployment"]

# The repository logs under one name, whichever of its modules speaks.
logger = logging.getLogger("kubeai_train.repository.repo")


def record_deployment(
    tree: Tree,
    name: str,
    version: int,
    service: str,
    *,
    environment: str | None,
    endpoint: str | None,
    status: str,
    note: str | None,
) -> Deployment:
    """Append one record (arguments checked by the caller; the endpoint's credentials are
    redacted) and return it."""
    dep = Deployment(
        name=name,
        version=version,
        service=service,
        status=status,
        environment=environment,
        endpoint=redact_url(endpoint) if endpoint else None,
        recorded=now_iso(),
        note=note,
    )
    fname = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
    tree.store.write_new(tree.kdir(name, "deployments", fname), json.dumps(dep.to_json()).encode())
    logger.info("deployment %s/%d %s on %s", name, version, status, service)
    return dep


def deployments(tree: Tree, name: str, *, history: bool = False) -> list[Deployment]:
    """The latest ``deployed`` record of each (service, environment) slot, sorted by service;
    ``history=True``: every record, oldest first. Unreadable records are logged and skipped."""
    ddir = tree.kdir(name, "deployments")
    records = []
    for fname in sorted(tree.store.listdir(ddir)):
        if not fname.endswith(".json") or fname.startswith("."):
            continue
        try:
            d = json.loads(tree.store.read(Store.join(ddir, fname)) or b"")
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
