"""Contracts of the serving room: what a loaded model takes and returns, and its errors.

A :class:`Predictor` scores raw feature rows, the columns as they are in the training data, for
any export kubeai_train writes: a TensorFlow SavedModel (hashing inside the graph) or a torch
export (a TorchScript program plus its declared preprocessing step). Its :class:`Signature` lists
the raw columns it needs as :class:`InputSpec` entries, so callers never need to know which
framework trained the model. Every error raised on purpose derives from :class:`ServingError`,
names the bad value and says what to do; the errors pickle (their only argument is the message).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "DTYPES",
    "ColumnTypeError",
    "ExportFormatError",
    "InputError",
    "InputSpec",
    "MissingColumnError",
    "MissingDependencyError",
    "Predictor",
    "ServingError",
    "Signature",
]

#: raw column types a signature can ask for: ``string`` (raw categorical values; null allowed),
#: ``float32`` (any numbers; null -> NaN), ``int64`` (integers, no nulls).
DTYPES = ("string", "float32", "int64")


class ServingError(Exception):
    """Base of the errors ``kubeai_train.serving`` raises on purpose."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ExportFormatError(ServingError, ValueError):
    """A directory is not an export this code can load (no known files, an unknown declared
    preprocessing step or version, an unsupported input type); names the directory."""


class MissingDependencyError(ServingError, ImportError):
    """The export needs a framework that is not installed; the message says what to install."""


class InputError(ServingError, ValueError):
    """Rows given to :meth:`Predictor.predict` do not match the signature."""


class MissingColumnError(InputError):
    """A column the signature needs is absent; the message names it and its expected type."""


class ColumnTypeError(InputError, TypeError):
    """A column has the wrong type (numbers for a raw string column, strings for a numeric one)."""


@dataclass(frozen=True)
class InputSpec:
    """One raw column a model takes.

    Attributes:
        name: the column name, as in the training data.
        dtype: one of :data:`DTYPES`.
    """

    name: str
    dtype: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ExportFormatError(f"input name must be a non-empty string, got {self.name!r}")
        if self.dtype not in DTYPES:
            raise ExportFormatError(
                f"input {self.name!r} has dtype {self.dtype!r}; serving supports {', '.join(DTYPES)}"
            )


@dataclass(frozen=True)
class Signature:
    """What a loaded export takes and returns.

    Attributes:
        framework: ``"tf"`` or ``"torch"``.
        format: ``"saved_model"`` or ``"torchscript"``.
        inputs: the raw columns, in the model's order.
        output: what :meth:`Predictor.predict` returns (``"probability"``: click probability per
            row, float32).
        preprocessing: the declared preprocessing step between raw columns and the program
            (torch: ``{"name": "ctr-fnv1a", "version": 1, ...}``), or None when the program
            takes raw columns itself (a SavedModel hashes in-graph).
    """

    framework: str
    format: str
    inputs: tuple[InputSpec, ...]
    output: str = "probability"
    preprocessing: Mapping[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.framework not in ("tf", "torch"):
            raise ExportFormatError(f"framework must be 'tf' or 'torch', got {self.framework!r}")
        object.__setattr__(self, "inputs", tuple(self.inputs))
        if not self.inputs:
            raise ExportFormatError("a signature needs at least one input column")
        names = [s.name for s in self.inputs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ExportFormatError(f"input columns must be distinct, {dup} appear twice")

    def dtypes(self) -> dict[str, str]:
        """``{column: dtype}`` in the model's order."""
        return {s.name: s.dtype for s in self.inputs}

    def to_json(self) -> dict[str, Any]:
        return {
            "framework": self.framework,
            "format": self.format,
            "inputs": self.dtypes(),
            "output": self.output,
            "preprocessing": None if self.preprocessing is None else dict(self.preprocessing),
        }


class Predictor(abc.ABC):
    """A loaded export that scores raw rows; the same contract for every framework.

    Attributes:
        signature: the raw columns it takes and what it returns.
        source: where it was loaded from (a version directory, or ``<root>/<name>/<version>``).
        metadata: the repository's record of the version (``metrics``, ``lineage``, ...), or
            ``{}`` for a directory without one.
    """

    signature: Signature
    source: str
    metadata: Mapping[str, Any]

    @property
    def inputs(self) -> dict[str, str]:
        """The raw columns to pass, ``{name: dtype}``."""
        return self.signature.dtypes()

    @abc.abstractmethod
    def predict(self, rows: Any) -> np.ndarray:
        """Click probabilities, float32 ``[n]``, of ``n`` raw rows.

        Args:
            rows: a ``pyarrow.Table`` / ``RecordBatch`` or a mapping of column name to an
                array-like (Arrow array, numpy array, list). Columns the signature does not name
                (the label, ids) are ignored. Nulls are allowed: Arrow nulls, None, NaN.

        Raises:
            MissingColumnError: a column of the signature is absent (names it and its dtype).
            ColumnTypeError: a column has the wrong type (names it, what it has, what is expected).
            InputError: the columns differ in length.
        """

    def close(self) -> None:  # noqa: B027  # a no-op unless the framework holds resources
        """Release what the framework holds (sessions, threads); the predictor is unusable after."""

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, {self.signature.format}, {len(self.inputs)} inputs)"
