"""Export a trained CTR model as a TorchScript program plus its state_dict, and publish it.

The exported directory (what ``kubeai_train.repository`` stores as one version)::

    model.pt        TorchScript: forward(ids: int64 [B, n_cat], dense: float32 [B, n_dense])
                    -> float32 [B] click probabilities. Dense scaling is inside; hashing is not.
    state_dict.pt   the plain state_dict, for fine-tuning or re-export with the training code
    features.json   CTRFeatures.to_dict(): columns, bucket counts and the declared, versioned
                    preprocessing step raw columns -> ids ({"name": "ctr-fnv1a", "version": 1})
    signature.json  the program's input / output names, dtypes and shapes, and ``raw_inputs``:
                    the raw columns the export as a whole takes (string / float32)

The raw-feature contract (what ``kubeai_train.serving.load_predictor`` serves, the same for a
SavedModel) is the program plus the declared preprocessing; the ids are computed by
``CTRFeatures.model_inputs`` over ``data.convert.hash_ids``, the transform and the hash training
runs, so they are bit-identical. The hash is not inside the program: TorchScript has no bytes
type and no unsigned 64-bit integers, so FNV-1a over UTF-8 would be a per-character loop over
code points relying on signed overflow, both slow and fragile. The program alone
(``torch.jit.load(dir + "/model.pt")``) still serves anyone who computes the ids from
features.json. :func:`export` checks that the program predicts exactly what the live model does
on sample inputs before it returns.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kubeai_train.torch.features import PREPROCESSING, CTRFeatures
from kubeai_train.torch.types import ExportError

__all__ = ["ServingModule", "export", "load", "publish"]

PROGRAM = "model.pt"


class ServingModule(nn.Module):
    """``model(ids, dense) -> logits`` turned into ``(ids, dense) -> probabilities``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(ids, dense))


def export(
    model: nn.Module,
    features: CTRFeatures,
    out_dir: str | os.PathLike[str],
    sample: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Path:
    """Write the program, state_dict and feature spec of ``model`` (a DDP wrapper is unwrapped).

    Args:
        model: ``model(ids, dense) -> logits``, TorchScript-compatible.
        features: the preprocessing the model was trained with.
        out_dir: a new or empty local directory.
        sample: ``(ids, dense)`` to check the program against the live model; default a few
            synthetic rows (nulls, extremes).

    Raises:
        ExportError: the model cannot be scripted, or the program's predictions differ from
            the live model's on ``sample``.
    """
    module = getattr(model, "module", model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise ExportError(f"export directory {out} is not empty: give a new directory")
    # a CPU copy: the live model (maybe on a GPU, maybe still training) is left as it is
    module = copy.deepcopy(module).to("cpu").eval()
    serving = ServingModule(module).eval()
    try:
        program = torch.jit.script(serving)
    except Exception as e:  # TorchScript raises several unrelated types
        raise ExportError(f"{type(module).__name__} is not TorchScript-compatible: {e}") from e
    if sample is None:
        sample = _sample_inputs(features)
    with torch.no_grad():
        live = serving(*sample)
        scripted = program(*sample)
    if not torch.equal(live, scripted):
        diff = float((live - scripted).abs().max())
        raise ExportError(f"the TorchScript program differs from the live model by up to {diff:g}")
    program.save(str(out / PROGRAM))
    torch.save(module.state_dict(), out / "state_dict.pt")
    (out / "features.json").write_text(json.dumps(features.to_dict(), indent=2))
    signature = {
        "inputs": {
            "ids": {
                "dtype": "int64",
                "shape": [-1, len(features.categorical)],
                "columns": list(features.categorical),
            },
            "dense": {
                "dtype": "float32",
                "shape": [-1, len(features.dense)],
                "columns": list(features.dense),
            },
        },
        "outputs": {"probability": {"dtype": "float32", "shape": [-1]}},
        "raw_inputs": {
            **dict.fromkeys(features.categorical, "string"),
            **dict.fromkeys(features.dense, "float32"),
        },
        "preprocessing": dict(PREPROCESSING),
        "program": PROGRAM,
        "format": "torchscript",
        "torch_version": torch.__version__,
    }
    (out / "signature.json").write_text(json.dumps(signature, indent=2))
    return out


def _sample_inputs(features: CTRFeatures, rows: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sizes = torch.tensor(features.sizes, dtype=torch.int64)
    ids = (torch.rand(rows, len(sizes), generator=g) * sizes).to(torch.int64)
    ids[0] = 0  # all null
    dense = torch.randn(rows, len(features.dense), generator=g) * 100
    dense[0] = float("nan")
    return ids, dense


def load(export_dir: str | os.PathLike[str]) -> torch.jit.ScriptModule:
    """The exported program (needs only torch; no kubeai_train model code)."""
    return torch.jit.load(str(Path(export_dir) / PROGRAM), map_location="cpu")


def publish(
    repo_uri: str,
    name: str,
    export_dir: str | os.PathLike[str],
    metrics: Mapping[str, float],
    *,
    dataset: str | Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    lineage: Mapping[str, Any] | None = None,
    parent: int | str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """Publish ``export_dir`` as the next version of ``name`` in the model repository.

    Metadata: ``framework="torch"``, the ``signature`` (its ``format`` is ``torchscript``) and ``features`` written by
    :func:`export`, ``metrics`` (e.g. eval ``auc`` / ``logloss``), ``params`` (hyperparameters),
    ``dataset`` (the training data URI: lineage the repository indexes), ``lineage`` (anything
    else: eval data, steps, rows, world size, checkpoint) and ``parent``; the repository adds
    the code version (git sha). Returns the ModelVersion.
    """
    from kubeai_train.repository import ModelRepository

    out = Path(export_dir)
    metadata = {
        "framework": "torch",
        "signature": json.loads((out / "signature.json").read_text()),
        "features": json.loads((out / "features.json").read_text()),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "params": dict(params or {}),
        "lineage": dict(lineage or {}),
    }
    repo = ModelRepository(repo_uri, storage_options=storage_options)
    return repo.publish(name, str(out), metadata=metadata, dataset=dataset, parent=parent)
