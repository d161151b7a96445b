"""One serving contract for every export: raw feature rows in, click probabilities out.

The two trainers export differently: the TF SavedModel takes raw strings and hashes them with
FarmHash inside the graph; the torch export is a TorchScript program over FNV-1a ids plus a
declared, versioned preprocessing step (``features.json``: ``{"name": "ctr-fnv1a", "version":
1}``). :func:`load_predictor` hides the difference: it resolves a repository version (number,
alias or newest) or takes an export directory, tells the kind from its files, and returns a
:class:`Predictor` whose ``predict(rows)`` takes the raw columns as they are in the training
data (a ``pyarrow.Table`` / ``RecordBatch`` or a mapping of arrays; nulls allowed) and returns
float32 probabilities. Each framework's preprocessing runs the code its training ran (the torch
ids come from ``CTRFeatures.model_inputs``, the function the trainer's input path uses), so the
scores equal the live model's and an eval set scored here reproduces the AUC the job reported.
A missing or mistyped column is a one-line :class:`InputError` naming it and what is expected.

This room sits above ``tf/`` and ``torch/``: importing it imports neither; loading an export
imports the one framework it needs.

Example::

    from kubeai_train.serving import load_predictor
    p = load_predictor("oss://bucket/models", "ctr", "production")
    p.inputs                      # {"I1": "float32", ..., "C26": "string"}
    p.predict(pyarrow.parquet.read_table("eval.parquet"))   # np.ndarray [n] of probabilities
"""

from kubeai_train.serving.load import detect_format, load_predictor
from kubeai_train.serving.types import (
    ColumnTypeError,
    ExportFormatError,
    InputError,
    InputSpec,
    MissingColumnError,
    MissingDependencyError,
    Predictor,
    ServingError,
    Signature,
)

__all__ = [
    "ColumnTypeError",
    "ExportFormatError",
    "InputError",
    "InputSpec",
    "MissingColumnError",
    "MissingDependencyError",
    "Predictor",
    "ServingError",
    "Signature",
    "detect_format",
    "load_predictor",
]
