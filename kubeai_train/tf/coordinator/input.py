"""Input for the coordinator mode: the Python reader on the chief, or tf.data readers on the workers.

Measured here: under ParameterServerStrategy a Python generator inside
``create_per_worker_dataset`` runs in the chief process, and the ``InputContext`` a per-worker
``dataset_fn`` receives is always ``input_pipeline_id=0`` of ``num_input_pipelines=1``
(``parameter_server_strategy_v2.py``, ``_distribute_datasets_from_function``). A per-worker
generator keyed by ``tf.distribute.coordinator.experimental_get_current_worker_index()`` would
give each worker a share, but (1) it still runs on the chief, (2) TensorFlow recreates a per-worker
dataset from its start when that worker recovers from a failure (its share is read again), and
(3) an exhausted per-worker iterator fails the whole ``join`` with OutOfRangeError while the other
workers still have rows. So the two paths are:

* :class:`ChiefReader` (``input="chief"``): ``reader_threads`` readers of ``kubeai_train.data``
  on the chief, reader ``k`` of ``K`` reading its exactly-once share, batches converted to
  tensors in those threads; each batch travels to a worker *as the argument of its step*
  (``coordinator.schedule(step, args=(batch,))``). Every batch is scheduled once; a closure
  lost with a worker is retried elsewhere with the same batch; so every row is applied exactly
  once per epoch (except a worker dying after its update was applied but before the chief heard
  back: that batch is applied twice), and the readers' positions make a checkpoint resume exact.
* :func:`worker_dataset_fn` (``input="workers"``): TFRecord / CSV files read by ``tf.data`` on
  each worker, files sharded by worker index (``Dataset.shard``), rows a worker has already
  applied skipped on resume; after its share the dataset yields empty batches, so the chief
  can keep scheduling until every worker has reported its share done.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from kubeai_train._protowire import varint as _varint
from kubeai_train.tf.reading import ReadFn, clean_batch, reader_options
from kubeai_train.tf.types import TrainError

__all__ = ["ChiefReader", "list_native", "native_counts", "worker_dataset_fn", "write_native"]

log = logging.getLogger("kubeai_train.tf")

COUNTS_FILE = "_counts.json"
_TF = {"string": tf.string, "float32": tf.float32, "int64": tf.int64}
_END = object()


def tensor_spec(kinds: Mapping[str, str]) -> dict[str, Any]:
    return {name: tf.TensorSpec([None], _TF[kind], name=name) for name, kind in kinds.items()}


class ChiefReader:
    """``threads`` readers of ``kubeai_train.data`` on the chief, merged into one batch stream.

    Iterating yields ``(reader, tensors, rows)``; :meth:`mark` records that a batch was
    scheduled, and :meth:`state` is then every reader's position after its last scheduled batch.

    Args:
        read_fn: ``kubeai_train.data.read``-like.
        uri, kinds, batch_size, num_epochs, shuffle, seed, options: what to read.
        threads: readers (reader ``k`` reads share ``k`` of ``threads``).
        state: a previous :meth:`state` to resume from (same ``threads`` required).
        prefetch: batches each reader converts ahead.
    """

    def __init__(
        self,
        read_fn: ReadFn,
        uri: str,
        kinds: Mapping[str, str],
        *,
        batch_size: int,
        num_epochs: int,
        shuffle: bool,
        seed: int,
        options: Mapping[str, Any],
        threads: int,
        state: Mapping[str, Any] | None = None,
        prefetch: int = 4,
    ) -> None:
        self.kinds = dict(kinds)
        self.threads = threads
        if state and state.get("threads") != threads:
            raise TrainError(
                f"the checkpoint's reader positions are for reader_threads={state.get('threads')}, "
                f"this run has reader_threads={threads}; resume with the same reader_threads"
            )
        positions = list(state["positions"]) if state else [None] * threads
        self.positions: list[Any] = positions
        self.done: list[bool] = list(state["done"]) if state else [False] * threads
        self.readers = []
        for k in range(threads):
            ds = read_fn(
                uri,
                columns=list(self.kinds),
                batch_size=batch_size,
                rank=k,
                world_size=threads,
                num_epochs=num_epochs,
                shuffle=shuffle,
                seed=seed,
                **reader_options(self.kinds, options),
            )
            if positions[k] is not None:
                ds.load_state_dict(positions[k])
            self.readers.append(ds)
        self._q: queue.Queue[Any] = queue.Queue(maxsize=max(2, prefetch * threads))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _work(self, k: int) -> None:
        try:
            if not self.done[k]:
                ds = self.readers[k]
                for batch in ds:
                    clean = clean_batch(batch, self.kinds)
                    tensors = {n: tf.constant(a) for n, a in clean.items()}
                    rows = len(clean[next(iter(clean))])
                    item = (k, tensors, rows, ds.state_dict())
                    while not self._stop.is_set():
                        try:
                            self._q.put(item, timeout=0.2)
                            break
                        except queue.Full:
                            continue
                    if self._stop.is_set():
                        return
            self._q.put((k, _END, 0, None))
        except BaseException as e:  # re-raised in the consumer
            self._q.put((k, e, 0, None))

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any], int, Any]]:
        self._threads = [
            threading.Thread(target=self._work, args=(k,), name=f"kubeai-coord-reader-{k}", daemon=True)
            for k in range(self.threads)
        ]
        for t in self._threads:
            t.start()
        open_readers = self.threads
        try:
            while open_readers:
                k, payload, rows, pos = self._q.get()
                if payload is _END:
                    open_readers -= 1
                    self.done[k] = True
                    continue
                if isinstance(payload, BaseException):
                    raise payload
                yield k, payload, rows, pos
        finally:
            self._stop.set()

    def mark(self, k: int, position: Any) -> None:
        """Record that reader ``k``'s batch ending at ``position`` was scheduled."""
        self.positions[k] = position

    def state(self) -> dict[str, Any]:
        return {"threads": self.threads, "positions": list(self.positions), "done": list(self.done)}


