"""oss:// for the data sources and the model repository: ossfs with the project's defaults.

The files source reads ``oss://bucket/prefix/...`` through fsspec; this module supplies what it
needs (registered in :mod:`kubeai_train.data.registry` as the ``oss`` storage-options provider):

* Endpoint and credentials from the environment (``OSS_ENDPOINT``,
  ``OSS_ACCESS_KEY_ID``, ``OSS_ACCESS_KEY_SECRET``, ``OSS_SESSION_TOKEN``); explicit storage
  options win. Secrets never appear in logs or errors.
* Exact byte ranges. ossfs opens files with fsspec's ``readahead`` cache, which reads every miss
  plus a 5 MiB block ahead: a projected Parquet read of a few column chunks fetches megabytes it
  never uses (for files of a few blocks, everything from the first selected column to the end).
  Here files open with no cache (``default_cache_type="none"``), so pyarrow's footer and
  column-chunk reads go to OSS as exactly those ranges.
* :class:`OSSFileSystem`, an ``ossfs.OSSFileSystem`` subclass, registered for the ``oss``
  protocol with fsspec when the provider first runs. It keeps ossfs and oss2 unmodified and fixes
  what breaks the above on a real OSS as much as on the local server: ossfs asks for ranges with
  an inclusive end (one byte too many: harmless under readahead, wrong data without a cache);
  transient failures (HTTP 5xx, connection resets, bodies cut short) are retried with
  exponential backoff, resuming a cut body at the first missing byte, where ossfs retries only
  connection errors, three times, at once; writable files in ``"wb"`` mode that flush more than
  once send a wrong append position (ossfs reuses the file's write position); ``exists`` on a
  missing bucket raises instead of returning False, and with bad credentials returns False
  (here: ``PermissionError``); a 403 becomes ``PermissionError``; ``find`` is one flat, fresh,
  paged listing instead of one cached listing per directory; a forked process (DataLoader
  worker) opens its own connections instead of sharing the parent's sockets.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from kubeai_train.data.types import DataError

__all__ = ["ENV_VARS", "OSSFileSystem", "install", "storage_options"]

log = logging.getLogger("kubeai_train.data")

ENV_VARS = ("OSS_ENDPOINT", "OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN")
_INSTALL_HINT = "reading oss:// needs ossfs: pip install 'kubeai_train[oss]'"
_READ_CHUNK = 1 << 20
_LIST_PAGE = 1000

try:
    import oss2
    import requests
    import urllib3.exceptions
    from oss2.models import SimplifiedObjectInfo
    from ossfs import OSSFileSystem as _OSSFileSystem
    from ossfs.file import OSSFile as _OSSFile
    from ossfs.utils import prettify_info_result
except ImportError as e:  # pragma: no cover - ossfs is an optional dependency
    raise ImportError(_INSTALL_HINT) from e


def storage_options(
    url: str | None = None, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Complete fsspec storage options for an ``oss://`` URL: explicit ones over the environment.

    Called by :func:`kubeai_train.data.registry.storage_options_for` as ``(url, explicit)``; also
    usable directly: ``fsspec.filesystem("oss", **storage_options())``.

    Returns:
        ``endpoint``, ``key``, ``secret`` (and ``token``) as ossfs names them, plus
        ``default_cache_type="none"`` unless given.

    Raises:
        DataError: no endpoint given and ``OSS_ENDPOINT`` is not set.
    """
    install()
    explicit = dict(storage_options or {})
    opts: dict[str, Any] = {}
    env = os.environ
    if env.get("OSS_ENDPOINT"):
        opts["endpoint"] = env["OSS_ENDPOINT"]
    if env.get("OSS_ACCESS_KEY_ID") and env.get("OSS_ACCESS_KEY_SECRET"):
        opts["key"] = env["OSS_ACCESS_KEY_ID"]
        opts["secret"] = env["OSS_ACCESS_KEY_SECRET"]
        if env.get("OSS_SESSION_TOKEN"):
            opts["token"] = env["OSS_SESSION_TOKEN"]
    opts["default_cache_type"] = "none"
    opts.update(explicit)
    if not opts.get("endpoint"):
        raise DataError(
            f"reading {url or 'oss://'} needs an OSS endpoint: set OSS_ENDPOINT "
            "(e.g. https://oss-cn-hangzhou.aliyuncs.com) or pass storage_options={'endpoint': ...}"
        )
    return opts


