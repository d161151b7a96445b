"""Telling whoever runs the job which version it published.

A launcher (``python -m kubeai_train.launch``) gives its processes ``KUBEAI_TRAIN_RESULT_FILE``;
every publish (and a trainer that finds its model already published) appends one JSON line there
— name, version, URI (credentials masked), metrics — so the launcher can close with one line
saying what was published where. Without the variable nothing is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kubeai_train.repository.config import redact_url
from kubeai_train.repository.types import ModelVersion

__all__ = ["RESULT_ENV", "announce", "read_announcements"]

RESULT_ENV = "KUBEAI_TRAIN_RESULT_FILE"


def announce(mv: ModelVersion, *, existing: bool = False) -> None:
    """Append ``mv`` to ``$KUBEAI_TRAIN_RESULT_FILE`` when it is set; ``existing`` marks a version
    that was published before (a re-run found it). Never raises: reporting must not fail a job."""
    path = os.environ.get(RESULT_ENV)
    if not path:
        return
    line = {
        "name": mv.name,
        "version": mv.version,
        "uri": redact_url(mv.uri),
        "metrics": {k: v for k, v in mv.metrics.items() if isinstance(v, int | float | str)},
        "existing": existing,
    }
    try:
        with open(path, "a", encoding="utf-8") as f:  # one short append: whole lines
            f.write(json.dumps(line, sort_keys=True) + "\n")
    except OSError:
        pass


def read_announcements(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The announced versions in ``path``, in order (``[]`` when it does not exist)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue  # a line cut by a killed process
        if isinstance(item, dict):
            out.append(item)
    return out
