"""Version metadata: normalising what a publisher gives into the JSON record stored with a
version, and reading it back.

The record holds ``framework``, ``signature``, ``metrics``, ``params``, ``dataset`` (``uri``,
``partition``, ``digest``), ``code_version`` (the git sha of the working directory when there is
one, ``-dirty`` when it has uncommitted changes), ``parent`` (``{"name", "version"}``),
``created``, ``publisher`` (host, pid) and the ``manifest`` (every file with size and sha256, and
a digest over them). Values that look like secrets (keys named ``*secret*``, ``*password*``,
``*token*``, ``*access_key*``, ``*credential*``; user info in URLs) are redacted before anything
is written: a repository is read by many people.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import socket
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kubeai_train.repository.config import code_version_from_env, redact_url
from kubeai_train.repository.errors import InvalidMetadataError
from kubeai_train.repository.types import FileEntry

__all__ = [
    "FORMAT",
    "METADATA_FILE",
    "RESERVED_KEYS",
    "build_record",
    "detect_framework",
    "git_code_version",
    "manifest_digest",
    "parse_parent",
    "parse_record",
    "record_bytes",
]

#: The metadata file inside every version directory; on object stores it is written last and
#: its presence commits the version.
METADATA_FILE = "_kubeai_version.json"
FORMAT = "kubeai_train.model_version/1"
RESERVED_KEYS = frozenset({"format", "name", "version", "created", "manifest", "publisher"})
_SECRET_KEY = re.compile(r"secret|password|passwd|token|access[_-]?key|credential|api[_-]?key", re.IGNORECASE)
_URLISH = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*@")
REDACTED = "<redacted>"


def _jsonable(value: Any, where: str) -> Any:
    """A JSON-safe copy of ``value``: numpy scalars/arrays, tuples and Paths converted, secrets
    redacted, NaN/inf turned into None; anything else raises naming ``where``."""
    if value is None or isinstance(value, (bool, str, int)):
        if isinstance(value, str) and _URLISH.match(value):
            return redact_url(value)
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidMetadataError(f"metadata key {k!r} at {where} must be a string")
            out[k] = (
                REDACTED if _SECRET_KEY.search(k) and v not in (None, "") else _jsonable(v, f"{where}.{k}")
            )
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays, without importing numpy
    if callable(tolist):
        return _jsonable(tolist(), where)
    raise InvalidMetadataError(
        f"metadata {where} has a {type(value).__name__} ({value!r:.60}); use str, int, float, bool, list or dict"
    )


def _dataset(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        return {"uri": redact_url(str(value)), "partition": None, "digest": None}
    if isinstance(value, Mapping):
        d = _jsonable(value, "dataset")
        for k in ("uri", "partition", "digest"):
            d.setdefault(k, None)
            if d[k] is not None and not isinstance(d[k], str):
                raise InvalidMetadataError(f"metadata dataset.{k} must be a string, got {d[k]!r}")
        return d
    raise InvalidMetadataError(
        f"metadata dataset must be a URI string or a dict with uri/partition/digest, got {value!r:.60}"
    )


def _metrics(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidMetadataError(f"metadata metrics must be a dict of name -> number, got {value!r:.60}")
    out = _jsonable(value, "metrics")
    for k, v in out.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise InvalidMetadataError(f"metric {k!r} must be a number, got {v!r:.60}")
    return out


def parse_parent(value: Any, name: str) -> dict[str, Any] | None:
    """``{"name", "version"}`` from an int (a version of ``name``), ``"model:version"`` or a dict."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidMetadataError(f"parent must be a version number or 'model:version', got {value!r}")
    if isinstance(value, int):
        pname, pver = name, value
    elif isinstance(value, str) and re.fullmatch(r"[^:]+:\d+", value):
        pname, _, v = value.rpartition(":")
        pver = int(v)
    elif isinstance(value, Mapping) and "version" in value:
        pname, pver = str(value.get("name") or name), value["version"]
    else:
        raise InvalidMetadataError(f"parent must be a version number or 'model:version', got {value!r:.60}")
    if not isinstance(pver, int) or isinstance(pver, bool) or pver < 1:
        raise InvalidMetadataError(f"parent version must be an int >= 1, got {pver!r}")
    return {"name": pname, "version": pver}


def git_code_version(cwd: str | os.PathLike[str] | None = None, timeout: float = 5.0) -> str | None:
    """The git sha of ``cwd`` (``-dirty`` appended with uncommitted tracked changes), or None."""
    from_env = code_version_from_env()
    if from_env:
        return from_env
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if sha.returncode != 0 or not re.fullmatch(r"[0-9a-f]{40,64}", sha.stdout.strip()):
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def detect_framework(paths: Iterable[str]) -> str | None:
    """A guess from file names: ``saved_model.pb`` -> tensorflow, ``*.pt``/``*.pth`` -> torch,
    ``*.onnx`` -> onnx; None when nothing matches."""
    names = [p.rsplit("/", 1)[-1] for p in paths]
    if "saved_model.pb" in names:
        return "tensorflow"
    if any(n.endswith((".pt", ".pth")) for n in names):
        return "torch"
    if any(n.endswith(".onnx") for n in names):
        return "onnx"
    return None