# ----------------------------------------------------------------------------- native files
def list_native(spec: str, fmt: str) -> list[str]:
    """The files of ``spec`` (a directory, a glob, or paths joined by commas), sorted."""
    suffix = {"tfrecord": ".tfrecord", "csv": ".csv"}[fmt]
    out: list[str] = []
    for part in [p for p in spec.split(",") if p]:
        if tf.io.gfile.isdir(part):
            out += [
                os.path.join(part, f)
                for f in tf.io.gfile.listdir(part)
                if f.endswith(suffix) and not f.startswith((".", "_"))
            ]
        else:
            out += tf.io.gfile.glob(part)
    out = sorted(set(out))
    if not out:
        raise TrainError(f"native_data {spec!r} matches no {fmt} files; write them with write_native")
    return out


def native_counts(files: Sequence[str], fmt: str) -> list[int]:
    """Rows per file: from the ``_counts.json`` that :func:`write_native` writes, else counted."""
    counts: dict[str, int] = {}
    for folder in sorted({os.path.dirname(f) for f in files}):
        path = os.path.join(folder, COUNTS_FILE)
        if tf.io.gfile.exists(path):
            with tf.io.gfile.GFile(path) as f:
                for name, n in json.load(f).items():
                    counts[os.path.join(folder, name)] = int(n)
    out = []
    for f in files:
        if f not in counts:
            ds = tf.data.TFRecordDataset(f) if fmt == "tfrecord" else tf.data.TextLineDataset(f).skip(1)
            counts[f] = int(ds.reduce(np.int64(0), lambda n, _: n + 1))
        out.append(counts[f])
    return out


