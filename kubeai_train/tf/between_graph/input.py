"""Each trainer's own share of the data as a tf.data pipeline that runs in its own process.

The batches come from ``kubeai_train.data.read`` (rank and world size from the cluster) through a
graph-mode ``tf.data.Dataset.from_generator``, which executes on this process's device, so input
reading scales with the workers. Every batch travels with the reader's position *after* it (a
JSON string); the training step stores that position on the parameter servers in the same
``session.run`` as the update, so a restarted worker resumes exactly after the last batch the
model learned from, and a restored checkpoint carries every worker's position with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from kubeai_train.tf.reading import ReadFn, clean_batch, default_read_fn, reader_options

__all__ = ["ReadFn", "clean_batch", "default_read_fn", "make_dataset", "reader_options"]

_TF_DTYPES = {"string": tf.string, "float32": tf.float32, "int64": tf.int64}


class _Holder:
    """The position the next generator run starts from (set before the iterator initialiser)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None


def make_dataset(
    read_fn: ReadFn,
    uri: str,
    kinds: Mapping[str, str],
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    num_epochs: int,
    shuffle: bool,
    seed: int,
    options: Mapping[str, Any],
) -> tuple[Any, _Holder]:
    """A dataset of ``(features, position_json)`` and the holder of its start position.

    ``kinds`` maps every column to read (features and label) to ``"string"``, ``"float32"`` or
    ``"int64"``. Set ``holder.state`` (a reader ``state_dict``) before initialising the iterator to
    resume there.
    """
    holder = _Holder()
    columns = list(kinds)

    def gen() -> Iterable[tuple[dict[str, np.ndarray], bytes]]:
        ds = read_fn(
            uri,
            columns=columns,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            num_epochs=num_epochs,
            shuffle=shuffle,
            seed=seed,
            **reader_options(kinds, options),
        )
        if holder.state is not None:
            ds.load_state_dict(holder.state)
        # kubeai_train.data already hands out "" for null strings and fill_null (NaN) for null
        # floats, so its batches skip the cleaning pass (about 0.6 ms per 512-row Criteo batch)
        trusted = read_fn is default_read_fn
        for batch in ds:
            yield (
                (batch if trusted else clean_batch(batch, kinds)),
                json.dumps({"data": ds.state_dict()}).encode(),
            )

    signature = (
        {name: tf.TensorSpec([None], _TF_DTYPES[kind]) for name, kind in kinds.items()},
        tf.TensorSpec([], tf.string),
    )
    return tf.data.Dataset.from_generator(gen, output_signature=signature).prefetch(2), holder