def manifest_digest(files: Iterable[FileEntry]) -> str:
    """sha256 over the sorted ``path size sha256`` lines: one value that names the content."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path):
        h.update(f"{f.path}\0{f.size}\0{f.sha256}\n".encode())
    return h.hexdigest()


def build_record(
    name: str,
    version: int,
    manifest: list[FileEntry],
    metadata: Mapping[str, Any] | None,
    *,
    parent: Any = None,
    dataset: Any = None,
    code_version: str | None = None,
    created: _dt.datetime | None = None,
) -> dict[str, Any]:
    """The JSON record of a version. Keyword arguments win over the same keys in ``metadata``.

    ``code_version`` is recorded as given (the caller resolves the git sha once, see
    :func:`git_code_version`); ``parent`` is normalised to ``{"name", "version"}``.

    Raises:
        InvalidMetadataError: a field has the wrong type or a reserved key was given.
    """
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping):
        raise InvalidMetadataError(f"metadata must be a dict, got {type(metadata).__name__}")
    bad = sorted(RESERVED_KEYS & set(metadata))
    if bad:
        raise InvalidMetadataError(
            f"metadata key(s) {', '.join(bad)} are set by the repository; rename them (e.g. put them under 'params')"
        )
    user = _jsonable(metadata, "metadata")
    framework = user.pop("framework", None) or detect_framework(f.path for f in manifest)
    if framework is not None and not isinstance(framework, str):
        raise InvalidMetadataError(f"metadata framework must be a string, got {framework!r}")
    cv = code_version if code_version is not None else user.pop("code_version", None)
    user.pop("code_version", None)
    if cv is not None and not isinstance(cv, str):
        raise InvalidMetadataError(f"code_version must be a string, got {cv!r}")
    params = user.pop("params", None) or {}
    if not isinstance(params, dict):
        raise InvalidMetadataError(f"metadata params must be a dict, got {params!r:.60}")
    record: dict[str, Any] = {
        "format": FORMAT,
        "name": name,
        "version": version,
        "created": (created or _dt.datetime.now(_dt.timezone.utc)).isoformat(timespec="milliseconds"),
        "framework": framework,
        "signature": user.pop("signature", None),
        "metrics": _metrics(user.pop("metrics", None)),
        "params": params,
        "dataset": _dataset(dataset if dataset is not None else user.pop("dataset", None)),
        "code_version": cv,
        "parent": parse_parent(parent if parent is not None else user.pop("parent", None), name),
        "publisher": {"host": socket.gethostname(), "pid": os.getpid()},
    }
    user.pop("dataset", None)
    user.pop("parent", None)
    record.update(user)  # extra keys the publisher chose
    files = sorted(manifest, key=lambda f: f.path)
    record["manifest"] = {
        "files": [f.to_json() for f in files],
        "total_size": sum(f.size for f in files),
        "digest": manifest_digest(files),
    }
    return record


def record_bytes(record: Mapping[str, Any]) -> bytes:
    """The stored form of a record: indented, key-sorted UTF-8 JSON."""
    return (json.dumps(record, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


def parse_record(data: bytes, name: str, version: int) -> tuple[dict[str, Any], tuple[FileEntry, ...]]:
    """Parse a stored record; returns ``(metadata without manifest, manifest)``.

    Raises:
        InvalidMetadataError: the bytes are not a record of ``name``/``version`` or the manifest
            does not match its own digest (a torn or tampered write).
    """
    try:
        record = json.loads(data)
        files = tuple(FileEntry(f["path"], int(f["size"]), f["sha256"]) for f in record["manifest"]["files"])
        digest = record["manifest"]["digest"]
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidMetadataError(f"metadata of {name}/{version} is unreadable: {e}") from e
    if record.get("format") != FORMAT or record.get("name") != name or record.get("version") != version:
        raise InvalidMetadataError(
            f"metadata of {name}/{version} names {record.get('name')!r}/{record.get('version')!r} "
            f"in format {record.get('format')!r}; expected {FORMAT}"
        )
    if manifest_digest(files) != digest:
        raise InvalidMetadataError(f"metadata of {name}/{version}: manifest does not match its digest")
    meta = {k: v for k, v in record.items() if k != "manifest"}
    meta["manifest_digest"] = digest
    return meta, files
