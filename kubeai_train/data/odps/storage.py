"""Storage API reads (``reader="storage"``): a batch-read session per partition and column set,
read by row offset with pyodps's ``ArrowReader``. Its bodies carry no CRC, so the tunnel
(:mod:`kubeai_train.data.odps.tunnel`) stays the default reader."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

__all__ = ["open_read_session", "read_rows"]


def open_read_session(
    odps: Any, table: Any, rest_endpoint: str | None, partition: str | None, columns: list[str] | None
) -> tuple[Any, Any]:
    """``(StorageApiClient, create_read_session response)`` for one partition (``k=v,k=v`` or
    None) and column set (None: all). pyodps errors propagate for the caller to translate."""
    from odps.apis.storage_api import SplitOptions, StorageApiClient, TableBatchScanRequest

    client = StorageApiClient(odps, table, rest_endpoint=rest_endpoint)
    req = TableBatchScanRequest(
        required_data_columns=list(columns or []),
        required_partitions=[partition.replace(",", "/")] if partition else [],
    )
    req.split_options = SplitOptions.get_default_options(SplitOptions.SplitMode.ROW_OFFSET)
    return client, client.create_read_session(req)


def read_rows(
    client: Any, session_id: str, start: int, count: int, compression: str | None
) -> Iterator[pa.RecordBatch]:
    """Rows ``[start, start + count)`` of a read session as record batches (fewer if the
    stream ends early: the caller checks the row count)."""
    from odps.apis.storage_api import ArrowReader, Compression, ReadRowsRequest

    codec = {None: Compression.UNCOMPRESSED, "lz4": Compression.LZ4_FRAME, "zstd": Compression.ZSTD}
    req = ReadRowsRequest(
        session_id,
        row_index=start,
        row_count=count,
        max_batch_rows=32768,
        compression=codec.get(compression, Compression.UNCOMPRESSED),
    )
    reader = ArrowReader(client.read_rows_stream(req))
    n = 0
    while n < count:
        batch = reader.read()
        if batch is None:
            break
        n += batch.num_rows
        yield batch
