"""Adapters from a :class:`~kubeai_train.data.dataset.Dataset` to tf.data and torch.

tensorflow and torch are imported inside these functions only.

``to_tf``: ``tf.data.Dataset.from_generator`` with an ``output_signature`` built from the
column plans (shape ``(None,)``, or ``(batch_size,)`` with ``drop_last``; a list column gives
``name`` values + ``name.offsets`` row splits: ``tf.RaggedTensor.from_row_splits``). It works
in eager and graph mode. The generator runs in the process that *iterates* the dataset, so in
between-graph parameter-server training each worker reads its own share. In TF2 coordinator
mode (``ParameterServerStrategy`` + ``ClusterCoordinator.create_per_worker_dataset``) a Python
generator runs in the chief (coordinator) process, not on the workers: every worker's dataset
pulls through the chief's Python. To keep exactly-once there, build one reader per
per-worker dataset with an explicit share, e.g. in a ``dataset_fn(input_context)`` call
``data.read(..., rank=input_context.input_pipeline_id,
world_size=input_context.num_input_pipelines).to_tf()``; never rely on ``cluster.current()``
inside the chief, which would give every worker the chief's share. Throughput is then bound by
the chief's CPU; prefer between-graph mode for input-heavy jobs.

State with tf.data: the Dataset's ``state_dict()`` counts rows handed to tf.data, so a
``.prefetch(n)`` (or any buffering stage) on top counts up to ``n`` batches as delivered
before the model sees them. For exact checkpoints use ``to_tf(with_state=True)``: elements
become ``(batch, state)`` where ``state`` is a scalar ``tf.string``, the JSON ``state_dict()``
right after that batch. It travels with its batch through ``.prefetch`` / ``.map`` /
``tf.function`` / graph mode, so the state of the last batch the model consumed is the exact
resume point: ``ds.load_state_dict(data.state_from_tf(state))`` in the restarted process.
Strip it where a model wants features only: ``.map(lambda batch, state: batch)``.

``to_torch``: an ``IterableDataset`` of ready batches (use ``DataLoader(ds, batch_size=None)``).
With DataLoader workers, worker ``w`` of ``n`` reads part ``w`` of the rank's share (every row
exactly once across ranks x workers); each worker's last batch of an epoch may be short.
Call ``set_epoch(e)`` before each epoch as with ``DistributedSampler``. Because the
DataLoader takes batches from its workers in round-robin order, ``state_dict(num_batches)``
turns "the trainer consumed this many batches of this epoch" into each worker's position, and
``load_state_dict`` resumes every worker at its next unread row (same worker count).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import numpy as np

from kubeai_train.data.types import ReaderId, StateError

__all__ = ["state_from_tf", "to_tf", "to_torch", "worker_positions"]


class Dataset(Protocol):
    """What the adapters use of a :class:`kubeai_train.data.dataset.Dataset`, named here so that
    the adapters sit below the dataset (which offers them as ``to_tf`` / ``to_torch``)."""

    options: Any
    plans: Any
    reader: ReaderId
    _epoch: int
    _rows: int

    @property
    def epoch(self) -> int: ...

    def output_spec(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def with_reader(self, reader: ReaderId) -> Dataset: ...

    def _epoch_rows(self) -> int: ...

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...

    def __len__(self) -> int: ...


def to_tf(ds: Dataset, with_state: bool = False) -> Any:
    """``tf.data.Dataset`` of ``dict[str, tf.Tensor]`` batches read by ``ds`` (see module doc);
    with ``with_state``, of ``(batch, state)`` pairs (``state``: the JSON position after the
    batch, a scalar ``tf.string``; decode it with :func:`state_from_tf`)."""
    import tensorflow as tf

    shape = (ds.options.batch_size,) if ds.options.drop_last else (None,)
    sig = {}
    for name, dtype in ds.output_spec().items():
        tf_dtype = tf.string if dtype == np.dtype(object) else tf.as_dtype(dtype)
        dims = (
            (None,)
            if name.endswith(".offsets")
            or any(name == p.name and p.kind.startswith("list_") for p in ds.plans)
            else shape
        )
        sig[name] = tf.TensorSpec(shape=dims, dtype=tf_dtype, name=None)

    if not with_state:

        def gen() -> Iterator[dict[str, np.ndarray]]:
            yield from ds

        return tf.data.Dataset.from_generator(gen, output_signature=sig)

    def gen_with_state() -> Iterator[tuple[dict[str, np.ndarray], bytes]]:
        for batch in ds:  # the dataset's position is advanced before each yield
            yield batch, json.dumps(ds.state_dict()).encode()

    return tf.data.Dataset.from_generator(
        gen_with_state, output_signature=(sig, tf.TensorSpec(shape=(), dtype=tf.string))
    )


def state_from_tf(value: Any) -> dict[str, Any]:
    """The ``state_dict()`` carried by a ``to_tf(with_state=True)`` element: accepts the
    ``tf.string`` tensor (eager), or the ``bytes`` / ``str`` a session run or ``.numpy()`` gave.

    Raises:
        StateError: ``value`` is not such a state.
    """
    if hasattr(value, "numpy"):
        value = value.numpy()
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    if isinstance(value, (bytes, np.bytes_)):
        value = bytes(value).decode()
    try:
        state = json.loads(value) if isinstance(value, str) else None
    except ValueError as e:
        raise StateError(f"not a to_tf(with_state=True) state: {str(value)[:100]!r}") from e
    if not isinstance(state, dict):
        raise StateError(
            f"not a to_tf(with_state=True) state: {str(value)[:100]!r}; pass the second element of a batch"
        )
    return state


def worker_positions(
    start_rows: list[int], epoch_rows: list[int], batch_size: int, num_batches: int
) -> list[int]:
    """Rows each DataLoader worker has delivered after the trainer consumed ``num_batches``
    batches, given each worker's starting row and rows per epoch.

    A DataLoader takes batches from its workers round-robin, skipping exhausted ones; this
    replays that order (a pure function, so resume does not depend on timing).
    """
    if num_batches < 0:
        raise ValueError(f"num_batches must be >= 0, got {num_batches}")
    pos = list(start_rows)
    n = len(pos)
    left = num_batches
    w = 0
    while left > 0:
        live = [i for i in range(n) if pos[i] < epoch_rows[i]]
        if not live:
            raise ValueError(
                f"num_batches={num_batches} is more than the workers deliver in this epoch "
                f"(they stopped after {num_batches - left})"
            )
        while pos[w % n] >= epoch_rows[w % n]:
            w += 1
        i = w % n
        pos[i] = min(epoch_rows[i], pos[i] + batch_size)
        left -= 1
        w += 1
    return pos


_TorchDataset: Any = None


def _torch_dataset_class() -> Any:
    global _TorchDataset
    if _TorchDataset is not None:
        return _TorchDataset
    import torch.utils.data as tud

    class TorchDataset(tud.IterableDataset):  # type: ignore[misc, type-arg]
        """This rank's batches, split across DataLoader workers (see module doc)."""

        def __init__(self, ds: Dataset, epoch: int = 0, resume: Mapping[str, Any] | None = None) -> None:
            super().__init__()
            self.dataset = ds
            self.epoch = epoch
            self._resume = dict(resume) if resume else None

        def __reduce__(self) -> Any:
            return (_rebuild_torch, (self.dataset, self.epoch, self._resume))

        def set_epoch(self, epoch: int) -> None:
            if not isinstance(epoch, int) or epoch < 0:
                raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
            self.epoch, self._resume = epoch, None

        def _reader(self, worker: int, num_workers: int) -> ReaderId:
            r = self.dataset.reader
            return ReaderId(rank=r.rank, world_size=r.world_size, worker=worker, num_workers=num_workers)

        def _starts(self, num_workers: int) -> list[int]:
            res = self._resume
            if res and res["epoch"] == self.epoch:
                if res["num_workers"] != num_workers:
                    raise StateError(
                        f"state was taken with {res['num_workers']} DataLoader workers, resuming with "
                        f"{num_workers}; resume with num_workers={res['num_workers']} (0 counts as 1)"
                    )
                return list(res["rows"])
            return [0] * num_workers

        def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
            info = tud.get_worker_info()
            w, n = (0, 1) if info is None else (info.id, info.num_workers)
            sub = self.dataset.with_reader(self._reader(w, n))
            sub._epoch, sub._rows = self.epoch, self._starts(n)[w]
            # one DataLoader pass = the dataset's block of num_epochs epochs
            for batch in sub:
                yield {k: _tensor(v) for k, v in batch.items()}

        def __len__(self) -> int:
            return len(self.dataset)

        def state_dict(self, num_batches: int, num_workers: int = 0) -> dict[str, Any]:
            """Position after the trainer consumed ``num_batches`` batches of this pass of a
            ``DataLoader(self, batch_size=None, num_workers=num_workers)``."""
            if self.dataset.options.num_epochs != 1:
                raise ValueError("state_dict(num_batches) needs num_epochs=1 (one DataLoader pass per epoch)")
            if getattr(self.dataset, "lazy", False):
                raise ValueError(
                    "state_dict(num_batches) needs the static assignment: with assignment='dynamic' the "
                    "DataLoader workers' shares are not known in advance (use persistent readers without "
                    "DataLoader workers to checkpoint a dynamic dataset)"
                )
            n = max(1, num_workers)
            starts = self._starts(n)
            rows = [self.dataset.with_reader(self._reader(w, n))._epoch_rows() for w in range(n)]
            pos = worker_positions(starts, rows, self.dataset.options.batch_size, num_batches)
            base = self.dataset.state_dict()
            base.update(epoch=self.epoch, worker_rows=pos, num_workers=n, worker=0, rows=0)
            return base

        def load_state_dict(self, state: Mapping[str, Any]) -> None:
            mine = self.dataset.state_dict()
            for k in ("rank", "world_size", "shuffle", "seed", "shuffle_buffer", "fingerprint"):
                if state.get(k) != mine[k]:
                    raise StateError(
                        f"state does not match this dataset: {k} is {state.get(k)!r}, here {mine[k]!r}"
                    )
            if "worker_rows" not in state:
                raise StateError(
                    "not a to_torch() state: it has no worker_rows; take it with state_dict(num_batches)"
                )
            self.epoch = int(state["epoch"])
            self._resume = {
                "epoch": self.epoch,
                "num_workers": int(state["num_workers"]),
                "rows": list(state["worker_rows"]),
            }

    _TorchDataset = TorchDataset
    return TorchDataset


def _tensor(arr: np.ndarray) -> Any:
    """A torch tensor sharing ``arr``'s memory (object arrays of strings stay numpy).

    Zero-copy arrays are read-only views of Arrow buffers nobody else holds; torch warns about
    non-writable arrays, which is noise here.
    """
    if arr.dtype == object:
        return arr
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr) if arr.flags.writeable else torch.as_tensor(arr)


def _rebuild_torch(ds: Dataset, epoch: int, resume: Mapping[str, Any] | None) -> Any:
    return _torch_dataset_class()(ds, epoch, resume)


def to_torch(ds: Dataset) -> Any:
    """A ``torch.utils.data.IterableDataset`` over ``ds`` (see module doc)."""
    return _torch_dataset_class()(ds, ds.epoch)