def write_native(
    source: str,
    out_dir: str,
    kinds: Mapping[str, str],
    *,
    fmt: str = "tfrecord",
    files: int = 4,
    read_fn: ReadFn | None = None,
    options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write ``source`` (anything ``kubeai_train.data.read`` opens) as TFRecord or CSV files.

    Rows keep their order and are dealt to ``files`` files in contiguous blocks; nulls become
    ``""`` / NaN (what the model's transforms expect). Files are written under a temporary name
    and renamed; ``_counts.json`` (rows per file) is written last.

    Returns:
        The written file paths.
    """
    from kubeai_train.tf.reading import default_read_fn

    read = read_fn or default_read_fn
    if fmt not in ("tfrecord", "csv"):
        raise TrainError(f"fmt must be 'tfrecord' or 'csv', got {fmt!r}")
    if files < 1:
        raise TrainError(f"files must be >= 1, got {files}")
    tf.io.gfile.makedirs(out_dir)
    ds = read(
        source,
        columns=list(kinds),
        batch_size=4096,
        rank=0,
        world_size=1,
        num_epochs=1,
        shuffle=False,
        seed=0,
        **reader_options(kinds, options or {}),
    )
    batches = [clean_batch(b, kinds) for b in ds]
    total = sum(len(b[next(iter(kinds))]) for b in batches)
    merged = {n: np.concatenate([b[n] for b in batches]) for n in kinds} if batches else {}
    per_file = [total // files + (1 if k < total % files else 0) for k in range(files)]
    paths, counts, start = [], {}, 0
    suffix = ".tfrecord" if fmt == "tfrecord" else ".csv"
    for k, n in enumerate(per_file):
        name = f"part-{k:05d}{suffix}"
        path = os.path.join(out_dir, name)
        tmp = os.path.join(out_dir, f".{name}.tmp")
        cols = {c: merged[c][start : start + n] for c in kinds}
        if fmt == "tfrecord":
            _write_tfrecord(tmp, cols, kinds, n)
        else:
            _write_csv(tmp, cols, kinds, n)
        tf.io.gfile.rename(tmp, path, overwrite=True)
        paths.append(path)
        counts[name] = n
        start += n
    with tf.io.gfile.GFile(os.path.join(out_dir, COUNTS_FILE), "w") as f:
        f.write(json.dumps(counts, sort_keys=True))
    return paths


def _len_field(tag: int, payload: bytes) -> bytes:
    return bytes((tag,)) + _varint(len(payload)) + payload


def encode_examples(cols: Mapping[str, np.ndarray], kinds: Mapping[str, str], n: int) -> list[bytes]:
    """Rows as serialized ``tf.train.Example`` protos, encoded directly (several times faster
    than building proto objects; the bytes parse to the same Example)."""
    per_col: list[list[bytes]] = []
    for c, kind in kinds.items():
        key = _len_field(0x0A, c.encode())  # map entry field 1: the key
        if kind == "string":
            # Feature.bytes_list (1) > BytesList.value (1)
            vals = [_len_field(0x0A, _len_field(0x0A, str(v).encode())) for v in cols[c][:n].tolist()]
        elif kind == "float32":
            # Feature.float_list (2) > FloatList.value (1, packed)
            raw = np.ascontiguousarray(cols[c][:n], dtype="<f4").tobytes()
            vals = [b"\x12\x06\x0a\x04" + raw[4 * i : 4 * i + 4] for i in range(n)]
        else:
            # Feature.int64_list (3) > Int64List.value (1, packed varints)
            vals = [_len_field(0x1A, _len_field(0x0A, _varint(int(v)))) for v in cols[c][:n].tolist()]
        per_col.append([_len_field(0x0A, key + _len_field(0x12, v)) for v in vals])
    return [_len_field(0x0A, b"".join(row)) for row in zip(*per_col, strict=True)]


def _write_tfrecord(path: str, cols: Mapping[str, np.ndarray], kinds: Mapping[str, str], n: int) -> None:
    with tf.io.TFRecordWriter(path) as w:
        for record in encode_examples(cols, kinds, n):
            w.write(record)


def _write_csv(path: str, cols: Mapping[str, np.ndarray], kinds: Mapping[str, str], n: int) -> None:
    names = list(kinds)
    for c in names:
        if kinds[c] == "string" and any("," in str(v) or '"' in str(v) for v in cols[c]):
            raise TrainError(f"column {c!r} has values with ',' or '\"'; write tfrecord instead of csv")
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(",".join(names) + "\n")
        for i in range(n):
            vals = []
            for c in names:
                v = cols[c][i]
                if kinds[c] == "float32":
                    vals.append("" if math.isnan(float(v)) else repr(float(v)))
                else:
                    vals.append(str(v))
            f.write(",".join(vals) + "\n")


def _parser(fmt: str, kinds: Mapping[str, str]) -> Any:
    names = list(kinds)
    if fmt == "tfrecord":
        spec = {n: tf.io.FixedLenFeature([], _TF[k]) for n, k in kinds.items()}
        return lambda serialized: tf.io.parse_example(serialized, spec)
    return lambda *cols: dict(zip(names, cols, strict=True))


def worker_dataset_fn(
    files: Sequence[str],
    fmt: str,
    kinds: Mapping[str, str],
    *,
    batch_size: int,
    num_workers: int,
    num_epochs: int,
    shuffle: bool,
    seed: int,
    skip_rows: Sequence[int],
    worker_index: Callable[[], Any] | None = None,
) -> Any:
    """The ``dataset_fn`` for ``create_per_worker_dataset``: worker ``w`` reads files ``w, w+W, ...``.

    Rows are read in file order (shuffled within a window of ``8 * batch_size`` rows when
    ``shuffle``, deterministically from ``seed``), repeated ``num_epochs`` times, the first
    ``skip_rows[w]`` rows skipped (those this worker applied before the restored checkpoint),
    batched; then empty batches forever (a 0-row step changes nothing and tells the chief this
    worker's share is done). ``worker_index`` returns this worker's index as a tensor (default
    ``tf.distribute.coordinator.experimental_get_current_worker_index``, valid on the workers).
    """
    files = list(files)
    skips = [int(s) for s in skip_rows]
    if len(skips) != num_workers:
        raise TrainError(f"skip_rows has {len(skips)} entries for {num_workers} workers")
    parse = _parser(fmt, kinds)
    names = list(kinds)
    index_fn = worker_index or tf.distribute.coordinator.experimental_get_current_worker_index

    def dataset_fn() -> Any:
        w = tf.cast(index_fn(), tf.int64)
        ds = tf.data.Dataset.from_tensor_slices(files).shard(num_workers, w)
        if fmt == "tfrecord":
            rows = ds.interleave(
                tf.data.TFRecordDataset, cycle_length=2, num_parallel_calls=2, deterministic=True
            )
        else:
            defaults = [
                tf.constant(math.nan, tf.float32)
                if kinds[n] == "float32"
                else tf.constant("", tf.string)
                if kinds[n] == "string"
                else tf.constant(0, tf.int64)
                for n in names
            ]
            rows = ds.interleave(
                lambda f: tf.data.experimental.CsvDataset(f, defaults, header=True),
                cycle_length=2,
                num_parallel_calls=2,
                deterministic=True,
            )
        if shuffle:
            rows = rows.shuffle(8 * batch_size, seed=seed, reshuffle_each_iteration=True)
        rows = rows.repeat(num_epochs).skip(tf.gather(tf.constant(skips, tf.int64), w))
        batches = rows.batch(batch_size).map(parse, num_parallel_calls=tf.data.AUTOTUNE)
        empty = tf.data.Dataset.from_tensors({n: tf.zeros([0], _TF[kinds[n]]) for n in names}).repeat()
        return batches.concatenate(empty).prefetch(2)

    return dataset_fn