_install_lock = threading.Lock()
_installed = False


def install() -> None:
    """Make fsspec's ``oss`` protocol use :class:`OSSFileSystem` (idempotent).

    Our class is a subclass of ossfs's and takes the same arguments, so code that asks fsspec
    for ``oss://`` keeps working, with the fixes listed in the module docstring.
    """
    global _installed
    with _install_lock:
        if _installed:
            return
        import fsspec

        fsspec.register_implementation("oss", OSSFileSystem, clobber=True)
        _installed = True


def _is_transient(exc: BaseException) -> bool:
    """Worth retrying: 5xx answers, throttling, connection failures and bodies cut short."""
    if isinstance(exc, oss2.exceptions.RequestError):
        return True
    if isinstance(exc, oss2.exceptions.ServerError):
        return exc.status >= 500 or exc.status == 429
    return isinstance(
        exc,
        (
            requests.exceptions.ConnectionError,
            requests.exceptions.ChunkedEncodingError,
            requests.exceptions.Timeout,
            urllib3.exceptions.ProtocolError,
            urllib3.exceptions.ReadTimeoutError,
            ConnectionError,
            TimeoutError,
            _ShortRead,
        ),
    )


def _chunks(response: requests.Response) -> Iterator[bytes]:
    """The body of a streamed response as it arrives."""
    raw = response.raw
    read1 = getattr(raw, "read1", None)  # urllib3 >= 2
    if read1 is None:  # pragma: no cover - urllib3 1.x
        yield from response.iter_content(64 * 1024)
        return
    while True:
        chunk = read1(_READ_CHUNK)
        if not chunk:
            return
        yield chunk


class _ShortRead(OSError):
    """A response body ended before its Content-Length."""


def _translate(exc: BaseException, what: str) -> OSError:
    """The Python error for a failed OSS call, naming what failed but never a credential."""
    if isinstance(exc, oss2.exceptions.ServerError):
        code = exc.code or str(exc.status)
        message = f"{what}: OSS answered {exc.status} {code}: {exc.message} (request id {exc.request_id})"
        if exc.status == 404 or exc.code in ("NoSuchKey", "NoSuchBucket"):
            return FileNotFoundError(errno.ENOENT, message)
        if exc.status == 403:
            return PermissionError(
                errno.EACCES, message + "; check OSS_ACCESS_KEY_ID / OSS_ACCESS_KEY_SECRET"
            )
        return OSError(errno.EIO, message)
    if isinstance(exc, OSError) and not isinstance(exc, requests.exceptions.RequestException):
        return exc
    return OSError(errno.EIO, f"{what}: {type(exc).__name__}: {exc}")


