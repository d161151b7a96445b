"""The optional dependencies of the odps:// source, imported once with the install hint: every
module of the package takes them from here, so a missing pyodps fails in one place, one line."""

from __future__ import annotations

try:
    import crc32c as _crc32c  # hardware CRC32C (SSE4.2 / ARMv8) that accepts memoryviews
    import odps as _odps  # noqa: F401  (fail early with the install hint)
    import requests
    import urllib3
    from odps import ODPS
    from odps import errors as odps_errors
    from odps.tunnel import TableTunnel
    from odps.tunnel.io.stream import CompressOption
    from odps.tunnel.io.types import odps_type_to_arrow_type
except ImportError as _e:  # pragma: no cover - exercised only without the extra
    raise ImportError("reading odps:// needs pyodps: pip install 'kubeai_train[odps]'") from _e

__all__ = [
    "ODPS",
    "CompressOption",
    "TableTunnel",
    "crc32c",
    "odps_errors",
    "odps_type_to_arrow_type",
    "requests",
    "urllib3",
]

crc32c = _crc32c.crc32c
