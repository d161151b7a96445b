"""A local ODPS (MaxCompute) REST + table tunnel server that the real pyodps client talks to.

It serves Parquet files under a root directory as ODPS tables (layout in
:mod:`kubeai_train.testing.odps_server.catalog`): project / table / partition metadata, TableTunnel
download sessions (create, poll, reuse by id), the Arrow download with its chunk + CRC32C framing,
the protobuf record download with its checksums, and deflate / zstd / lz4 compression of either.
Requests must be signed with the configured access key (pyodps's "ODPS id:signature" scheme);
bad credentials get a real 403 that pyodps raises.

For tests, benchmarks and offline development it adds fault injection (a connection reset
mid-body, an HTTP status such as 503, a corrupt chunk CRC, expired sessions, slow responses) and
byte counters, both through the Python API and an unauthenticated admin endpoint on loopback
(``GET /__admin__/stats``, ``POST /__admin__/faults``, ``POST /__admin__/expire``).

Usage::

    with OdpsServer(root) as server:
        os.environ.update(server.env())           # ODPS_ENDPOINT, ODPS_TUNNEL_ENDPOINT, ...
        server.inject("reset", count=1, after_bytes=100_000)
        ...

    python -m kubeai_train.testing.odps_server --root DIR [--port P] [--project P]
"""

from kubeai_train.testing.odps_server.cli import main
from kubeai_train.testing.odps_server.faults import Fault
from kubeai_train.testing.odps_server.server import DEFAULT_ACCESS_ID, DEFAULT_SECRET, OdpsServer

__all__ = ["DEFAULT_ACCESS_ID", "DEFAULT_SECRET", "Fault", "OdpsServer", "main"]
