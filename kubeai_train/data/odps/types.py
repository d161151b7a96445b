"""Contracts of the odps:// source: partition specs, the environment names, the errors, and which
failures are worth a reopen."""

from __future__ import annotations

import http.client
import re

from kubeai_train.data.odps._deps import odps_errors, requests, urllib3
from kubeai_train.data.types import DataError

__all__ = [
    "SESSIONS_ENV",
    "SESSION_DIR_ENV",
    "ChecksumMismatch",
    "OdpsPermissionError",
    "OdpsSessionError",
    "OdpsTableChangedError",
    "Spec",
    "is_transient",
    "parse_spec",
    "spec_str",
]

SESSIONS_ENV = "KUBEAI_ODPS_SESSIONS"
SESSION_DIR_ENV = "KUBEAI_ODPS_SESSION_DIR"
URL = re.compile(r"^odps://(?P<project>[^/]+)/tables/(?P<table>[^/]+)(?:/(?P<spec>.*))?$")
ACCESS_DENIED = (
    odps_errors.NoPermission,
    odps_errors.SignatureNotMatch,
    odps_errors.AuthorizationRequired,
)


class OdpsPermissionError(DataError, PermissionError):
    """Credentials rejected or no permission on the table (names project, table, partition)."""


class OdpsTableChangedError(DataError):
    """A replacement download session sees a different row count: the table / partition was
    rewritten while it was being read, so exactly-once cannot be kept. Restart the epoch."""


class OdpsSessionError(DataError):
    """A download session could not be created or shared (names the table and partition)."""


class ChecksumMismatch(IOError):
    """A tunnel chunk's CRC32C does not match its data (corrupt or truncated body)."""


Spec = tuple[tuple[str, str], ...]


def parse_spec(text: str, url: str) -> Spec:
    out: list[tuple[str, str]] = []
    for part in re.split(r"[,/]", text):
        part = part.strip()
        if not part:
            continue
        key, eq, value = part.partition("=")
        value = value.strip().strip("'\"")
        if not eq or not key.strip() or not value:
            raise ValueError(f"partition spec {text!r} in {url!r} must be key=value[/key=value...]")
        out.append((key.strip(), value))
    return tuple(out)


def spec_str(spec: Spec) -> str:
    return ",".join(f"{k}={v}" for k, v in spec)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, DataError):
        return False
    if isinstance(exc, (ChecksumMismatch, odps_errors.ChecksumError)):
        return True
    if isinstance(exc, odps_errors.ODPSError):
        status = getattr(exc, "status_code", None)
        return status is not None and (status >= 500 or status == 429)
    if isinstance(
        exc,
        (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
            urllib3.exceptions.HTTPError,
            http.client.HTTPException,
            ConnectionError,
            TimeoutError,
        ),
    ):
        return True
    return isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, PermissionError))
