"""The torch export behind the serving contract: declared preprocessing, then the TorchScript program.

A torch export (``kubeai_train.torch.exporter``) is ``model.pt``, a program over hashed ids and
raw floats, plus ``features.json``, which declares the preprocessing step from raw columns to
those ids by name and version. This predictor runs the step with the very function the trainer's
input path runs (:meth:`kubeai_train.torch.features.CTRFeatures.model_inputs`, over the same
vectorised FNV-1a as ``data.read(hash_buckets=...)``), so the ids, and therefore the scores, are
bit-identical to what the live model saw in training and evaluation. A step it does not know
(another name, a newer version) is refused rather than approximated.

Importing this module imports torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kubeai_train.serving.rows import check_rows, slices
from kubeai_train.serving.types import ExportFormatError, InputSpec, Predictor, Signature
from kubeai_train.torch.exporter import PROGRAM
from kubeai_train.torch.exporter import load as load_program
from kubeai_train.torch.features import HASH_NAME, PREPROCESSING, CTRFeatures

__all__ = ["FEATURES_FILE", "PREPROCESSING_STEPS", "TorchPredictor", "declared_preprocessing"]

FEATURES_FILE = "features.json"

#: ``(name, version)`` of a declared preprocessing step -> how to build it from features.json.
#: A new step (or a version whose ids differ) is a new entry; old entries stay, so old exports load.
PREPROCESSING_STEPS: dict[tuple[str, int], Callable[[Mapping[str, Any]], CTRFeatures]] = {
    (str(PREPROCESSING["name"]), int(PREPROCESSING["version"])): CTRFeatures.from_dict,
}


def declared_preprocessing(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The ``{"name", "version", ...}`` a features.json declares.

    Exports written before the step was declared by name carry only ``"hash": "fnv1a64-utf8"``;
    their ids are those of ``ctr-fnv1a`` version 1, so they read as that.
    """
    declared = spec.get("preprocessing")
    if isinstance(declared, Mapping):
        return dict(declared)
    if spec.get("hash") == HASH_NAME:
        return dict(PREPROCESSING)
    return {"name": None, "version": None}


class TorchPredictor(Predictor):
    """Scores raw rows with a torch export directory (see the module docstring).

    Args:
        export_dir: a local directory holding ``model.pt`` and ``features.json``.
        source: how to name it in messages and ``repr`` (default ``export_dir``).
        metadata: the repository's record of the version, if any.
        batch_size: rows per call of the program (bounds memory; scores do not depend on it
            beyond the last float bit).

    Raises:
        ExportFormatError: features.json is missing or unreadable, or declares a preprocessing
            step this code does not implement (names it and the known ones).
    """

    def __init__(
        self,
        export_dir: str | Path,
        *,
        source: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        batch_size: int = 4096,
    ) -> None:
        d = Path(export_dir)
        self.source = source or str(d)
        self.metadata = dict(metadata or {})
        self.batch_size = batch_size
        try:
            spec = json.loads((d / FEATURES_FILE).read_text())
        except (OSError, ValueError) as e:
            raise ExportFormatError(
                f"cannot read {d / FEATURES_FILE} of the torch export {self.source}: {e}"
            ) from e
        declared = declared_preprocessing(spec)
        key = (declared.get("name"), declared.get("version"))
        build = PREPROCESSING_STEPS.get(key)  # type: ignore[arg-type]
        if build is None:
            known = ", ".join(f"{n} version {v}" for n, v in PREPROCESSING_STEPS)
            raise ExportFormatError(
                f"{self.source} declares preprocessing {key[0]!r} version {key[1]!r}; this kubeai_train "
                f"implements {known}: load it with the code version that exported it"
            )
        try:
            self.features = build(spec)
        except (KeyError, TypeError, ValueError) as e:
            raise ExportFormatError(f"{d / FEATURES_FILE} of {self.source} is malformed: {e}") from e
        self.program = load_program(d)
        self.program.eval()
        f = self.features
        self.signature = Signature(
            framework="torch",
            format="torchscript",
            inputs=(
                *(InputSpec(c, "float32") for c in f.dense),
                *(InputSpec(c, "string") for c in f.categorical),
            ),
            preprocessing={**declared, "buckets": dict(zip(f.categorical, f.sizes, strict=True))},
        )

    def predict(self, rows: Any) -> np.ndarray:
        columns, n = check_rows(rows, self.signature)
        out = np.empty(n, dtype=np.float32)
        start = 0
        with torch.inference_mode():
            for batch in slices(columns, n, self.batch_size):
                ids, dense = self.features.model_inputs(batch)
                p = self.program(torch.from_numpy(ids), torch.from_numpy(dense))
                out[start : start + len(ids)] = p.numpy()
                start += len(ids)
        return out

    def __repr__(self) -> str:
        return f"TorchPredictor({self.source!r}, {PROGRAM}, {len(self.inputs)} inputs)"
