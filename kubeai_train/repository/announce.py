"""Telling whoever runs the job which version it published.

A launcher (``python -m kubeai_train.launch``) gives its processes ``KUBEAI_TRAIN_RESULT_FILE``;
every publish (and a trainer that finds its model already published) appends one JSON line there
— name, version, URI (credentials masked), metrics — so the launcher can close with one line
saying what was published where (the launcher reads the lines itself: it imports no repository
code). Without the variable nothing is written.
"""

from __future__ import annotations

import json
import os

from kubeai_train.repository.config import redact_url
from kubeai_train.repository.types import ModelVersion

__all__ = ["RESULT_ENV", "announce"]

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
