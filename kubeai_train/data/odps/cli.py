"""Job-wide download sessions: :func:`create_sessions` and
``python -m kubeai_train.data.odps sessions URL``, which prints the ``export`` line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kubeai_train.data.odps.source import OdpsSource
from kubeai_train.data.odps.types import SESSIONS_ENV
from kubeai_train.data.types import DataError

__all__ = ["create_sessions", "main"]


def create_sessions(url: str, **options: Any) -> dict[str, str]:
    """Create (or reuse) the download sessions of ``url`` once, for a whole job.

    Returns ``{"<project>.<table>[/<spec>]": download id}``; give it to every process as
    ``KUBEAI_ODPS_SESSIONS=<json>`` (or the ``sessions=`` option) so that all ranks and loader
    workers read one snapshot through one session per partition.
    """
    return OdpsSource(url, **options).session_ids()


def main(argv: list[str] | None = None) -> int:
    """``python -m kubeai_train.data.odps sessions URL``: print the export line for a job."""
    parser = argparse.ArgumentParser(prog="python -m kubeai_train.data.odps")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("sessions", help="create the download sessions of URL and print the export line")
    p.add_argument("url")
    p.add_argument("--compression", default=None, choices=["lz4", "zstd", "zlib"])
    args = parser.parse_args(argv)
    try:
        ids = create_sessions(args.url, compression=args.compression)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"export {SESSIONS_ENV}='{json.dumps(ids, sort_keys=True)}'")
    return 0
