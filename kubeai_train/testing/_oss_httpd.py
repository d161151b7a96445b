"""The local OSS server's HTTP server: threads per connection, the state its request handler
serves (store, credentials, faults, byte counter), and hanging up on every client at shutdown.
It sits below both the handler (which reads that state) and :mod:`.oss_server` (which builds it)."""

from __future__ import annotations

import logging
import socket
import sys
import threading
from http.server import ThreadingHTTPServer
from typing import Any

from ._oss_auth import Credentials
from ._oss_faults import ByteCounter, FaultBook
from ._oss_store import ObjectStore

__all__ = ["OSSHTTPServer"]

logger = logging.getLogger("kubeai_train.testing.oss_server")


class OSSHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer carrying what :class:`~._oss_handler.OSSRequestHandler` serves."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    store: ObjectStore
    credentials: Credentials | None
    faults: FaultBook
    counter: ByteCounter
    host_id: str

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Hang up on every client (kept-alive connections would otherwise outlive the server)."""
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up (or tests resetting connections) are routine; anything else is a bug.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        logger.exception("local OSS server: error while serving %s", client_address)
