"""Fast, exactly-once, resumable batched reading of datasets into numpy, tf.data and torch.

A source (Parquet / ORC / CSV files on any fsspec filesystem, ODPS tables) is cut into
splits (row groups, stripes, row ranges); a split assignment gives every reader (rank x
DataLoader worker) its share so that each row is read exactly once per epoch; the pipeline
turns Arrow batches into dicts of numpy arrays of exactly ``batch_size`` rows, with a
deterministic shuffle from (seed, epoch) and a state that resumes at the next unread row.
Sources plug in by URL scheme (:func:`register_source`); fsspec storage options for a scheme
come from :func:`register_storage_options` providers.
"""

from kubeai_train.data.adapters import state_from_tf
from kubeai_train.data.dataset import Dataset, ReadOptions, read
from kubeai_train.data.dispatch.client import DynamicAssignment
from kubeai_train.data.registry import (
    open_source,
    register_source,
    register_storage_options,
    storage_options_for,
)
from kubeai_train.data.types import (
    Assignment,
    ColumnNotFoundError,
    CorruptFileError,
    DataError,
    DatasetNotFoundError,
    EmptyDatasetError,
    ReaderId,
    ReadFailedError,
    SchemaMismatchError,
    Source,
    SourceUnavailableError,
    Split,
    StateError,
)

__all__ = [
    "Dataset",
    "ReadOptions",
    "read",
    "state_from_tf",
    "Assignment",
    "DynamicAssignment",
    "ColumnNotFoundError",
    "CorruptFileError",
    "DataError",
    "DatasetNotFoundError",
    "EmptyDatasetError",
    "ReadFailedError",
    "ReaderId",
    "SchemaMismatchError",
    "Source",
    "SourceUnavailableError",
    "Split",
    "StateError",
    "open_source",
    "register_source",
    "register_storage_options",
    "storage_options_for",
]
