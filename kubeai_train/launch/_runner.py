"""Process entry of ``run_processes``: import ``module:function``, call it with the JSON
keyword arguments the helper passed, and store its JSON-serialisable return value.

Run as ``python -m kubeai_train.launch._runner module:function``; reads
``KUBEAI_TRAIN_RUNNER_KWARGS`` (JSON object) and ``KUBEAI_TRAIN_RUNNER_OUT`` (a directory).
The result goes to ``<out>/<role>-<index>[.<local rank>].json``; an exception propagates (the
traceback lands in the process's log and the exit code is 1).
"""

from __future__ import annotations

import importlib
import json
import os
import sys

from kubeai_train import cluster


def label() -> str:
    """This process's label as the launcher prints it (``worker:1``, ``master:0.1``)."""
    info = cluster.current()
    if info.framework == "local":
        return os.environ.get("KUBEAI_TRAIN_RUNNER_SOLE", "local:0")
    base = f"{info.role}:{info.index}"
    return f"{base}.{info.local_rank}" if info.local_world_size > 1 else base


def main(argv: list[str]) -> int:
    if len(argv) != 1 or ":" not in argv[0]:
        sys.stderr.write("usage: python -m kubeai_train.launch._runner module:function\n")
        return 2
    mod_name, _, qualname = argv[0].partition(":")
    obj: object = importlib.import_module(mod_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    kwargs = json.loads(os.environ.get("KUBEAI_TRAIN_RUNNER_KWARGS") or "{}")
    result = obj(**kwargs)  # type: ignore[operator]
    out = os.environ.get("KUBEAI_TRAIN_RUNNER_OUT")
    if out:
        path = os.path.join(out, label().replace(":", "-") + ".json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
