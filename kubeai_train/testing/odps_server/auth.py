"""Request signature check of the local ODPS server: the "ODPS <access id>:<signature>" scheme
pyodps's CloudAccount signs with (HMAC-SHA1 over a canonical string; legacy v2 and v4 keys).

The secret only ever lives in :class:`Credentials`; nothing here logs it or puts it in a message.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["AuthFailure", "Credentials", "canonical_string", "check_signature"]


@dataclass(frozen=True)
class Credentials:
    """The access key the server accepts. ``repr`` never shows the secret."""

    access_id: str
    secret: str = field(repr=False)

    def __post_init__(self) -> None:
        if not self.access_id or not self.secret:
            raise ValueError("access_id and secret must be non-empty strings")


class AuthFailure(Exception):
    """Why a request is not authenticated: carries the HTTP status and ODPS error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message


def canonical_string(method: str, raw_path: str, headers: dict[str, str]) -> str:
    """The string pyodps signs (odps.accounts.BaseAccount._build_canonical_str).

    Args:
        method: HTTP method, upper case.
        raw_path: request target relative to the endpoint (path and query, URL-encoded).
        headers: request headers with lower-case names.
    """
    parts = urlsplit(unquote(raw_path), allow_fragments=False)
    resource = parts.path
    params: dict[str, str] = {}
    if parts.query:
        params = dict(parse_qsl(parts.query, True))
        resource += "?" + "&".join(k if v == "" else f"{k}={v}" for k, v in sorted(params.items()))
    to_sign = {
        k: v for k, v in headers.items() if k in ("content-type", "content-md5") or k.startswith("x-odps-")
    }
    to_sign.setdefault("content-type", "")
    to_sign.setdefault("content-md5", "")
    to_sign["date"] = headers.get("date", "")
    for k, v in params.items():
        if k.startswith("x-odps-"):
            to_sign[k] = v
    lines = [method]
    for k in sorted(to_sign):
        lines.append(f"{k}:{to_sign[k]}" if k.startswith("x-odps-") else to_sign[k])
    lines.append(resource)
    return "\n".join(lines)


def _v4_key(secret: str, date_str: str, region: str, prefix: str) -> bytes:
    k = hmac.new((prefix + secret).encode(), date_str.encode(), hashlib.sha256).digest()
    k = hmac.new(k, region.encode(), hashlib.sha256).digest()
    k = hmac.new(k, b"odps", hashlib.sha256).digest()
    return hmac.new(k, (prefix + "_request").encode(), hashlib.sha256).digest()


def check_signature(
    creds: Credentials, method: str, raw_path: str, headers: dict[str, str], prefix: str = "aliyun_v4"
) -> None:
    """Raise :class:`AuthFailure` unless the request carries a valid signature of ``creds``."""
    auth = headers.get("authorization", "")
    if not auth.startswith("ODPS "):
        raise AuthFailure(401, "Unauthorized", "the request is not signed (no 'ODPS' Authorization header)")
    credential, sep, signature = auth[5:].rpartition(":")
    if not sep:
        raise AuthFailure(401, "Unauthorized", "malformed Authorization header")
    scope = credential.split("/")
    access_id = scope[0]
    if not hmac.compare_digest(access_id.encode(), creds.access_id.encode()):
        raise AuthFailure(403, "NoPermission", f"access key id {access_id!r} is not known to this server")
    if len(scope) == 1:
        key = creds.secret.encode()
    elif len(scope) == 4:
        key = _v4_key(creds.secret, scope[1], scope[2], prefix)
    else:
        raise AuthFailure(401, "Unauthorized", "malformed credential scope in the Authorization header")
    expected = base64.b64encode(
        hmac.new(key, canonical_string(method, raw_path, headers).encode(), hashlib.sha1).digest()
    ).decode()
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise AuthFailure(
            403,
            "SignatureNotMatch",
            f"signature of access key id {access_id!r} does not match; check the secret",
        )
