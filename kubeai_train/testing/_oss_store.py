"""The object store behind the local OSS server: buckets and objects kept as plain files.

An object ``<bucket>/<key>`` lives at ``ROOT/<bucket>/<key>``, so a directory of Parquet files can be
served as-is (offline development) and whatever the clients write can be inspected with ``ls``.
Writes go to ``ROOT/.oss-tmp/`` first and are renamed into place, so a reader never sees a partial
object. Multipart parts wait in ``ROOT/.oss-uploads/<upload id>/``. Neither name can clash with a
bucket (bucket names never start with a dot). A key ending in ``/`` (a "directory" placeholder) is
kept as the file ``DIR_MARKER`` inside that directory.

Limits of the on-disk layout, reported as clear errors rather than silently diverging from OSS:
a key cannot be both an object and a prefix of other keys (``a/b`` and ``a/b/c``), and keys with
empty, ``.`` or ``..`` path segments are refused.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

DIR_MARKER = ".oss-dir-marker"
_TMP = ".oss-tmp"
_UPLOADS = ".oss-uploads"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
_COPY_CHUNK = 1 << 20


class StoreError(Exception):
    """An OSS error to send back: HTTP status, OSS error code and message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def __reduce__(self):
        return (type(self), (self.status, self.code, self.message, self.headers))


def _crc64_factory():
    """A CRC-64/ECMA (OSS's x-oss-hash-crc64ecma) updater, or None without crcmod."""
    try:
        import crcmod  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - crcmod comes with oss2
        return None
    return lambda: crcmod.Crc(0x142F0E1EBA9EA3693, initCrc=0, rev=True, xorOut=0xFFFFFFFFFFFFFFFF)


_new_crc = _crc64_factory()


class Digest:
    """MD5 and CRC-64/ECMA of a byte stream, updated chunk by chunk."""

    def __init__(self) -> None:
        self._md5 = hashlib.md5()
        self._crc = _new_crc() if _new_crc is not None else None

    def update(self, data: bytes) -> None:
        self._md5.update(data)
        if self._crc is not None:
            self._crc.update(data)

    @property
    def etag(self) -> str:
        return self._md5.hexdigest().upper()

    @property
    def md5_b64(self) -> str:
        return base64.b64encode(self._md5.digest()).decode()

    @property
    def crc(self) -> int | None:
        return self._crc.crcValue if self._crc is not None else None


@dataclass
class ObjectMeta:
    """What OSS reports about an object besides its bytes."""

    size: int
    mtime_ns: int
    etag: str
    object_type: str = "Normal"
    content_type: str = "application/octet-stream"
    crc: int | None = None
    user_meta: dict[str, str] = field(default_factory=dict)

    @property
    def last_modified(self) -> float:
        return self.mtime_ns / 1e9


@dataclass
class _Upload:
    bucket: str
    key: str
    content_type: str
    user_meta: dict[str, str]
    initiated: float
    parts: dict[int, tuple[str, int, int | None]] = field(default_factory=dict)  # n -> etag, size, crc


def check_key(key: str) -> None:
    """Raise StoreError unless ``key`` can be kept as a file path."""
    if not key:
        raise StoreError(400, "InvalidObjectName", "object key is empty")
    if len(key.encode()) > 1023:
        raise StoreError(400, "InvalidObjectName", "object key is longer than 1023 bytes")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise StoreError(
            400, "InvalidObjectName", f"object key {key!r} may not start with '/' nor hold '\\' or NUL"
        )
    parts = key.rstrip("/").split("/") if key.endswith("/") else key.split("/")
    for part in parts:
        if part in ("", ".", "..") or part == DIR_MARKER:
            raise StoreError(
                400,
                "InvalidObjectName",
                f"object key {key!r} has an empty, '.', '..' or reserved path segment; "
                "the local OSS server keeps keys as file paths",
            )


