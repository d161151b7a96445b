"""``python -m kubeai_train.testing.odps_server --root DIR [--port P] [--project P]``: serve until Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kubeai_train.testing.odps_server.catalog import CatalogError
from kubeai_train.testing.odps_server.server import DEFAULT_ACCESS_ID, DEFAULT_SECRET, OdpsServer

__all__ = ["main"]

logger = logging.getLogger("kubeai_train.testing.odps_server")


def main(argv: list[str] | None = None) -> int:
    """``python -m kubeai_train.testing.odps_server --root DIR [--port P]``: serve until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m kubeai_train.testing.odps_server",
        description="Local ODPS REST + tunnel server over Parquet files (offline development).",
    )
    parser.add_argument(
        "--root", required=True, help="directory: ROOT/<project>/<table>[/<k=v>...]/*.parquet"
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--project", default=None, help="default project for the printed ODPS_PROJECT_NAME")
    parser.add_argument("--access-id", default=DEFAULT_ACCESS_ID)
    parser.add_argument(
        "--secret-env",
        default=None,
        metavar="VAR",
        help="read the accepted secret from this environment variable (default: the local test secret)",
    )
    args = parser.parse_args(argv)
    secret = DEFAULT_SECRET
    if args.secret_env:
        secret = os.environ.get(args.secret_env, "")
        if not secret:
            print(f"error: --secret-env {args.secret_env}: variable is not set or empty", file=sys.stderr)
            return 2
    try:
        server = OdpsServer(
            args.root, port=args.port, access_id=args.access_id, secret=secret, project=args.project
        )
    except (CatalogError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    project = args.project
    if project is None:
        projects = sorted(p.name for p in server.catalog.root.iterdir() if p.is_dir())
        project = projects[0] if projects else None
    print(f"ODPS server on {server.endpoint} (tunnel {server.tunnel_endpoint}), root {server.catalog.root}")
    print("export these to use it:")
    for k, v in server.env(project).items():
        shown = v if k != "ALIBABA_CLOUD_ACCESS_KEY_SECRET" or not args.secret_env else f"${args.secret_env}"
        print(f"export {k}={shown}")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()
    return 0
