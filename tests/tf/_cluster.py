"""Running TF jobs on real local clusters in the tests, one helper for every test and job script.

Test side: :func:`launch` (``python -m kubeai_train.launch`` as a user runs it) and
:func:`run_cluster` (``kubeai_train.launch.run_processes``), both with hard timeouts so a job
never hangs a test; :func:`launch_on_oss` for a job whose model_dir is on the local OSS server;
the step logs the jobs write (:func:`read_jsonl`, :func:`runs_by_pid`,
:func:`assert_loss_continued`).

Job side (the scripts the launcher runs: ``between_graph/_job.py``, ``coordinator/_job.py`` and
the test files that are their own job): :func:`load_example`, :func:`state_dir`, :func:`once`,
:func:`append_jsonl`, :func:`exit_now`. Those scripts import this module as ``tests.tf._cluster``:
both runners put the checkout first on ``PYTHONPATH`` (which also makes every process of a job
import the checkout's ``kubeai_train``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
EXAMPLES = {
    "between_graph": ROOT / "examples" / "tf_ps_ctr.py",
    "coordinator": ROOT / "examples" / "tf_coord_ctr.py",
}
#: the example scripts with fault injection (see their docstrings)
JOBS = {"between_graph": HERE / "between_graph" / "_job.py", "coordinator": HERE / "coordinator" / "_job.py"}
ROUNDS = HERE / "between_graph" / "_rounds.py"
#: launcher arguments: restart a process that exits with a retryable code
RESTART = ("--restart-policy", "ExitCode")
QUIET = {"TF_CPP_MIN_LOG_LEVEL": "2"}


def _pythonpath() -> str:
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


# ----------------------------------------------------------------------------- test side
@dataclass
class Launched:
    returncode: int
    output: str
    seconds: float


def launch(
    script: Path,
    args: list[str],
    *,
    ps: int = 2,
    workers: int = 2,
    env: dict[str, str] | None = None,
    launcher_args: tuple[str, ...] = (),
    timeout: float = 240,
) -> Launched:
    """``python -m kubeai_train.launch --framework tf ...`` as a user runs it; never hangs."""
    cmd = [
        sys.executable,
        "-m",
        "kubeai_train.launch",
        "--framework",
        "tf",
        "--ps",
        str(ps),
        "--workers",
        str(workers),
        "--env",
        "TF_CPP_MIN_LOG_LEVEL=2",
        "--timeout",
        str(int(timeout - 10)),
        *launcher_args,
    ]
    for k, v in (env or {}).items():
        cmd += ["--env", f"{k}={v}"]
    cmd += [str(script), *args]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(
            cmd,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **QUIET, "PYTHONPATH": _pythonpath()},
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(
            f"job hung: no result after {timeout}s; output tail:\n{str(e.stdout)[-3000:]}"
        ) from e
    return Launched(out.returncode, out.stdout + out.stderr, time.perf_counter() - t0)


def launch_on_oss(
    server: Any,
    monkeypatch: Any,
    script: Path,
    args: list[str],
    *,
    env: dict[str, str],
    timeout: float,
) -> tuple[Launched, dict[str, str]]:
    """:func:`launch` with the OSS credentials of ``server`` in the launcher's environment (as on a
    laptop with OSS credentials), the secret passed as a secret, and restarts on; returns the
    result and the credentials (to check the secret appears nowhere)."""
    creds = server.env()
    for k, v in creds.items():
        monkeypatch.setenv(k, v)
    res = launch(
        script,
        args,
        env=env,
        launcher_args=(*RESTART, "--secret-env", "OSS_ACCESS_KEY_SECRET=oss/secret"),
        timeout=timeout,
    )
    return res, creds


def run_cluster(
    script: Path,
    args: list[str],
    *,
    ps: int = 2,
    workers: int = 2,
    env: dict[str, str] | None = None,
    timeout: float,
    log_dir: Path,
    **spec: Any,
) -> Any:
    """``run_processes`` of ``script`` on a chief, ``ps`` PS and ``workers`` workers; raises
    ``JobFailedError`` (with the failing process's log) unless every trainer exited 0."""
    from kubeai_train.launch import run_processes

    return run_processes(
        script,
        framework="tf",
        workers=workers,
        ps=ps,
        args=args,
        env={**QUIET, "PYTHONPATH": _pythonpath(), **(env or {})},
        timeout=timeout,
        log_dir=log_dir,
        **spec,
    )


def single_process_env() -> dict[str, str]:
    """The environment of a process that runs an example alone (no cluster)."""
    return {**{k: v for k, v in os.environ.items() if k != "TF_CONFIG"}, **QUIET}


def small_args(root: Path, repo: str | Path, model_dir: str | Path, *extra: str) -> list[str]:
    """An example's arguments on the small data set (1000 hash buckets, batches of 256)."""
    return [
        "--train-data",
        str(root / "train"),
        "--eval-data",
        str(root / "eval"),
        "--model-repo",
        str(repo),
        "--model-dir",
        str(model_dir),
        "--hash-buckets",
        "1000",
        "--batch-size",
        "256",
        *extra,
    ]


def tail(text: str, n: int = 60) -> str:
    lines = [ln for ln in text.splitlines() if "I0000" not in ln and "W0000" not in ln]
    return "\n".join(lines[-n:])


def read_jsonl(path: Path) -> list[dict]:
    """The JSON lines a job appended to ``path`` (its step log, its rounds)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def runs_by_pid(steps: list[dict]) -> list[list[dict]]:
    """A step log's lines grouped by the process that wrote them, in the order the runs started
    (a chief restarted after a fault writes a second group)."""
    runs: dict[int, list[dict]] = {}
    for s in steps:
        runs.setdefault(s["pid"], []).append(s)
    return list(runs.values())


def assert_loss_continued(before: list[dict], after: list[dict]) -> None:
    """A restarted chief trains a restored (trained) model: the mean of its logged batch losses
    is below the mean of the first run's. One batch against one batch is noise (it flaked in CI,
    0.5977 vs 0.5934); NaN losses (a step counted without its loss) are left out."""
    b = [s["loss"] for s in before if s["loss"] == s["loss"]]
    a = [s["loss"] for s in after if s["loss"] == s["loss"]]
    assert len(b) >= 5 and len(a) >= 5, (len(b), len(a))
    first, then = float(np.mean(b)), float(np.mean(a))
    assert then < first, f"mean loss after the restore {then:.4f} >= before {first:.4f}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- job side
def load_example(mode: str) -> ModuleType:
    """The example script of ``mode`` (``EXAMPLES``) as a module, to call its ``main`` with hooks."""
    path = EXAMPLES[mode]
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the example {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def state_dir(argv: list[str]) -> Path:
    """Where a job keeps its pid files, step log and fault markers: ``KT_STATE_DIR`` if set (needed
    when ``--model-dir`` is a URL), else the model dir; created."""
    path = Path(os.environ.get("KT_STATE_DIR") or argv[argv.index("--model-dir") + 1])
    path.mkdir(parents=True, exist_ok=True)
    return path


def once(directory: Path, name: str) -> bool:
    """True for the first caller in the whole job (a marker file created exclusively), then False:
    a fault is injected once per job, not again after the restart it causes."""
    try:
        fd = os.open(directory / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def exit_now(code: int) -> NoReturn:
    """Flush stdout and stderr, then ``os._exit(code)``: the jobs end without interpreter shutdown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
