"""Publisher processes for the concurrency tests (``python -m tests.repository._workers CMD ...``).

Each command prints one JSON line on stdout when it finishes, so the parent can check results
and exit codes. Exports are made under the given scratch directory.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from kubeai_train.repository import ModelRepository
from tests.repository.conftest import make_export


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"start signal {path} never came")
        time.sleep(0.001)


def race(root: str, commit: str, go: str, count: int, seed_base: int, scratch: str) -> None:
    """Wait for ``go`` to exist, then publish ``count`` versions as fast as possible."""
    repo = ModelRepository(root, commit=commit)
    exports = [make_export(Path(scratch) / f"e{seed_base + i}", seed=seed_base + i) for i in range(count)]
    Path(f"{go}.ready.{seed_base}").touch()
    _wait_for(Path(go))
    out = []
    for i, ex in enumerate(exports):
        mv = repo.publish("ctr", ex, metadata={"params": {"seed": seed_base + i}})
        out.append([mv.version, seed_base + i])
    print(json.dumps(out), flush=True)


def big(root: str, commit: str, src: str) -> None:
    """Publish ``src`` (large; the parent kills this process mid-upload)."""
    repo = ModelRepository(root, commit=commit)
    print(json.dumps({"pid": os.getpid()}), flush=True)
    mv = repo.publish("ctr", src)
    print(json.dumps({"version": mv.version}), flush=True)


def stream(root: str, commit: str, count: int, scratch: str) -> None:
    """Publish ``count`` versions back to back (the parent polls meanwhile)."""
    repo = ModelRepository(root, commit=commit)
    out = []
    for i in range(count):
        ex = make_export(Path(scratch) / f"s{i}", seed=i, size=64 * 1024)
        out.append(repo.publish("ctr", ex).version)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "race":
        race(args[0], args[1], args[2], int(args[3]), int(args[4]), args[5])
    elif cmd == "big":
        big(args[0], args[1], args[2])
    elif cmd == "stream":
        stream(args[0], args[1], int(args[2]), args[3])
    else:
        raise SystemExit(f"unknown command {cmd!r}")
