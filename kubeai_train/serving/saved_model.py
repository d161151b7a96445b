"""The SavedModel behind the serving contract: raw columns fed to ``serving_default`` as declared.

The TF trainers export a graph over raw columns (strings hashed with FarmHash inside it, dense
values scaled inside it), so no preprocessing step is declared: this predictor reads the
signature's input names and dtypes, fills nulls by the rule the trainers' input path uses
(:func:`kubeai_train.tf.reading.clean_batch`: ``""`` for strings, NaN for floats) and returns the
signature's ``probability`` output.

Importing this module imports TensorFlow (quietly, through ``kubeai_train.tf``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kubeai_train.serving.rows import check_rows, slices
from kubeai_train.serving.types import ExportFormatError, InputSpec, Predictor, Signature
from kubeai_train.tf._tf import tf  # TensorFlow, imported quietly (no CPU-only start-up lines)
from kubeai_train.tf.export import SIGNATURE
from kubeai_train.tf.reading import clean_batch

__all__ = ["SavedModelPredictor"]

OUTPUT = "probability"


def _dtype(name: str, spec: Any, where: str) -> str:
    if spec.dtype == tf.string:
        return "string"
    if spec.dtype == tf.float32:
        return "float32"
    if spec.dtype == tf.int64:
        return "int64"
    raise ExportFormatError(
        f"{where}: input {name!r} of signature {SIGNATURE!r} is {spec.dtype.name}; serving feeds string, "
        "float32 or int64 columns"
    )


def _numpy(arr: pa.Array) -> np.ndarray:
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    return arr.to_numpy(zero_copy_only=False)  # strings: objects, None for null; floats: NaN


class SavedModelPredictor(Predictor):
    """Scores raw rows with a SavedModel directory (see the module docstring).

    Args:
        export_dir: a local directory holding ``saved_model.pb`` and ``variables/``.
        source: how to name it in messages and ``repr`` (default ``export_dir``).
        metadata: the repository's record of the version, if any.
        batch_size: rows per call of the signature.

    Raises:
        ExportFormatError: the SavedModel cannot be loaded, has no ``serving_default`` signature
            with a ``probability`` output, or takes an input of another dtype.
    """

    def __init__(
        self,
        export_dir: str | Path,
        *,
        source: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        batch_size: int = 4096,
    ) -> None:
        self.source = source or str(export_dir)
        self.metadata = dict(metadata or {})
        self.batch_size = batch_size
        try:
            self._loaded = tf.saved_model.load(str(export_dir), tags=["serve"])
        except (OSError, ValueError, RuntimeError, tf.errors.OpError) as e:
            raise ExportFormatError(
                f"cannot load the SavedModel {self.source}: {type(e).__name__}: {e}"
            ) from e
        signatures = self._loaded.signatures
        if SIGNATURE not in signatures:
            raise ExportFormatError(
                f"SavedModel {self.source} has no signature {SIGNATURE!r}; it has {sorted(signatures)}"
            )
        self._fn = signatures[SIGNATURE]
        outputs = self._fn.structured_outputs
        if OUTPUT not in outputs:
            raise ExportFormatError(
                f"signature {SIGNATURE!r} of {self.source} has no {OUTPUT!r} output; it has {sorted(outputs)}"
            )
        specs = self._fn.structured_input_signature[1]
        # the order the model's metadata lists (its raw_features()) when there is one, else by name
        listed = list((self.metadata.get("signature") or {}).get("inputs") or {})
        order = [n for n in listed if n in specs] + sorted(n for n in specs if n not in listed)
        self._specs = {n: specs[n] for n in order}
        self.signature = Signature(
            framework="tf",
            format="saved_model",
            inputs=tuple(InputSpec(n, _dtype(n, specs[n], self.source)) for n in order),
        )

    def predict(self, rows: Any) -> np.ndarray:
        columns, n = check_rows(rows, self.signature)
        kinds = self.signature.dtypes()
        parts = []
        for batch in slices(columns, n, self.batch_size):
            clean = clean_batch({k: _numpy(v) for k, v in batch.items()}, kinds)
            feed = {k: tf.constant(v, dtype=self._specs[k].dtype) for k, v in clean.items()}
            parts.append(self._fn(**feed)[OUTPUT].numpy())
        return np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros(0, np.float32)

    def close(self) -> None:
        self._fn = None
        self._loaded = None
