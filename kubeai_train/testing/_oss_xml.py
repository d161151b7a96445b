"""XML bodies of the OSS API, as the local OSS server writes and reads them (shapes from oss2.xml_utils)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from urllib.parse import quote
from xml.etree import ElementTree as ET

from ._oss_store import ObjectMeta, StoreError

_OWNER_ID = "kubeai-local"


def iso8601(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))


def _doc(root: ET.Element) -> bytes:
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8")


def _add(parent: ET.Element, tag: str, text: object = None) -> ET.Element:
    node = ET.SubElement(parent, tag)
    if text is not None:
        node.text = str(text)
    return node


def _enc(value: str, url: bool) -> str:
    return quote(value, safe="/") if url else value


def error(code: str, message: str, request_id: str, host_id: str, **extra: str) -> bytes:
    root = ET.Element("Error")
    _add(root, "Code", code)
    _add(root, "Message", message)
    _add(root, "RequestId", request_id)
    _add(root, "HostId", host_id)
    for k, v in extra.items():
        _add(root, k, v)
    return _doc(root)


def _contents(root: ET.Element, objects: Iterable[tuple[str, ObjectMeta]], url: bool, owner: bool) -> None:
    for key, meta in objects:
        node = _add(root, "Contents")
        _add(node, "Key", _enc(key, url))
        _add(node, "LastModified", iso8601(meta.last_modified))
        _add(node, "ETag", f'"{meta.etag}"')
        _add(node, "Type", meta.object_type)
        _add(node, "Size", meta.size)
        _add(node, "StorageClass", "Standard")
        if owner:
            o = _add(node, "Owner")
            _add(o, "ID", _OWNER_ID)
            _add(o, "DisplayName", _OWNER_ID)


def list_objects(
    bucket: str,
    prefix: str,
    marker: str,
    delimiter: str,
    max_keys: int,
    url: bool,
    objects: list[tuple[str, ObjectMeta]],
    prefixes: list[str],
    truncated: bool,
    next_marker: str,
) -> bytes:
    root = ET.Element("ListBucketResult")
    _add(root, "Name", bucket)
    _add(root, "Prefix", _enc(prefix, url))
    _add(root, "Marker", _enc(marker, url))
    _add(root, "MaxKeys", max_keys)
    _add(root, "Delimiter", _enc(delimiter, url))
    if url:
        _add(root, "EncodingType", "url")
    _add(root, "IsTruncated", "true" if truncated else "false")
    if truncated:
        _add(root, "NextMarker", _enc(next_marker, url))
    _contents(root, objects, url, owner=True)
    for p in prefixes:
        _add(_add(root, "CommonPrefixes"), "Prefix", _enc(p, url))
    return _doc(root)


def list_objects_v2(
    bucket: str,
    prefix: str,
    start_after: str,
    token: str,
    delimiter: str,
    max_keys: int,
    url: bool,
    fetch_owner: bool,
    objects: list[tuple[str, ObjectMeta]],
    prefixes: list[str],
    truncated: bool,
    next_token: str,
) -> bytes:
    root = ET.Element("ListBucketResult")
    _add(root, "Name", bucket)
    _add(root, "Prefix", _enc(prefix, url))
    if start_after:
        _add(root, "StartAfter", _enc(start_after, url))
    if token:
        _add(root, "ContinuationToken", _enc(token, url))
    _add(root, "MaxKeys", max_keys)
    _add(root, "Delimiter", _enc(delimiter, url))
    if url:
        _add(root, "EncodingType", "url")
    _add(root, "IsTruncated", "true" if truncated else "false")
    if truncated:
        _add(root, "NextContinuationToken", _enc(next_token, url))
    _add(root, "KeyCount", len(objects) + len(prefixes))
    _contents(root, objects, url, owner=fetch_owner)
    for p in prefixes:
        _add(_add(root, "CommonPrefixes"), "Prefix", _enc(p, url))
    return _doc(root)


def list_buckets(buckets: list[tuple[str, float]], endpoint_host: str) -> bytes:
    root = ET.Element("ListAllMyBucketsResult")
    o = _add(root, "Owner")
    _add(o, "ID", _OWNER_ID)
    _add(o, "DisplayName", _OWNER_ID)
    bs = _add(root, "Buckets")
    for name, created in buckets:
        b = _add(bs, "Bucket")
        _add(b, "CreationDate", iso8601(created))
        _add(b, "ExtranetEndpoint", endpoint_host)
        _add(b, "IntranetEndpoint", endpoint_host)
        _add(b, "Location", "oss-local")
        _add(b, "Name", name)
        _add(b, "Region", "local")
        _add(b, "StorageClass", "Standard")
    return _doc(root)


def bucket_info(name: str, created: float, endpoint_host: str) -> bytes:
    root = ET.Element("BucketInfo")
    b = _add(root, "Bucket")
    _add(b, "CreationDate", iso8601(created))
    _add(b, "ExtranetEndpoint", endpoint_host)
    _add(b, "IntranetEndpoint", endpoint_host)
    _add(b, "Location", "oss-local")
    _add(b, "Name", name)
    _add(b, "StorageClass", "Standard")
    o = _add(b, "Owner")
    _add(o, "DisplayName", _OWNER_ID)
    _add(o, "ID", _OWNER_ID)
    _add(_add(b, "AccessControlList"), "Grant", "private")
    _add(b, "DataRedundancyType", "LRS")
    return _doc(root)


def bucket_location() -> bytes:
    root = ET.Element("LocationConstraint")
    root.text = "oss-local"
    return _doc(root)


def init_multipart(bucket: str, key: str, upload_id: str) -> bytes:
    root = ET.Element("InitiateMultipartUploadResult")
    _add(root, "Bucket", bucket)
    _add(root, "Key", key)
    _add(root, "UploadId", upload_id)
    return _doc(root)


def complete_multipart(bucket: str, key: str, etag: str, location: str) -> bytes:
    root = ET.Element("CompleteMultipartUploadResult")
    _add(root, "Location", location)
    _add(root, "Bucket", bucket)
    _add(root, "Key", key)
    _add(root, "ETag", f'"{etag}"')
    return _doc(root)


def list_parts(
    bucket: str, key: str, upload_id: str, parts: list[tuple[int, str, int]], marker: int, max_parts: int
) -> bytes:
    chosen = [p for p in parts if p[0] > marker]
    truncated = len(chosen) > max_parts
    chosen = chosen[:max_parts]
    root = ET.Element("ListPartsResult")
    _add(root, "Bucket", bucket)
    _add(root, "Key", key)
    _add(root, "UploadId", upload_id)
    _add(root, "PartNumberMarker", marker)
    _add(root, "NextPartNumberMarker", chosen[-1][0] if chosen else marker)
    _add(root, "MaxParts", max_parts)
    _add(root, "IsTruncated", "true" if truncated else "false")
    now = iso8601(time.time())
    for n, etag, size in chosen:
        p = _add(root, "Part")
        _add(p, "PartNumber", n)
        _add(p, "LastModified", now)
        _add(p, "ETag", f'"{etag}"')
        _add(p, "Size", size)
    return _doc(root)


def list_uploads(bucket: str, uploads: list[tuple[str, str, float]], url: bool) -> bytes:
    root = ET.Element("ListMultipartUploadsResult")
    _add(root, "Bucket", bucket)
    _add(root, "KeyMarker", "")
    _add(root, "UploadIdMarker", "")
    _add(root, "NextKeyMarker", "")
    _add(root, "NextUploadIdMarker", "")
    if url:
        _add(root, "EncodingType", "url")
    _add(root, "IsTruncated", "false")
    for key, uid, initiated in uploads:
        u = _add(root, "Upload")
        _add(u, "Key", _enc(key, url))
        _add(u, "UploadId", uid)
        _add(u, "Initiated", iso8601(initiated))
    return _doc(root)


def copy_result(meta: ObjectMeta) -> bytes:
    root = ET.Element("CopyObjectResult")
    _add(root, "ETag", f'"{meta.etag}"')
    _add(root, "LastModified", iso8601(meta.last_modified))
    return _doc(root)


def delete_result(keys: list[str], url: bool) -> bytes:
    root = ET.Element("DeleteResult")
    if url:
        _add(root, "EncodingType", "url")
    for k in keys:
        _add(_add(root, "Deleted"), "Key", _enc(k, url))
    return _doc(root)


def _parse(body: bytes, what: str) -> ET.Element:
    try:
        return ET.fromstring(body)
    except ET.ParseError as e:
        raise StoreError(400, "MalformedXML", f"the {what} XML is not well formed") from e


def parse_delete(body: bytes) -> tuple[list[str], bool]:
    """Keys and the Quiet flag of a DeleteMultipleObjects request."""
    root = _parse(body, "Delete")
    quiet = (root.findtext("Quiet") or "false").strip().lower() == "true"
    keys = [node.findtext("Key") or "" for node in root.findall("Object")]
    if len(keys) > 1000:
        raise StoreError(
            400, "MalformedXML", f"DeleteMultipleObjects takes at most 1000 keys, got {len(keys)}"
        )
    return keys, quiet


def parse_complete(body: bytes) -> list[tuple[int, str]]:
    """(part number, ETag) pairs of a CompleteMultipartUpload request."""
    root = _parse(body, "CompleteMultipartUpload")
    out = []
    for node in root.findall("Part"):
        number = node.findtext("PartNumber") or ""
        if not number.strip().isdigit():
            raise StoreError(400, "MalformedXML", f"PartNumber {number!r} is not a number")
        out.append((int(number), (node.findtext("ETag") or "").strip().strip('"')))
    return out
