"""Session management of the odps:// source: the pyodps client per process and credentials
(shared by every source and thread, forgotten in forked children), and the lock-file protocol
that lets every process of a job share one download session per partition through a directory.

Which id a partition's session has (explicit option, ``KUBEAI_ODPS_SESSIONS``, the shared
directory, or a fresh one) is decided by :class:`~kubeai_train.data.odps.source.OdpsSource`;
this module holds the mechanisms it uses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubeai_train.data.odps._deps import ODPS, TableTunnel
from kubeai_train.data.odps.types import OdpsSessionError

__all__ = ["client_holder", "session_from_dir"]

log = logging.getLogger("kubeai_train.data")


def _forget_inherited_connections() -> None:
    """In a forked child, drop the pooled HTTP connections pyodps keeps per thread (class-wide):
    their sockets are shared with the parent, and two processes must not talk on one socket."""
    from odps.rest import RestClient

    try:
        RestClient._session_local.session_cache = {}
    except AttributeError:
        pass


os.register_at_fork(after_in_child=_forget_inherited_connections)

_CLIENTS: dict[tuple, dict[str, Any]] = {}
_CLIENTS_LOCK = threading.Lock()


def client_holder(
    project: str,
    endpoint: str | None,
    tunnel_endpoint: str | None,
    access_id: str | None,
    secret: str | None,
    token: str | None,
) -> dict[str, Any]:
    """``{"odps": ODPS, "tunnel": TableTunnel, "sessions": {...}}`` for this process and these
    credentials, created on first use; ``sessions`` caches pyodps session objects by key."""
    ident = (
        os.getpid(),
        endpoint,
        tunnel_endpoint,
        access_id,
        hashlib.sha256(f"{secret}|{token}".encode()).hexdigest(),
    )
    with _CLIENTS_LOCK:
        h = _CLIENTS.get(ident)
        if h is None:
            kw: dict[str, Any] = {"project": project, "endpoint": endpoint}
            if tunnel_endpoint:
                kw["tunnel_endpoint"] = tunnel_endpoint
            if token:
                from odps.accounts import StsAccount

                o = ODPS(account=StsAccount(access_id, secret, token), **kw)
            else:
                o = ODPS(access_id, secret, **kw)
            h = {"odps": o, "tunnel": TableTunnel(o, endpoint=tunnel_endpoint), "sessions": {}}
            _CLIENTS[ident] = h
    return h


def session_from_dir(
    session_dir: str,
    endpoint: str | None,
    key: str,
    where: str,
    stale: str | None,
    timeout: float,
    create: Callable[[], Any],
) -> str:
    """The download id for ``key`` in the shared directory, creating (or replacing ``stale``)
    under a lock.

    The first process to take ``<name>.lock`` calls ``create()`` and writes the id to
    ``<name>.json`` (atomically); the others wait for it. A lock older than 60 s is a creator
    that died and is removed. Raises OdpsSessionError after ``timeout`` seconds of waiting.
    """
    d = Path(session_dir)
    d.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha1(f"{endpoint}|{key}".encode()).hexdigest()[:20]
    path, lock = d / f"{name}.json", d / f"{name}.lock"
    deadline = time.monotonic() + timeout
    while True:
        if path.exists():
            try:
                sid = json.loads(path.read_text())["id"]
            except (ValueError, KeyError, OSError):
                sid = None
            if sid and sid != stale:
                return str(sid)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                if time.time() - lock.stat().st_mtime > 60:
                    lock.unlink(missing_ok=True)  # a creator that died
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise OdpsSessionError(
                    f"waited {timeout:.0f}s for another process to create the download session of "
                    f"{where} in {d}; remove {lock} if no job is running"
                ) from None
            time.sleep(0.05)
            continue
        try:
            os.close(fd)
            if path.exists():  # someone finished between our check and the lock
                sid = json.loads(path.read_text()).get("id")
                if sid and sid != stale:
                    return str(sid)
            sess = create()
            tmp = d / f"{name}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps({"key": key, "id": sess.id, "count": int(sess.count)}))
            os.replace(tmp, path)
            log.info("created shared ODPS download session %s for %s", sess.id, where)
            return str(sess.id)
        finally:
            lock.unlink(missing_ok=True)
