"""``load_predictor``: a version of the model repository (or an export directory) -> a Predictor.

Resolving a version goes through :class:`kubeai_train.repository.ModelRepository` (numbers,
aliases, the newest committed version); what kind of export it is comes from its files, the one
thing that cannot disagree with what will be loaded. The framework is imported only then, so a
service loading SavedModels needs no torch and the other way round; a missing one is an error
saying what to install.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubeai_train.repository import ModelRepository
from kubeai_train.repository.metadata import METADATA_FILE, parse_record
from kubeai_train.serving.types import ExportFormatError, MissingDependencyError, Predictor, ServingError

__all__ = ["detect_format", "load_predictor"]

log = logging.getLogger("kubeai_train.serving")

#: a file whose presence says what an export directory is
SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
TORCH_FILES = ("model.pt", "features.json")


def detect_format(export_dir: str | os.PathLike[str]) -> str:
    """``"saved_model"`` or ``"torchscript"``: the kind of export in a local directory.

    Raises:
        ExportFormatError: it is neither (names the directory and what it holds).
    """
    d = Path(export_dir)
    if not d.is_dir():
        raise ExportFormatError(f"{d} is not a directory: give an export (version) directory")
    if any((d / f).is_file() for f in SAVED_MODEL_FILES):
        return "saved_model"
    if all((d / f).is_file() for f in TORCH_FILES):
        return "torchscript"
    held = sorted(p.name for p in d.iterdir())
    raise ExportFormatError(
        f"{d} is neither a SavedModel (saved_model.pb) nor a torch export (model.pt + features.json); "
        f"it holds {held[:12]}"
    )


def _version_args(version: int | str | None) -> dict[str, Any]:
    if version is None or version == "latest":
        return {}
    if isinstance(version, str) and version.isdigit():
        return {"version": int(version)}
    if isinstance(version, str):
        return {"alias": version}
    return {"version": version}


def _local_metadata(d: Path) -> dict[str, Any]:
    """The repository record beside an export (a version directory or a download), else {}."""
    record = d / METADATA_FILE
    if not record.is_file():
        return {}
    try:
        data = record.read_bytes()
        head = json.loads(data)
        meta, _ = parse_record(data, head.get("name"), head.get("version"))
    except (OSError, ValueError, AttributeError) as e:
        log.warning("ignoring unreadable %s: %s", record, e)
        return {}
    return dict(meta)


def _open(fmt: str, export_dir: Path, source: str, metadata: Mapping[str, Any], batch_size: int) -> Predictor:
    framework, extra = ("torch", "torch") if fmt == "torchscript" else ("tensorflow", "tf")
    try:
        if fmt == "torchscript":
            from kubeai_train.serving.torch_export import TorchPredictor as cls
        else:
            from kubeai_train.serving.saved_model import SavedModelPredictor as cls  # type: ignore[assignment]
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != framework:
            raise
        raise MissingDependencyError(
            f"{source} is a {fmt} export; loading it needs {framework}: pip install 'kubeai_train[{extra}]'"
        ) from e
    return cls(export_dir, source=source, metadata=metadata, batch_size=batch_size)


def load_predictor(
    uri: str | os.PathLike[str],
    name: str | None = None,
    version: int | str | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    verify: bool = False,
    batch_size: int = 4096,
) -> Predictor:
    """Load a model export as a :class:`Predictor` of raw rows, whichever framework trained it.

    Two ways to name the export:

    * ``load_predictor(root, "ctr", "production")``: a version of model ``name`` in the model
      repository at ``root`` (a local path or any fsspec URL). ``version`` is a number, an alias,
      or None / ``"latest"`` for the newest committed version. A version on a remote store is
      downloaded first into a temporary directory, every file checked against the manifest's
      sha256, and removed once the model is in memory.
    * ``load_predictor("/models/ctr/3")``: an export directory (a repository version directory
      or what an exporter wrote), local or an fsspec URL (copied to a temporary directory).

    The kind is read from the files: ``saved_model.pb`` is a SavedModel (served through its
    ``serving_default`` signature); ``model.pt`` + ``features.json`` is a torch export (its
    declared preprocessing, then the TorchScript program).

    Args:
        uri: the repository root (with ``name``) or the export directory (without).
        name: the model name in the repository.
        version: with ``name``: a version number, an alias, or None / ``"latest"``.
        storage_options: fsspec options for a remote ``uri``.
        verify: also check every file's sha256 of a local repository version before loading it
            (remote versions are always checked as they download).
        batch_size: rows per framework call inside :meth:`Predictor.predict`.

    Returns:
        The predictor; its ``metadata`` is the version's repository record (metrics, lineage).

    Raises:
        kubeai_train.repository.RepositoryError: the model, version or alias does not exist, or
            a file does not match its manifest (see :meth:`ModelRepository.get`).
        ExportFormatError: the directory is not an export this code loads.
        MissingDependencyError: the export's framework is not installed (says what to install).
        ServingError: ``version`` without ``name``, or a bad ``batch_size``.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ServingError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    target = os.fspath(uri)
    tmp: str | None = None
    try:
        if name is not None:
            repo = ModelRepository(target, storage_options)
            mv = repo.get(name, **_version_args(version))
            source, metadata = f"{name}/{mv.version} at {repo.root_uri}", dict(mv.metadata)
            if "://" in mv.uri:
                tmp = tempfile.mkdtemp(prefix="kubeai-predictor-")
                export_dir = repo.download(name, mv.version, Path(tmp) / "version", overwrite=True)
            else:
                if verify:
                    repo.verify(name, mv.version)
                export_dir = Path(mv.uri)
        else:
            if version is not None:
                raise ServingError(
                    f"version={version!r} needs name=: load_predictor(root, name, version), or pass the version directory"
                )
            source = target
            if "://" in target:
                import fsspec

                tmp = tempfile.mkdtemp(prefix="kubeai-predictor-")
                fs, path = fsspec.core.url_to_fs(target, **dict(storage_options or {}))
                fs.get(path.rstrip("/") + "/", str(Path(tmp) / "export") + "/", recursive=True)
                export_dir = Path(tmp) / "export"
            else:
                export_dir = Path(target)
            metadata = _local_metadata(export_dir)
        fmt = detect_format(export_dir)
        predictor = _open(fmt, export_dir, source, metadata, batch_size)
    finally:
        if tmp is not None:  # both frameworks hold the whole model in memory once loaded
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("loaded %s (%s): %d raw inputs", source, fmt, len(predictor.inputs))
    return predictor
