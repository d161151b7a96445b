"""The dispatcher over HTTP (stdlib ``ThreadingHTTPServer``, JSON), its client, and discovery.

One server per job serves the dispatchers of every dataset read with
``assignment="dynamic"`` (keyed by the splits' fingerprint and the shuffle seed). Protocol:
``POST /v1/<op>`` with a JSON object, answered with a JSON object; ``op`` is one of
``hello``, ``request``, ``ack``, ``heartbeat``, ``release``, ``stats``. A dataset not yet
registered answers 404, which a client treats like an unreachable server (it retries): the
reader on the hosting process registers it, so other readers may start first.

Where it runs (no user code): in the process of the chief (TF: ``chief``/``master`` in
``TF_CONFIG``, else worker 0) or of rank 0 (torch), started by the first dynamic dataset that
process opens. Its address, :func:`address`:

* ``KUBEAI_TRAIN_DISPATCHER=host:port`` when set (the local launcher sets it to a port it
  reserves, because all local tasks share 127.0.0.1 and neighbouring ports);
* else the chief's host (TF) / ``MASTER_ADDR`` (torch) and the chief's port + 1 / ``MASTER_PORT``
  + 1. One port above the job's own address is chosen because every process already knows that
  address from the operator's environment (so nothing has to be published, unlike a port picked
  at random) and on Kubernetes the chief / master pod has its own IP with nothing else on that
  port (the operator's headless service lets pods reach any port of it). In the operator's
  sparse ``TF_CONFIG`` a worker does not know the chief: set ``KUBEAI_TRAIN_DISPATCHER`` then.

The service has no authentication: it must only be reachable inside the job's network.
"""

from __future__ import annotations

import atexit
import http.client
import json
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kubeai_train import cluster
from kubeai_train.data.dispatch.core import Dispatcher, DispatchError, Piece
from kubeai_train.data.types import Split, StateError

__all__ = [
    "ADDRESS_ENV",
    "Client",
    "DispatchServer",
    "address",
    "is_host",
]

log = logging.getLogger("kubeai_train.data.dispatch")
ADDRESS_ENV = cluster.DISPATCHER_ENV


def _split_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or "/" in host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise DispatchError(f"{what} must be host:port, got {value!r}")
    return host.strip("[]"), int(port)


def address(env: Mapping[str, str] | None = None) -> tuple[str, int]:
    """The dispatcher's ``(host, port)`` for this job (see module doc).

    Raises:
        DispatchError: no cluster to derive it from and no ``KUBEAI_TRAIN_DISPATCHER``.
    """
    env = os.environ if env is None else env
    if env.get(ADDRESS_ENV):
        return _split_hostport(env[ADDRESS_ENV], ADDRESS_ENV)
    info = cluster.from_env(env)
    if info.framework == "tf":
        for role in ("chief", "master"):
            if info.cluster.get(role):
                host, port = _split_hostport(info.cluster[role][0], f"TF_CONFIG cluster.{role}[0]")
                return host, port + 1
        workers = info.cluster.get("worker", ())
        if workers and not info.sparse:
            host, port = _split_hostport(workers[0], "TF_CONFIG cluster.worker[0]")
            return host, port + 1
        raise DispatchError(
            f"cannot find the dispatcher: TF_CONFIG names no chief (and this worker does not see worker 0); "
            f"set {ADDRESS_ENV}=host:port to where the chief should serve it"
        )
    if info.framework == "torch" and info.master_addr and info.master_port:
        return info.master_addr, info.master_port + 1
    # one local process: no cluster, the dispatcher lives in this process on a port it picks
    return "127.0.0.1", 0


