"""A local OSS server: the object API that the real oss2 / ossfs clients speak, served from a directory.

For tests, benchmarks and offline development. Objects live at ``ROOT/<bucket>/<key>``; each
top-level directory of ROOT with a valid bucket name is a bucket, so a directory of Parquet files
is served as it is. Point the clients at it with ``OSS_ENDPOINT=http://127.0.0.1:PORT`` (oss2 then
sends path-style URLs) and the server's access key id / secret.

Implemented: GetObject (Range, ``x-oss-range-behavior: standard``), HeadObject / GetObjectMeta,
ListObjects v1 and v2 (prefix, delimiter, marker / continuation token, max-keys paging),
PutObject, AppendObject (what ossfs's writable files use), CopyObject, DeleteObject,
DeleteMultipleObjects, multipart upload (initiate, upload part, list parts, complete, abort, list
uploads), ListBuckets, PutBucket / DeleteBucket, GetBucketInfo, GetBucketLocation,
``x-oss-forbid-overwrite``. Responses carry MD5 ETags and CRC-64 (``x-oss-hash-crc64ecma``) that
oss2 verifies. Every request must carry a valid OSS signature V1 (oss2's default) for the
configured credentials, or it gets OSS's 403 (InvalidAccessKeyId, SignatureDoesNotMatch, ...).

Testing hooks: :meth:`OSSServer.inject` adds a :class:`Fault` (503s, connection resets or
truncation mid-body, delays, throttling); :meth:`OSSServer.stats` reports response body bytes in
total and per object, requests per operation, and the byte ranges served. The same is reachable
over HTTP (``/_admin/stats``, ``/_admin/faults``) for servers in another process.

Offline development::

    python -m kubeai_train.testing.oss_server --root DIR [--port P] [--bucket NAME]

prints the endpoint and the variables to export; then ``oss://<bucket>/<key>`` works through ossfs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import sys
import threading
import urllib.request
from typing import Any

from ._oss_auth import Credentials
from ._oss_faults import ByteCounter, Fault, FaultBook
from ._oss_handler import OSSRequestHandler
from ._oss_httpd import OSSHTTPServer
from ._oss_store import ObjectStore, StoreError

__all__ = ["Credentials", "Fault", "OSSServer", "main"]

logger = logging.getLogger("kubeai_train.testing.oss_server")

DEFAULT_ACCESS_KEY_ID = "kubeai-local-id"
DEFAULT_ACCESS_KEY_SECRET = "kubeai-local-secret"


class OSSServer:
    """A threaded OSS-compatible HTTP server on 127.0.0.1.

    Usable as a context manager (``with OSSServer(tmp_path) as srv: ...``) or with
    :meth:`start` / :meth:`stop`.

    Args:
        root: directory holding the buckets (created if missing).
        port: TCP port; 0 picks a free one.
        host: address to bind; loopback by default.
        access_key_id, access_key_secret, security_token: the one identity accepted. With a
            security token set, requests must also carry it (``x-oss-security-token``, as oss2's
            StsAuth sends it).
        buckets: bucket names to create at start.
        anonymous: accept unsigned requests instead of checking signatures.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        port: int = 0,
        host: str = "127.0.0.1",
        access_key_id: str = DEFAULT_ACCESS_KEY_ID,
        access_key_secret: str = DEFAULT_ACCESS_KEY_SECRET,
        security_token: str | None = None,
        buckets: tuple[str, ...] | list[str] = (),
        anonymous: bool = False,
    ):
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        self.store = ObjectStore(root)
        for name in buckets:
            self.create_bucket(name)
        self.credentials = (
            None if anonymous else Credentials(access_key_id, access_key_secret, security_token)
        )
        self.faults = FaultBook()
        self.counter = ByteCounter()
        self._host = host
        self._port = port
        self._httpd: OSSHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> OSSServer:
        """Bind and serve in a background thread; returns self."""
        if self._httpd is not None:
            return self
        httpd = OSSHTTPServer((self._host, self._port), OSSRequestHandler)
        httpd.store = self.store
        httpd.credentials = self.credentials
        httpd.faults = self.faults
        httpd.counter = self.counter
        httpd.host_id = f"{self._host}:{httpd.server_address[1]}"
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="oss-server", daemon=True)
        self._thread.start()
        logger.info("local OSS server on %s serving %s", self.endpoint, self.store.root)
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> OSSServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ addresses
    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the OSS server is not started; call start() first")
        return int(self._httpd.server_address[1])

    @property
    def endpoint(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def root(self) -> str:
        return self.store.root

    def env(self) -> dict[str, str]:
        """The environment variables (DESIGN.md names) that point oss2 / ossfs / kubeai_train here."""
        env = {"OSS_ENDPOINT": self.endpoint}
        if self.credentials is not None:
            env["OSS_ACCESS_KEY_ID"] = self.credentials.access_key_id
            env["OSS_ACCESS_KEY_SECRET"] = self.credentials.access_key_secret
            if self.credentials.security_token:
                env["OSS_SESSION_TOKEN"] = self.credentials.security_token
        return env

    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for ``ossfs.OSSFileSystem`` / ``fsspec.filesystem("oss", ...)``."""
        opts: dict[str, Any] = {"endpoint": self.endpoint}
        if self.credentials is not None:
            opts["key"] = self.credentials.access_key_id
            opts["secret"] = self.credentials.access_key_secret
            if self.credentials.security_token:
                opts["token"] = self.credentials.security_token
        return opts

    def create_bucket(self, name: str) -> None:
        """Create a bucket (a directory under root); ValueError for a name OSS would refuse."""
        try:
            self.store.create_bucket(name)
        except StoreError as e:
            raise ValueError(
                f"bucket name {name!r} is not valid: use 3-63 lower-case letters, digits and '-'"
            ) from e

    # ------------------------------------------------------------------ testing hooks
    def inject(self, fault: Fault | None = None, **kwargs: Any) -> Fault:
        """Add a fault rule (a :class:`Fault`, or its fields as keywords); returns it (see ``fired``)."""
        return self.faults.add(fault if fault is not None else Fault(**kwargs))

    def clear_faults(self) -> None:
        self.faults.clear()

    def stats(self) -> dict[str, Any]:
        """``{"bytes_total", "bytes_by_object": {"bucket/key": n}, "requests": {op: n}, "get_ranges"}``."""
        return self.counter.snapshot()

    def reset_stats(self) -> None:
        self.counter.reset()


class AdminClient:
    """The admin API of a server running in another process (``/_admin/...``)."""

    def __init__(self, endpoint: str, timeout: float = 10.0):
        self.endpoint = endpoint.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(self.endpoint + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/_admin/stats")

    def reset_stats(self) -> None:
        self._call("POST", "/_admin/stats/reset", {})

    def inject(self, **fault: Any) -> dict[str, Any]:
        return self._call("POST", "/_admin/faults", fault)

    def clear_faults(self) -> None:
        self._call("DELETE", "/_admin/faults")


def main(argv: list[str] | None = None) -> int:
    """``python -m kubeai_train.testing.oss_server --root DIR [--port P] [--bucket NAME]...``"""
    parser = argparse.ArgumentParser(
        prog="python -m kubeai_train.testing.oss_server",
        description="Serve ROOT/<bucket>/<key> over the OSS object API on 127.0.0.1 (offline development).",
    )
    parser.add_argument("--root", required=True, help="directory holding one sub-directory per bucket")
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    parser.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    parser.add_argument("--anonymous", action="store_true", help="accept unsigned requests")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        print(f"--port must be in 0..65535, got {args.port}", file=sys.stderr)
        return 2
    # Credentials: the ones already in the environment, else fresh throw-away ones for this server.
    env_id, env_secret = os.environ.get("OSS_ACCESS_KEY_ID"), os.environ.get("OSS_ACCESS_KEY_SECRET")
    from_env = bool(env_id and env_secret)
    key_id = env_id if from_env and env_id else "local-" + secrets.token_hex(4)
    secret = env_secret if from_env and env_secret else secrets.token_urlsafe(18)
    try:
        server = OSSServer(
            args.root,
            port=args.port,
            access_key_id=key_id,
            access_key_secret=secret,
            buckets=args.bucket,
            anonymous=args.anonymous,
        ).start()
    except (OSError, ValueError) as e:
        print(f"cannot start the OSS server: {e}", file=sys.stderr)
        return 2
    print(f"local OSS server on {server.endpoint} serving {server.root}")
    print(f"buckets: {', '.join(b for b, _ in server.store.buckets()) or '(none yet)'}")
    print(f"export OSS_ENDPOINT={server.endpoint}")
    if not args.anonymous:
        print(f"export OSS_ACCESS_KEY_ID={key_id}")
        if from_env:
            print("# OSS_ACCESS_KEY_SECRET: the one already in your environment")
        else:
            print(f"export OSS_ACCESS_KEY_SECRET={secret}  # throw-away, for this local server only")
    sys.stdout.flush()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
