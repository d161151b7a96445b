"""Plug-ins by URL scheme: which :class:`~kubeai_train.data.types.Source` reads a URL, and which
function supplies default fsspec ``storage_options`` for a scheme.

Entries name their target as ``"module:attr"`` and are imported only when a URL with that
scheme is opened, so optional dependencies (pyodps, ossfs) are needed only by those who read
``odps://`` or ``oss://``; a missing one raises :class:`SourceUnavailableError` carrying the
entry's install hint. Everything without a registered source scheme (local paths, ``file://``,
``memory://``, ``s3://``, ``oss://``, ``hdfs://``, ...) is read by the files source through
fsspec.

A storage-options provider is called as ``provider(url, storage_options) -> dict``: it gets
the caller's explicit options and returns the complete options to give fsspec (explicit ones
win over whatever it fills in from the environment).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kubeai_train.data.types import DataError, Source, SourceUnavailableError

__all__ = [
    "DEFAULT_SOURCE",
    "open_source",
    "register_source",
    "register_storage_options",
    "scheme_of",
    "source_factory",
    "storage_options_for",
]

DEFAULT_SOURCE = "kubeai_train.data.files:FileSource"


@dataclass(frozen=True)
class _Entry:
    target: str | Callable[..., Any]
    install_hint: str


_lock = threading.Lock()
_sources: dict[str, _Entry] = {}
_storage: dict[str, _Entry] = {}


def scheme_of(url: str) -> str:
    """The URL scheme, lower-cased; ``"file"`` for plain paths (also Windows drive letters)."""
    head, sep, _ = url.partition("://")
    if not sep or len(head) == 1 or not head.replace("+", "").replace("-", "").replace(".", "").isalnum():
        return "file"
    return head.lower()


def _check_scheme(scheme: str) -> str:
    if not isinstance(scheme, str) or not scheme or "://" in scheme:
        raise ValueError(f"scheme must be a bare URL scheme like 'odps', got {scheme!r}")
    return scheme.lower()


def register_source(scheme: str, target: str | Callable[..., Source], install_hint: str = "") -> None:
    """Register the source for ``scheme://`` URLs (replacing any earlier entry).

    Args:
        scheme: e.g. ``"odps"``.
        target: a ``Source`` subclass / factory called as ``target(url, **options)``, or its
            ``"module:attr"`` name, imported on first use.
        install_hint: what to tell a user whose import of ``target`` fails, e.g.
            ``"reading odps:// needs pyodps: pip install 'kubeai_train[odps]'"``.
    """
    with _lock:
        _sources[_check_scheme(scheme)] = _Entry(target, install_hint)


def register_storage_options(
    scheme: str, target: str | Callable[..., dict[str, Any]], install_hint: str = ""
) -> None:
    """Register the provider of default fsspec storage options for ``scheme://`` URLs.

    ``target`` (or its ``"module:attr"`` name) is called as ``target(url, storage_options)``
    with the caller's explicit options and returns the complete dict to pass to fsspec.
    """
    with _lock:
        _storage[_check_scheme(scheme)] = _Entry(target, install_hint)


def _resolve(entry: _Entry, what: str) -> Callable[..., Any]:
    if callable(entry.target):
        return entry.target
    module, _, attr = entry.target.partition(":")
    hint = entry.install_hint or f"{entry.target} could not be imported"
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise SourceUnavailableError(f"{hint} ({what}: {type(e).__name__}: {e})") from e
    try:
        return getattr(mod, attr)  # type: ignore[no-any-return]
    except AttributeError as e:
        raise SourceUnavailableError(f"{hint} ({what}: {module} has no {attr!r})") from e


def source_factory(url: str) -> Callable[..., Source]:
    """The callable that constructs the source for ``url`` (imports it if needed).

    Raises:
        SourceUnavailableError: the registered module cannot be imported (carries the hint).
    """
    scheme = scheme_of(url)
    with _lock:
        entry = _sources.get(scheme)
    if entry is None:
        entry = _Entry(DEFAULT_SOURCE, f"reading {scheme}:// needs the files source (pyarrow, fsspec)")
    return _resolve(entry, f"source for {scheme}://")


def open_source(source: str | Source, **options: Any) -> Source:
    """A :class:`Source` for ``source``: returned as is if it already is one, else constructed
    by the registered factory as ``factory(url, **options)``.

    Raises:
        SourceUnavailableError: no importable source for the scheme.
        DataError: the source rejected the URL or options (its own subclasses, see types).
        ValueError: an option the source does not accept (named, with the accepted ones).
    """
    if isinstance(source, Source):
        if options:
            raise ValueError(
                f"options {sorted(options)} cannot be applied to an already constructed {type(source).__name__}; "
                "pass them to its constructor"
            )
        return source
    if hasattr(source, "__fspath__"):
        source = source.__fspath__()  # type: ignore[union-attr]
    if not isinstance(source, str) or not source:
        raise ValueError(f"source must be a path, URL or Source, got {source!r}")
    factory = source_factory(source)
    try:
        return factory(source, **options)  # type: ignore[no-any-return]
    except TypeError as e:
        if isinstance(e, DataError):
            raise
        # an unexpected keyword: name it rather than showing a constructor traceback
        raise ValueError(
            f"{getattr(factory, '__name__', factory)} rejected the options for {source!r}: {e}"
        ) from e


def storage_options_for(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Complete fsspec storage options for ``url``: the scheme's provider's defaults (from the
    environment, say) under the caller's explicit ``storage_options``. Without a provider, the
    explicit options as they are.
    """
    explicit = dict(storage_options or {})
    scheme = scheme_of(url)
    with _lock:
        entry = _storage.get(scheme)
    if entry is None:
        return explicit
    provider = _resolve(entry, f"storage options for {scheme}://")
    merged = provider(url, explicit)
    if not isinstance(merged, Mapping):
        raise DataError(
            f"storage options provider for {scheme}:// returned {type(merged).__name__}, not a dict"
        )
    out = dict(merged)
    out.update(explicit)  # explicit arguments win over the environment
    return out


register_source(
    "odps",
    "kubeai_train.data.odps:OdpsSource",
    "reading odps:// needs pyodps: pip install 'kubeai_train[odps]'",
)
register_storage_options(
    "oss",
    "kubeai_train.data.oss:storage_options",
    "reading oss:// needs ossfs: pip install 'kubeai_train[oss]'",
)