class OSSFileSystem(_OSSFileSystem):
    """ossfs with exact ranges, retries with backoff, and the fixes of the module docstring.

    Args:
        retries: further attempts after the first on a transient failure (default 5).
        backoff: first sleep between attempts in seconds, doubled each time up to ``max_backoff``.
        max_backoff: cap of one sleep.
        **kwargs: as ``ossfs.OSSFileSystem`` (``endpoint``, ``key``, ``secret``, ``token``,
            ``default_cache_type``, ``default_block_size``, ...). Missing endpoint / credentials are
            read from the environment (``OSS_ENDPOINT``, ``OSS_ACCESS_KEY_ID``, ...).
    """

    def __init__(self, retries: int = 5, backoff: float = 0.1, max_backoff: float = 5.0, **kwargs: Any):
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
        if backoff < 0 or max_backoff < 0:
            raise ValueError(f"backoff and max_backoff must be >= 0, got {backoff!r}, {max_backoff!r}")
        env = os.environ
        if not kwargs.get("key") and env.get("OSS_ACCESS_KEY_ID") and env.get("OSS_ACCESS_KEY_SECRET"):
            kwargs["key"] = env["OSS_ACCESS_KEY_ID"]
            kwargs["secret"] = env["OSS_ACCESS_KEY_SECRET"]
            kwargs.setdefault("token", env.get("OSS_SESSION_TOKEN") or None)
        kwargs.setdefault("default_cache_type", "none")
        super().__init__(**kwargs)
        self._session_pid = os.getpid()
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff

    def _get_bucket(self, bucket_name: str, connect_timeout: int | None = None) -> oss2.Bucket:
        # A forked child (a DataLoader worker) must not share the parent's pooled connections:
        # two processes on one socket interleave their requests.
        if self._session_pid != os.getpid():
            self._session = oss2.Session()
            self._session_pid = os.getpid()
        return super()._get_bucket(bucket_name, connect_timeout)

    # ---------------------------------------------------------------- calls with retries
    def _sleep(self, attempt: int) -> None:
        time.sleep(min(self.max_backoff, self.backoff * (2**attempt)))

    def _call_oss(
        self,
        method_name: str,
        *args: Any,
        bucket: str | None = None,
        timeout: int | None = None,
        retry: int | None = None,
        **kwargs: Any,
    ) -> Any:
        what = f"OSS {method_name}" + (f" on bucket {bucket!r}" if bucket else "")
        attempt = 0
        while True:
            try:
                service = (
                    self._get_bucket(bucket, timeout)
                    if bucket
                    else oss2.Service(self._auth, endpoint=self._endpoint, connect_timeout=timeout)
                )
                method = getattr(service, method_name, None)
                if method is None:
                    return getattr(oss2, method_name)(service, *args, **kwargs)
                return method(*args, **kwargs)
            except Exception as e:
                if not _is_transient(e) or attempt >= self.retries:
                    raise _translate(
                        e, what if attempt == 0 else f"{what} (after {attempt + 1} attempts)"
                    ) from e
                log.debug(
                    "transient OSS error in %s (%s); retry %d/%d",
                    method_name,
                    type(e).__name__,
                    attempt + 1,
                    self.retries,
                )
                self._sleep(attempt)
                attempt += 1

    def _read_range(self, path: str, start: int, end: int | None) -> bytes:
        """Bytes [start, end) of an object (to its end if ``end`` is None), retried and resumed.

        A body cut short (reset, truncation) is resumed from the first byte not yet received, so
        a retry never fetches twice what already arrived.
        """
        bucket, key = self.split_path(path)
        what = f"reading oss://{bucket}/{key}"
        parts: list[bytes] = []
        got = 0
        attempt = 0
        headers = {"x-oss-range-behavior": "standard"}
        while True:
            pos = start + got
            if end is not None and pos >= end:
                break
            try:
                oss_bucket = self._get_bucket(bucket)
                # oss2's byte_range is inclusive at both ends.
                result = oss_bucket.get_object(
                    key, byte_range=(pos, None if end is None else end - 1), headers=headers
                )
                expected = result.content_length
                received = 0
                try:
                    # Whatever has arrived, chunk by chunk, so that what came before a reset is kept
                    # (a plain read of N bytes drops a partial N when the connection breaks).
                    for chunk in _chunks(result.resp.response):
                        parts.append(chunk)
                        got += len(chunk)
                        received += len(chunk)
                except BaseException:
                    result.close()
                    raise
                if expected is not None and received < expected:
                    raise _ShortRead(errno.EIO, f"{what}: body ended after {received} of {expected} bytes")
                break
            except oss2.exceptions.ServerError as e:
                if e.status == 416 and end is None:
                    break  # reading from the end of the object: nothing left
                if not _is_transient(e) or attempt >= self.retries:
                    raise _translate(
                        e, what if attempt == 0 else f"{what} (after {attempt + 1} attempts)"
                    ) from e
            except Exception as e:
                if not _is_transient(e) or attempt >= self.retries:
                    raise _translate(e, f"{what} (after {attempt + 1} attempts)") from e
            log.debug(
                "transient OSS error %s; resuming at byte %d, retry %d/%d",
                what,
                start + got,
                attempt + 1,
                self.retries,
            )
            self._sleep(attempt)
            attempt += 1
        return b"".join(parts)

    # ---------------------------------------------------------------- reads
    def get_object(self, path: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of ``path`` (end exclusive, as fsspec's files ask)."""
        if end <= start:
            return b""
        return self._read_range(path, start, end)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        """Bytes [start, end) of ``path``, fsspec semantics (None = edge, negative = from the end)."""
        if (start is not None and start < 0) or (end is not None and end < 0):
            size = self.size(path)
            if start is not None and start < 0:
                start = max(size + start, 0)
            if end is not None and end < 0:
                end = max(size + end, 0)
        start = start or 0
        if end is not None and end <= start:
            return b""
        return self._read_range(path, start, end)

    # ---------------------------------------------------------------- listings
    def invalidate_cache(self, path: str | None = None) -> None:
        """Forget cached listings of ``path``, its parents and everything below it.

        ossfs forgets only the path and its parents, so a ``find`` (which lists directory by
        directory) could serve a sub-directory listed before other processes wrote into it.
        """
        super().invalidate_cache(path)
        if path is not None:
            norm = self._strip_protocol(path).strip("/")
            for cached in [k for k in list(self.dircache) if k.startswith(norm + "/")]:
                self.dircache.pop(cached, None)

    def _get_object_info_list(
        self, bucket_name: str, prefix: str, delimiter: str, connect_timeout: int | None
    ) -> list[dict[str, Any]]:
        """A whole listing, page by page (1000 keys a page), each page retried with backoff.

        ossfs iterates ``oss2.ObjectIterator`` (100 keys a page, 5xx retried three times at once,
        connection errors not at all); a failure mid-listing lost the whole listing.
        """
        out: list[dict[str, Any]] = []
        marker = ""
        while True:
            page = self._call_oss(
                "list_objects",
                prefix=prefix,
                delimiter=delimiter,
                marker=marker,
                max_keys=_LIST_PAGE,
                bucket=bucket_name,
                timeout=connect_timeout,
            )
            out.extend(self._transfer_object_info_to_dict(bucket_name, obj) for obj in page.object_list)
            out.extend(
                self._transfer_object_info_to_dict(
                    bucket_name, SimplifiedObjectInfo(p, None, None, None, None, None)
                )
                for p in page.prefix_list
            )
            if not page.is_truncated:
                return out
            marker = page.next_marker

    @prettify_info_result
    def find(
        self,
        path: str,
        maxdepth: int | None = None,
        withdirs: bool = False,
        detail: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Every file under ``path``, from one flat paged listing (never cached).

        ossfs walks directory by directory (a listing per directory, each cached); a flat
        listing of the prefix is one paged request stream however deep the tree, and always
        fresh. With ``maxdepth``, ``withdirs`` or ``prefix`` this is ossfs's ``find``.
        """
        if maxdepth is not None or withdirs or kwargs.get("prefix"):
            return super().find(path, maxdepth=maxdepth, withdirs=withdirs, detail=True, **kwargs)
        norm = self._verify_find_arguments(path, maxdepth, withdirs, "").strip("/")
        bucket, key = self.split_path(norm)
        prefix = key.rstrip("/") + "/" if key else ""
        entries = self._get_object_info_list(bucket, prefix, "", kwargs.get("connect_timeout"))
        out = {e["name"]: e for e in entries if e["type"] == "file"}
        if not out and key and self.isfile(norm):
            out[norm] = self.info(norm)
        return {name: out[name] for name in sorted(out)}

    def _bucket_exist(self, bucket_name: str) -> bool:
        # ossfs answers False for any error, so bad credentials read as "no such file".
        if not bucket_name:
            return False
        try:
            self._call_oss("get_bucket_info", bucket=bucket_name)
        except FileNotFoundError:
            return False
        return True

    def exists(self, path: str, **kwargs: Any) -> bool:
        try:
            return bool(super().exists(path, **kwargs))
        except FileNotFoundError:
            return False  # ossfs raises when the bucket itself is missing

    # ---------------------------------------------------------------- writes
    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> _OSSFile:
        cache_type = kwargs.pop("cache_type", self._default_cache_type)
        return _AppendingFile(
            self,
            path,
            mode,
            block_size,
            autocommit,
            cache_options=cache_options,
            cache_type=cache_type,
            **kwargs,
        )


class _AppendingFile(_OSSFile):
    """ossfs's file with its own append position (ossfs reuses ``loc``, the write position, for it)."""

    _next_append: int = 0
    loc: int

    def _initiate_upload(self) -> None:
        written = self.loc  # bytes written to the buffer so far
        super()._initiate_upload()  # sets loc to where appending starts: 0, or the size in "ab"
        self._next_append = self.loc
        self.loc = self._next_append + written

    def _upload_chunk(self, final: bool = False) -> bool:
        self._next_append = self.fs.append_object(self.path, self._next_append, self.buffer.getvalue())
        return True