def is_host(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process hosts the dispatcher (the TF chief / torch rank 0 / a lone process)."""
    return cluster.from_env(os.environ if env is None else env).is_chief


# --------------------------------------------------------------------------------------------
# server


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive: one connection per client thread
    # headers and body go out in two writes: without TCP_NODELAY, Nagle's algorithm and the
    # client's delayed ACK hold the second one ~40 ms on a kept-alive connection
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("dispatcher %s: " + format, self.address_string(), *args)

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(n) or b"{}")
            op = self.path.rsplit("/", 1)[-1]
            code, out = self.server.owner.handle(op, body)
        except (DispatchError, StateError, ValueError, KeyError, TypeError) as e:
            code, out = 400, {"error": f"{type(e).__name__}: {e}"}
        data = json.dumps(out).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: DispatchServer


class DispatchServer:
    """An HTTP server holding one :class:`Dispatcher` per dataset, on a daemon thread.

    Args:
        host / port: where to listen (port 0: pick one; see :attr:`port`).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._dispatchers: dict[str, Dispatcher] = {}
        self._lock = threading.Lock()
        try:
            self._http = _HTTPServer((host, port), _Handler)
        except OSError as e:
            raise DispatchError(f"cannot serve the dispatcher on {host}:{port}: {e.strerror or e}") from e
        self._http.owner = self
        self.host = host
        self.port = int(self._http.server_address[1])
        self._thread = threading.Thread(
            target=self._http.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="kubeai-dispatcher",
            daemon=True,
        )
        self._thread.start()
        self._reaper = threading.Thread(target=self._reap, name="kubeai-dispatcher-leases", daemon=True)
        self._stopped = threading.Event()
        self._reaper.start()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}"

    def register(self, dataset: str, dispatcher: Dispatcher, replace: bool = False) -> Dispatcher:
        """Serve ``dispatcher`` as ``dataset``; unless ``replace``, one already served wins."""
        with self._lock:
            if replace:
                self._dispatchers[dataset] = dispatcher
                return dispatcher
            return self._dispatchers.setdefault(dataset, dispatcher)

    def unregister(self, dataset: str) -> None:
        """Stop serving ``dataset`` (its readers are told "not yet" until it is registered again)."""
        with self._lock:
            self._dispatchers.pop(dataset, None)

    def dispatcher(self, dataset: str) -> Dispatcher | None:
        with self._lock:
            return self._dispatchers.get(dataset)

    def handle(self, op: str, body: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """Run one protocol operation (what the HTTP handler calls)."""
        d = self.dispatcher(str(body.get("dataset")))
        if d is None:
            return 404, {"error": f"dataset {body.get('dataset')!r} is not registered (yet)"}
        return 200, handle(d, op, body)

    def _reap(self) -> None:
        # leases also expire on every call; this catches a job whose every reader went quiet
        while not self._stopped.wait(1.0):
            with self._lock:
                ds = list(self._dispatchers.values())
            for d in ds:
                d.expire()

    def close(self) -> None:
        self._stopped.set()
        self._http.shutdown()
        self._http.server_close()


def handle(d: Dispatcher, op: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """One protocol operation on ``d``: the answer's JSON object, with ``d``'s incarnation
    (``inc``: a reader that sees it change says hello again)."""
    out = _handle(d, op, body)
    out["inc"] = d.incarnation
    return out


def _handle(d: Dispatcher, op: str, body: Mapping[str, Any]) -> dict[str, Any]:
    reader = str(body.get("reader"))
    if op == "request":
        got = d.request(reader, int(body["epoch"]), int(body["num_readers"]))
        return {"status": got} if isinstance(got, str) else {"status": "piece", "piece": got.to_dict()}
    if op == "ack":
        return {"ok": d.ack(reader, Piece.from_dict(body["piece"]))}
    if op == "hello":
        keep = [Piece.from_dict(p) for p in body.get("keep") or ()]
        delivered = body.get("delivered")
        epoch = body.get("epoch")
        return {
            "ok": d.hello_many(
                reader,
                keep,
                None if delivered is None else [Piece.from_dict(p) for p in delivered],
                None if epoch is None else int(epoch),
            ),
            "lease": d.lease,
        }
    if op == "heartbeat":
        d.heartbeat(reader)
        return {}
    if op == "release":
        return {"released": d.release(reader)}
    if op == "stats":
        return d.stats(int(body["epoch"]))
    raise DispatchError(f"unknown dispatcher operation {op!r}")


_SERVER: DispatchServer | None = None
_SERVER_LOCK = threading.Lock()


def serve(env: Mapping[str, str] | None = None) -> DispatchServer:
    """This process's dispatcher server, started on first use at :func:`address`."""
    global _SERVER
    with _SERVER_LOCK:
        if _SERVER is None:
            host, port = address(env)
            # listen on every interface unless the address is a loopback one: other pods reach
            # the chief through its service name, which resolves to the pod's IP, not loopback
            bind = host if host.startswith("127.") or host == "localhost" else ""
            _SERVER = DispatchServer(bind, port)
            log.info("dispatcher serving on %s:%d", host, _SERVER.port)
            atexit.register(_drain_at_exit, _SERVER)
        return _SERVER


def _drain_at_exit(server: DispatchServer, poll: float = 0.1) -> None:
    """Keep serving while other readers still hold pieces: the host's own reading may end
    before the last acknowledgements of the others (bounded by their leases). Rank 0's readers
    (this process and its DataLoader workers) are ending with it and are not waited for."""
    with server._lock:
        ds = list(server._dispatchers.values())
    if not ds:
        return
    deadline = time.monotonic() + max(d.lease for d in ds) + 1.0
    while time.monotonic() < deadline and any(d.busy(lambda r: r.startswith("0.")) for d in ds):
        time.sleep(poll)
    time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))  # answer the readers' last goodbyes


