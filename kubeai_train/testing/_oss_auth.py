"""OSS request signatures, checked the way OSS checks them, for the local OSS server.

oss2 (and so ossfs) signs with OSS signature version 1 by default: ``Authorization: OSS
<AccessKeyId>:<base64(HMAC-SHA1(secret, string-to-sign))>`` where the string to sign is::

    VERB \\n Content-MD5 \\n Content-Type \\n Date \\n CanonicalizedOSSHeaders CanonicalizedResource

(see ``oss2.auth.ProviderAuth``). Pre-signed URLs carry ``OSSAccessKeyId``, ``Expires`` and
``Signature`` in the query and sign ``Expires`` in place of the date. Versions 2 and 4 are opt-in in
oss2 and answered here with a clear 403. Secrets never leave this module: errors name the access key
id at most.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from ._oss_store import StoreError

# Query parameters that are part of the signed resource (oss2.auth.ProviderAuth._subresource_key_set).
SUBRESOURCES = frozenset(
    [
        "response-content-type",
        "response-content-language",
        "response-cache-control",
        "logging",
        "response-content-encoding",
        "acl",
        "uploadId",
        "uploads",
        "partNumber",
        "group",
        "link",
        "delete",
        "website",
        "location",
        "objectInfo",
        "objectMeta",
        "response-expires",
        "response-content-disposition",
        "cors",
        "lifecycle",
        "restore",
        "qos",
        "referer",
        "stat",
        "bucketInfo",
        "append",
        "position",
        "security-token",
        "live",
        "comp",
        "status",
        "vod",
        "startTime",
        "endTime",
        "x-oss-process",
        "symlink",
        "callback",
        "callback-var",
        "tagging",
        "encryption",
        "versions",
        "versioning",
        "versionId",
        "policy",
        "requestPayment",
        "x-oss-traffic-limit",
        "qosInfo",
        "asyncFetch",
        "x-oss-request-payer",
        "sequential",
        "inventory",
        "inventoryId",
        "continuation-token",
        "worm",
        "wormId",
        "wormExtend",
        "replication",
        "replicationLocation",
        "replicationProgress",
        "transferAcceleration",
        "cname",
        "metaQuery",
        "x-oss-ac-source-ip",
        "x-oss-ac-subnet-mask",
        "x-oss-ac-vpc-id",
        "x-oss-ac-forward-allow",
        "resourceGroup",
        "style",
        "styleName",
        "x-oss-async-process",
        "regionList",
        "x-oss-write-get-object-response",
    ]
)

MAX_SKEW_SECONDS = 15 * 60


@dataclass(frozen=True)
class Credentials:
    """The one identity the local server accepts. ``repr`` never shows the secret or token."""

    access_key_id: str
    access_key_secret: str
    security_token: str | None = None

    def __post_init__(self) -> None:
        if not self.access_key_id or not self.access_key_secret:
            raise ValueError("OSS server credentials need a non-empty access key id and secret")

    def __repr__(self) -> str:
        return f"Credentials(access_key_id={self.access_key_id!r}, access_key_secret='***')"


def _canonical_resource(bucket: str, key: str, params: Mapping[str, str]) -> str:
    sub = sorted((k, v) for k, v in params.items() if k in SUBRESOURCES)
    query = "&".join(f"{k}={v}" if v else k for k, v in sub)
    resource = f"/{bucket}/{key}" if bucket else "/"
    return resource + ("?" + query if query else "")


def string_to_sign(
    method: str, headers: Mapping[str, str], bucket: str, key: str, params: Mapping[str, str], date: str
) -> bytes:
    """The bytes OSS signature V1 signs (``headers`` keys lower-case)."""
    oss_headers = sorted((k, v) for k, v in headers.items() if k.startswith("x-oss-"))
    canon = "".join(f"{k}:{v}\n" for k, v in oss_headers)
    return "\n".join(
        [
            method,
            headers.get("content-md5", ""),
            headers.get("content-type", ""),
            date,
            canon + _canonical_resource(bucket, key, params),
        ]
    ).encode("utf-8")


def _sign(secret: str, data: bytes) -> str:
    return base64.b64encode(hmac.new(secret.encode(), data, hashlib.sha1).digest()).decode()


def verify(
    creds: Credentials,
    method: str,
    headers: Mapping[str, str],
    bucket: str,
    key: str,
    params: Mapping[str, str],
    now: float | None = None,
) -> None:
    """Raise StoreError(403) unless the request is signed with ``creds``.

    Args:
        headers: request headers with lower-case names.
        params: decoded query parameters.
    """
    now = time.time() if now is None else now
    auth = headers.get("authorization")
    if auth is None and "Signature" in params:
        _verify_url(creds, method, headers, bucket, key, params, now)
        return
    if auth is None:
        raise StoreError(
            403, "AccessDenied", "anonymous access is forbidden; sign the request (OSS signature V1)"
        )
    if not auth.startswith("OSS "):
        version = auth.split(" ", 1)[0]
        raise StoreError(
            403,
            "AccessDenied",
            f"the local OSS server checks signature V1 ('OSS <id>:<signature>', oss2's default); got {version!r}",
        )
    key_id, _, signature = auth[4:].rpartition(":")
    if not hmac.compare_digest(key_id.encode(), creds.access_key_id.encode()):
        raise StoreError(403, "InvalidAccessKeyId", f"the access key id {key_id!r} does not exist")
    _check_token(creds, headers.get("x-oss-security-token"))
    date = headers.get("x-oss-date") or headers.get("date", "")
    try:
        when = parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError) as e:
        raise StoreError(403, "AccessDenied", f"the request has no valid Date header: {date!r}") from e
    if abs(when - now) > MAX_SKEW_SECONDS:
        raise StoreError(
            403,
            "RequestTimeTooSkewed",
            "the difference between the request time and the server's time is too large",
        )
    expected = _sign(creds.access_key_secret, string_to_sign(method, headers, bucket, key, params, date))
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise StoreError(
            403,
            "SignatureDoesNotMatch",
            "the request signature we calculated does not match the signature you provided; check your "
            "access key secret",
        )


def _check_token(creds: Credentials, token: str | None) -> None:
    if creds.security_token is None:
        return
    if token is None or not hmac.compare_digest(token.encode(), creds.security_token.encode()):
        raise StoreError(403, "InvalidSecurityToken", "the security token is missing or not valid")


def _verify_url(
    creds: Credentials,
    method: str,
    headers: Mapping[str, str],
    bucket: str,
    key: str,
    params: Mapping[str, str],
    now: float,
) -> None:
    key_id = params.get("OSSAccessKeyId", "")
    if not hmac.compare_digest(key_id.encode(), creds.access_key_id.encode()):
        raise StoreError(403, "InvalidAccessKeyId", f"the access key id {key_id!r} does not exist")
    _check_token(creds, params.get("security-token"))
    expires = params.get("Expires", "")
    if not expires.isdigit() or int(expires) < now:
        raise StoreError(403, "AccessDenied", "the signed URL has expired")
    expected = _sign(creds.access_key_secret, string_to_sign(method, headers, bucket, key, params, expires))
    if not hmac.compare_digest(expected.encode(), params.get("Signature", "").encode()):
        raise StoreError(403, "SignatureDoesNotMatch", "the signature of the URL does not match")
