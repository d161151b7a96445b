"""``odps://`` source: MaxCompute (ODPS) tables read through the real pyodps client's tunnel.

URL: ``odps://<project>/tables/<table>[/<partition spec>]`` where the spec is a full or leading
partial spec, ``ds=20260101`` or ``ds=20260101/hh=01`` (``,`` also separates keys). A partial
spec reads every partition under it, in partition order.

How it reads: one TableTunnel download session per table / partition per job, splits are row
ranges of it, and rows come through the Arrow tunnel (``?data&arrow``, never the per-record
reader). By default (``reader="fast"``) the download request is made and signed by pyodps's
own session / RestClient, and its body is decoded here: scatter reads put every chunk's data at
its final place in one Arrow buffer (no copy besides the kernel's), every chunk's CRC32C is
verified with hardware CRC32C and the whole-stream CRC derived from the chunk CRCs, and each
Arrow IPC message becomes a record batch that references that buffer.
``reader="pyodps"`` uses ``TableDownloadSession.open_arrow_reader`` unchanged instead, and
``reader="storage"`` the Storage API (``odps.apis.storage_api`` batch-read sessions, read by
row offset with pyodps's ``ArrowReader``). The tunnel is the default because its bodies carry a
CRC32C per chunk that is verified here (Storage API bodies carry none), its download session
is shared by id across all processes of a job, and any row range can be addressed; measured
on the local server the fast tunnel reader is also the faster one (benchmarks/bench_odps.py).

Sharing the download session (every rank and loader worker must read the same snapshot, and
ODPS limits sessions): the session id of each partition is taken from, in order,

1. the ``sessions`` option: ``{"<project>.<table>[/<spec>]": "<download id>"}``;
2. the ``KUBEAI_ODPS_SESSIONS`` environment variable: the same mapping as JSON, which a chief,
   a launcher or a scheduler sets after ``create_sessions(url)`` /
   ``python -m kubeai_train.data.odps sessions URL`` (prints the ``export`` line);
3. a shared directory (``session_dir`` option or ``KUBEAI_ODPS_SESSION_DIR``): the first process
   creates the session under a lock file, the others reuse the id it writes;
4. otherwise the process creates one when it first needs it; the source object then carries
   the id to its DataLoader workers (pickled), so there is one session per rank.

Faults: a reset or truncated body, HTTP 5xx and a CRC mismatch reopen the download at the exact
row where the last complete batch ended (no row lost or duplicated), up to ``reopens`` times;
then :class:`~kubeai_train.data.types.ReadFailedError`. An expired session is replaced by a new
one; if its row count differs, :class:`OdpsTableChangedError`. Missing table / partition:
:class:`~kubeai_train.data.types.DatasetNotFoundError`; bad credentials or no permission:
:class:`OdpsPermissionError`; each names project, table and partition.

Credentials and endpoints (explicit options win): ``endpoint`` / ``ODPS_ENDPOINT``,
``tunnel_endpoint`` / ``ODPS_TUNNEL_ENDPOINT``, ``access_id`` / ``ALIBABA_CLOUD_ACCESS_KEY_ID``,
``secret_access_key`` / ``ALIBABA_CLOUD_ACCESS_KEY_SECRET``, ``security_token`` /
``ALIBABA_CLOUD_SECURITY_TOKEN`` (STS). The project is the URL's. The secret is never logged,
never in ``repr`` / ``describe`` / errors.
"""

from kubeai_train.data.odps.cli import create_sessions, main
from kubeai_train.data.odps.source import OdpsSource
from kubeai_train.data.odps.types import (
    SESSION_DIR_ENV,
    SESSIONS_ENV,
    OdpsPermissionError,
    OdpsSessionError,
    OdpsTableChangedError,
)

__all__ = [
    "SESSIONS_ENV",
    "SESSION_DIR_ENV",
    "OdpsPermissionError",
    "OdpsSessionError",
    "OdpsSource",
    "OdpsTableChangedError",
    "create_sessions",
    "main",
]