# --------------------------------------------------------------------------------------------
# client


class Client:
    """JSON calls to a dispatcher with retries.

    Connection failures (refused, reset, timeout, and 404 for a dataset the host has not
    registered yet) are retried with exponential backoff for up to ``timeout`` seconds, then
    raise one :class:`DispatchError` line naming the address.
    """

    def __init__(
        self, url: str, *, timeout: float = 120.0, backoff: float = 0.1, max_backoff: float = 5.0
    ) -> None:
        self.url = url.rstrip("/")
        parsed = urllib.parse.urlsplit(self.url)
        if parsed.scheme != "http" or not parsed.hostname or parsed.port is None:
            raise DispatchError(f"dispatcher URL must be http://host:port, got {url!r}")
        self._host, self._port = parsed.hostname, parsed.port
        self.timeout, self.backoff, self.max_backoff = float(timeout), float(backoff), float(max_backoff)
        self._local = threading.local()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        s = dict(self.__dict__)
        s["_local"] = None
        return s

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local, self._pid = threading.local(), os.getpid()

    def _conn(self) -> http.client.HTTPConnection:
        if self._pid != os.getpid():
            # a forked child (a DataLoader worker) keeps the forking thread's thread-locals:
            # its connection is the parent's socket, and two processes reading one socket take
            # each other's answers. Leave it to the parent (closing it here would not hurt the
            # parent's copy, but nothing is to be sent on it).
            self._local, self._pid = threading.local(), os.getpid()
        c: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if c is None:
            # one kept-alive connection per thread: a new TCP connection per call costs more
            # than the call (measured 3.7 ms vs well under 1 ms on a loaded 2-core machine)
            c = http.client.HTTPConnection(self._host, self._port, timeout=max(1.0, min(30.0, self.timeout)))
            self._local.conn = c
        return c

    def _drop(self) -> None:
        c = getattr(self._local, "conn", None)
        self._local.conn = None
        if c is not None:
            c.close()

    def call(self, op: str, body: Mapping[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        deadline = time.monotonic() + self.timeout
        attempt, delay = 0, self.backoff
        while True:
            attempt += 1
            try:
                c = self._conn()
                c.request("POST", f"/v1/{op}", body=data, headers={"Content-Type": "application/json"})
                resp = c.getresponse()
                raw = resp.read()
                if resp.status == 200:
                    out: dict[str, Any] = json.loads(raw)
                    return out
                try:
                    msg = str(json.loads(raw).get("error", ""))
                except (ValueError, AttributeError):
                    msg = ""
                if resp.status != 404:
                    raise DispatchError(f"dispatcher at {self.url} refused {op}: HTTP {resp.status} {msg}")
                last = f"HTTP 404: {msg}"
                delay = min(delay, 0.25)  # the host is up and registers the dataset soon: ask again soon
            # refused, reset, cut short, timed out
            except (OSError, ValueError, http.client.HTTPException) as e:
                self._drop()
                last = f"{type(e).__name__}: {e}"
            now = time.monotonic()
            if now + delay > deadline:
                raise DispatchError(
                    f"cannot reach dispatcher at {self.url} after {attempt} attempts ({last}); it runs in the "
                    f"chief / rank 0 process: check that it is up and reachable, or set {ADDRESS_ENV}=host:port"
                ) from None
            time.sleep(delay)
            delay = min(self.max_backoff, delay * 2)


def splits_payload(splits: Sequence[Split]) -> list[list[Any]]:
    return [[s.key, s.start, s.stop] for s in splits]