class ObjectStore:
    """Buckets and objects under one root directory; safe to use from many threads."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = os.path.abspath(os.fspath(root))
        os.makedirs(os.path.join(self.root, _TMP), exist_ok=True)
        os.makedirs(os.path.join(self.root, _UPLOADS), exist_ok=True)
        self._lock = threading.RLock()
        self._meta: dict[str, ObjectMeta] = {}
        self._uploads: dict[str, _Upload] = {}
        self._key_locks: dict[str, threading.Lock] = {}

    # ------------------------------------------------------------------ buckets
    def _bucket_dir(self, bucket: str) -> str:
        return os.path.join(self.root, bucket)

    def create_bucket(self, bucket: str) -> None:
        if not _BUCKET_RE.match(bucket):
            raise StoreError(400, "InvalidBucketName", f"bucket name {bucket!r} is not valid")
        os.makedirs(self._bucket_dir(bucket), exist_ok=True)

    def require_bucket(self, bucket: str) -> str:
        path = self._bucket_dir(bucket)
        if not _BUCKET_RE.match(bucket) or not os.path.isdir(path):
            raise StoreError(404, "NoSuchBucket", f"the bucket {bucket!r} does not exist")
        return path

    def buckets(self) -> list[tuple[str, float]]:
        out = []
        for name in sorted(os.listdir(self.root)):
            path = os.path.join(self.root, name)
            if _BUCKET_RE.match(name) and os.path.isdir(path):
                out.append((name, os.stat(path).st_mtime))
        return out

    def delete_bucket(self, bucket: str) -> None:
        path = self.require_bucket(bucket)
        if any(True for _ in self._walk(path, "")):
            raise StoreError(409, "BucketNotEmpty", f"the bucket {bucket!r} is not empty")
        shutil.rmtree(path)

    # ------------------------------------------------------------------ objects
    def _path(self, bucket: str, key: str) -> str:
        check_key(key)
        base = self.require_bucket(bucket)
        if key.endswith("/"):
            return os.path.join(base, *key.rstrip("/").split("/"), DIR_MARKER)
        return os.path.join(base, *key.split("/"))

    def _key_lock(self, bucket: str, key: str) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(f"{bucket}/{key}", threading.Lock())

    def head(self, bucket: str, key: str, need_crc: bool = False) -> tuple[str, ObjectMeta]:
        """Path and metadata of an object; raises StoreError(404 NoSuchKey) if there is none."""
        path = self._path(bucket, key)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        if st is None or not os.path.isfile(path):
            raise StoreError(404, "NoSuchKey", f"the object {key!r} does not exist in bucket {bucket!r}")
        ident = f"{bucket}/{key}"
        with self._lock:
            meta = self._meta.get(ident)
            if meta is None or meta.size != st.st_size or meta.mtime_ns != st.st_mtime_ns:
                # A file put there by hand (offline mode) or changed behind our back: a cheap ETag
                # that changes with the file; the CRC is computed when a response needs it.
                tag = hashlib.md5(f"{st.st_size}-{st.st_mtime_ns}".encode()).hexdigest().upper()
                meta = ObjectMeta(size=st.st_size, mtime_ns=st.st_mtime_ns, etag=tag)
                meta.content_type = _guess_type(key)
                self._meta[ident] = meta
        if need_crc and meta.crc is None and _new_crc is not None:
            digest = Digest()
            with open(path, "rb") as f:
                while chunk := f.read(_COPY_CHUNK):
                    digest.update(chunk)
            meta.crc = digest.crc
        return path, meta

    def _commit(self, bucket: str, key: str, tmp: str, meta_fields: dict) -> ObjectMeta:
        path = self._path(bucket, key)
        parent = os.path.dirname(path)
        try:
            os.makedirs(parent, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as e:
            os.unlink(tmp)
            raise StoreError(
                409,
                "ObjectConflict",
                f"cannot store {key!r}: a parent of it is an object; the local OSS server keeps keys as "
                "files, so a key cannot also be a prefix of other keys",
            ) from e
        if os.path.isdir(path):
            os.unlink(tmp)
            raise StoreError(
                409,
                "ObjectConflict",
                f"cannot store {key!r}: other keys use it as a prefix; the local OSS server keeps keys as files",
            )
        os.replace(tmp, path)
        st = os.stat(path)
        meta = ObjectMeta(size=st.st_size, mtime_ns=st.st_mtime_ns, **meta_fields)
        with self._lock:
            self._meta[f"{bucket}/{key}"] = meta
        return meta

    def _tmpfile(self):
        fd, tmp = tempfile.mkstemp(dir=os.path.join(self.root, _TMP))
        return os.fdopen(fd, "wb"), tmp

    def put(
        self,
        bucket: str,
        key: str,
        chunks: Iterator[bytes],
        content_type: str | None = None,
        user_meta: dict[str, str] | None = None,
        content_md5: str | None = None,
    ) -> ObjectMeta:
        """Store an object from a stream of chunks, atomically."""
        self._path(bucket, key)  # validate before reading the body
        digest = Digest()
        f, tmp = self._tmpfile()
        try:
            with f:
                for chunk in chunks:
                    digest.update(chunk)
                    f.write(chunk)
        except BaseException:
            os.unlink(tmp)
            raise
        if content_md5 is not None and content_md5 != digest.md5_b64:
            os.unlink(tmp)
            raise StoreError(
                400, "InvalidDigest", "the Content-MD5 you specified did not match what was received"
            )
        with self._key_lock(bucket, key):
            return self._commit(
                bucket,
                key,
                tmp,
                {
                    "etag": digest.etag,
                    "crc": digest.crc,
                    "content_type": content_type or _guess_type(key),
                    "user_meta": dict(user_meta or {}),
                },
            )

    def append(
        self, bucket: str, key: str, position: int, chunks: Iterator[bytes], content_type: str | None = None
    ) -> ObjectMeta:
        """AppendObject: add bytes at ``position``, which must equal the current length."""
        path = self._path(bucket, key)
        with self._key_lock(bucket, key):
            try:
                _, meta = self.head(bucket, key)
            except StoreError:
                meta = None
            if meta is not None and meta.object_type != "Appendable":
                raise StoreError(409, "ObjectNotAppendable", f"the object {key!r} is not appendable")
            current = meta.size if meta is not None else 0
            if position != current:
                raise StoreError(
                    409,
                    "PositionNotEqualToLength",
                    f"position {position} is not equal to the length {current} of {key!r}",
                    {"x-oss-next-append-position": str(current)},
                )
            body = b"".join(chunks)
            if meta is None:
                f, tmp = self._tmpfile()
                with f:
                    f.write(body)
                digest = Digest()
                digest.update(body)
                return self._commit(
                    bucket,
                    key,
                    tmp,
                    {
                        "etag": digest.etag,
                        "crc": digest.crc,
                        "object_type": "Appendable",
                        "content_type": content_type or _guess_type(key),
                    },
                )
            with open(path, "ab") as f:
                f.write(body)
            crc = None
            if meta.crc is not None and _new_crc is not None:
                c = _new_crc()
                c.crcValue = meta.crc  # continue the running CRC over the appended bytes
                c.update(body)
                crc = c.crcValue
            st = os.stat(path)
            new = ObjectMeta(
                size=st.st_size,
                mtime_ns=st.st_mtime_ns,
                etag=hashlib.md5(f"{st.st_size}-{st.st_mtime_ns}".encode()).hexdigest().upper(),
                object_type="Appendable",
                content_type=meta.content_type,
                crc=crc,
            )
            with self._lock:
                self._meta[f"{bucket}/{key}"] = new
            return new

    def delete(self, bucket: str, key: str) -> None:
        """Delete an object; deleting a missing key succeeds, as on OSS."""
        path = self._path(bucket, key)
        with self._key_lock(bucket, key):
            try:
                if os.path.isfile(path):
                    os.unlink(path)
            except FileNotFoundError:
                pass
            with self._lock:
                self._meta.pop(f"{bucket}/{key}", None)
            self._prune_dirs(bucket, os.path.dirname(path))

    def _prune_dirs(self, bucket: str, directory: str) -> None:
        """Remove directories emptied by a delete, so prefixes disappear as they do on OSS."""
        base = self._bucket_dir(bucket)
        while os.path.abspath(directory) != os.path.abspath(base):
            try:
                os.rmdir(directory)
            except OSError:
                return
            directory = os.path.dirname(directory)

    def copy(
        self,
        src_bucket: str,
        src_key: str,
        bucket: str,
        key: str,
        meta_directive: str | None,
        content_type: str | None,
        user_meta: dict[str, str],
    ) -> ObjectMeta:
        src_path, src_meta = self.head(src_bucket, src_key, need_crc=True)
        self._path(bucket, key)
        f, tmp = self._tmpfile()
        with f, open(src_path, "rb") as src:
            shutil.copyfileobj(src, f, _COPY_CHUNK)
        replace = (meta_directive or "").upper() == "REPLACE"
        with self._key_lock(bucket, key):
            return self._commit(
                bucket,
                key,
                tmp,
                {
                    "etag": src_meta.etag,
                    "crc": src_meta.crc,
                    "object_type": "Normal" if src_meta.object_type == "Appendable" else src_meta.object_type,
                    "content_type": (content_type or src_meta.content_type)
                    if replace
                    else src_meta.content_type,
                    "user_meta": dict(user_meta) if replace else dict(src_meta.user_meta),
                },
            )

    # ------------------------------------------------------------------ listing
    @staticmethod
    def _entries(directory: str, key_prefix: str) -> list[tuple[str, str | None]]:
        """(key or key prefix, sub-directory or None) of one directory, in OSS key order."""
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return []
        items: list[tuple[bytes, str, str | None]] = []
        for entry in entries:
            if entry.name == DIR_MARKER:
                items.append((key_prefix.encode(), key_prefix, None))
            elif entry.is_dir():
                sub = key_prefix + entry.name + "/"
                items.append((sub.encode(), sub, entry.path))
            else:
                k = key_prefix + entry.name
                items.append((k.encode(), k, None))
        # A directory sorts as "name/": every key below it sorts right there, so a depth-first walk in
        # this order yields all keys sorted (OSS order: bytes of the UTF-8 keys).
        items.sort(key=lambda t: t[0])
        return [(k, d) for _, k, d in items]

    def _walk(self, directory: str, key_prefix: str) -> Iterator[str]:
        """Keys under ``directory`` in OSS order."""
        for k, sub_dir in self._entries(directory, key_prefix):
            if sub_dir is None:
                yield k
            else:
                yield from self._walk(sub_dir, k)

    def list_page(
        self, bucket: str, prefix: str, delimiter: str, marker: str, max_keys: int
    ) -> tuple[list[tuple[str, ObjectMeta]], list[str], bool, str]:
        """One page: (objects, common prefixes, truncated, next marker)."""
        base = self.require_bucket(bucket)
        # Start at the deepest directory the prefix names; keys outside it cannot match.
        dir_part = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
        start_dir = os.path.join(base, *[p for p in dir_part.split("/") if p]) if dir_part else base
        if dir_part and any(p in ("", ".", "..") for p in dir_part.rstrip("/").split("/")):
            return [], [], False, ""
        objects: list[tuple[str, ObjectMeta]] = []
        prefixes: list[str] = []
        truncated = False
        last = ""
        for key in self._walk_pruned(start_dir, dir_part, prefix, delimiter, marker):
            if not key.startswith(prefix):
                continue
            common = None
            if delimiter:
                idx = key.find(delimiter, len(prefix))
                if idx >= 0:
                    common = key[: idx + len(delimiter)]
            entry = common if common is not None else key
            if entry <= marker or (common is not None and prefixes and prefixes[-1] == common):
                continue
            if len(objects) + len(prefixes) >= max_keys:
                truncated = True
                break
            if common is not None:
                prefixes.append(common)
            else:
                try:
                    _, meta = self.head(bucket, key)
                except StoreError:
                    continue  # deleted while listing
                objects.append((key, meta))
            last = entry
        return objects, prefixes, truncated, last if truncated else ""

    def _walk_pruned(
        self, directory: str, key_prefix: str, prefix: str, delimiter: str, marker: str
    ) -> Iterator[str]:
        """``_walk`` that skips whole directories the page cannot contain."""
        for k, sub_dir in self._entries(directory, key_prefix):
            if sub_dir is None:
                yield k
                continue
            if not (k.startswith(prefix) or prefix.startswith(k)):
                continue
            if k < marker and not marker.startswith(k):
                continue  # every key below sorts before the marker
            if delimiter and k.startswith(prefix) and delimiter in k[len(prefix) :]:
                # Every key below rolls up into one common prefix: one key stands for them all.
                first = next(self._walk(sub_dir, k), None)
                if first is not None:
                    yield first
                continue
            yield from self._walk_pruned(sub_dir, k, prefix, delimiter, marker)

    # ------------------------------------------------------------------ multipart
    def init_upload(self, bucket: str, key: str, content_type: str | None, user_meta: dict[str, str]) -> str:
        self._path(bucket, key)
        upload_id = uuid.uuid4().hex.upper()
        os.makedirs(os.path.join(self.root, _UPLOADS, upload_id))
        with self._lock:
            self._uploads[upload_id] = _Upload(
                bucket, key, content_type or _guess_type(key), dict(user_meta), time.time()
            )
        return upload_id

    def _upload(self, bucket: str, key: str, upload_id: str) -> _Upload:
        with self._lock:
            up = self._uploads.get(upload_id)
        if up is None or up.bucket != bucket or up.key != key:
            raise StoreError(404, "NoSuchUpload", f"the multipart upload {upload_id!r} does not exist")
        return up

    def upload_part(
        self, bucket: str, key: str, upload_id: str, number: int, chunks: Iterator[bytes]
    ) -> tuple[str, int | None]:
        up = self._upload(bucket, key, upload_id)
        if not 1 <= number <= 10000:
            raise StoreError(400, "InvalidArgument", f"part number {number} is not in 1..10000")
        digest = Digest()
        size = 0
        part_path = os.path.join(self.root, _UPLOADS, upload_id, str(number))
        tmp = part_path + f".{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            for chunk in chunks:
                digest.update(chunk)
                f.write(chunk)
                size += len(chunk)
        os.replace(tmp, part_path)
        with self._lock:
            up.parts[number] = (digest.etag, size, digest.crc)
        return digest.etag, digest.crc

    def list_parts(self, bucket: str, key: str, upload_id: str) -> list[tuple[int, str, int]]:
        up = self._upload(bucket, key, upload_id)
        with self._lock:
            return [(n, e, s) for n, (e, s, _) in sorted(up.parts.items())]

    def complete_upload(
        self, bucket: str, key: str, upload_id: str, parts: list[tuple[int, str]]
    ) -> ObjectMeta:
        up = self._upload(bucket, key, upload_id)
        with self._lock:
            known = dict(up.parts)
        if not parts:
            raise StoreError(400, "MalformedXML", "CompleteMultipartUpload lists no parts")
        numbers = [n for n, _ in parts]
        if numbers != sorted(set(numbers)):
            raise StoreError(400, "InvalidPartOrder", "parts must be listed in ascending order, once each")
        for n, etag in parts:
            if n not in known or known[n][0] != etag.strip('"').upper():
                raise StoreError(400, "InvalidPart", f"part {n} was not uploaded or its ETag does not match")
        for n, _ in parts[:-1]:
            if known[n][1] < 100 * 1024:
                raise StoreError(400, "EntityTooSmall", f"part {n} is smaller than the 100 KiB minimum")
        digest = Digest()
        md5s = hashlib.md5()
        f, tmp = self._tmpfile()
        with f:
            for n, _ in parts:
                md5s.update(bytes.fromhex(known[n][0]))
                with open(os.path.join(self.root, _UPLOADS, upload_id, str(n)), "rb") as part:
                    while chunk := part.read(_COPY_CHUNK):
                        digest.update(chunk)
                        f.write(chunk)
        with self._key_lock(bucket, key):
            meta = self._commit(
                bucket,
                key,
                tmp,
                {
                    "etag": f"{md5s.hexdigest().upper()}-{len(parts)}",
                    "crc": digest.crc,
                    "object_type": "Multipart",
                    "content_type": up.content_type,
                    "user_meta": up.user_meta,
                },
            )
        self.abort_upload(bucket, key, upload_id)
        return meta

    def abort_upload(self, bucket: str, key: str, upload_id: str) -> None:
        self._upload(bucket, key, upload_id)
        with self._lock:
            self._uploads.pop(upload_id, None)
        shutil.rmtree(os.path.join(self.root, _UPLOADS, upload_id), ignore_errors=True)

    def uploads(self, bucket: str, prefix: str = "") -> list[tuple[str, str, float]]:
        with self._lock:
            return sorted(
                (u.key, uid, u.initiated)
                for uid, u in self._uploads.items()
                if u.bucket == bucket and u.key.startswith(prefix)
            )


_TYPES = {
    ".parquet": "application/octet-stream",
    ".json": "application/json",
    ".txt": "text/plain",
    ".csv": "text/csv",
    ".html": "text/html",
    ".xml": "application/xml",
}


def _guess_type(key: str) -> str:
    ext = os.path.splitext(key)[1].lower()
    return _TYPES.get(ext, "application/octet-stream")
