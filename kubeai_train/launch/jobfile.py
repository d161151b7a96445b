"""YAML job files: reading one, and turning its mapping into a ``JobSpec``.

A job file holds the field names of ``JobSpec``, where ``replicas`` may be replaced by the CLI
shorthand ``workers`` / ``ps`` / ``chief`` / ``evaluator``; ``scheduling`` and ``elastic`` are
nested mappings of their dataclasses' fields. Every problem is one ``JobFileError`` naming the
file (or the ``source`` given) and the field.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from kubeai_train.launch.errors import JobFileError, SpecError
from kubeai_train.launch.parts import Elastic, Scheduling

__all__ = ["from_dict", "read_yaml"]

_SHORTHAND = {"workers", "ps", "chief", "evaluator"}


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """The parsed content of the YAML file at ``path``.

    Raises:
        JobFileError: the file is unreadable or not YAML (with the line of the problem).
    """
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise JobFileError(
            f"cannot read job file {os.fspath(path)}: {getattr(e, 'strerror', None) or e}"
        ) from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise JobFileError(
            f"job file {os.fspath(path)} is not valid YAML{where}: {getattr(e, 'problem', e)}"
        ) from e


def from_dict(spec_cls: Any, data: object, source: str) -> Any:
    """An instance of ``spec_cls`` (``JobSpec``) from a job file's mapping ``data``.

    Raises:
        JobFileError: unknown keys, wrong types or an invalid job, naming ``source``.
    """
    if not isinstance(data, Mapping):
        raise JobFileError(
            f"{source}: a job file must hold a mapping of job fields, got {type(data).__name__}"
        )
    known = {f.name for f in fields(spec_cls)}
    unknown = set(data) - known - _SHORTHAND
    if unknown:
        raise JobFileError(
            f"{source}: unknown field(s) {', '.join(sorted(unknown))}; fields: {', '.join(sorted(known | _SHORTHAND))}"
        )
    kw = {k: v for k, v in data.items() if k in known}
    try:
        if isinstance(kw.get("scheduling"), Mapping):
            kw["scheduling"] = _sub(Scheduling, kw["scheduling"], "scheduling")
        if isinstance(kw.get("elastic"), Mapping):
            kw["elastic"] = _sub(Elastic, kw["elastic"], "elastic")
        for key in ("args", "volumes", "tolerations", "env_from_secrets", "command"):
            if key in kw and kw[key] is not None and not isinstance(kw[key], list | tuple):
                raise SpecError(f"{key} must be a list, got {type(kw[key]).__name__}")
        if "replicas" in kw:
            if set(data) & _SHORTHAND:
                raise SpecError(f"give replicas or {'/'.join(sorted(_SHORTHAND))}, not both")
            if "framework" not in kw:
                raise SpecError("framework is required (tf or torch)")
            return spec_cls(**kw)
        framework = kw.pop("framework", None)
        if framework is None:
            raise SpecError("framework is required (tf or torch)")
        counts = {k: data[k] for k in _SHORTHAND if k in data}
        return spec_cls.from_counts(str(framework), **counts, **kw)
    except JobFileError:
        raise
    except SpecError as e:
        raise JobFileError(f"{source}: {e}") from e
    except TypeError as e:
        raise JobFileError(f"{source}: {e}") from e


def _sub(cls: type, data: Mapping[str, Any], what: str) -> Any:
    allowed = {f.name for f in fields(cls)}
    unknown = set(data) - allowed
    if unknown:
        raise SpecError(f"unknown {what} field(s) {sorted(unknown)}; fields: {', '.join(sorted(allowed))}")
    return cls(**dict(data))
