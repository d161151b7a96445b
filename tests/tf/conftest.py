"""Shared set-up of the tf tests: generated CTR data and a launcher runner with hard timeouts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pytest

from kubeai_train.testing import ctr

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tf_ps_ctr.py"
JOB = Path(__file__).resolve().parent / "_job.py"
ROUNDS = Path(__file__).resolve().parent / "_rounds.py"


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
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(
            f"job hung: no result after {timeout}s; output tail:\n{str(e.stdout)[-3000:]}"
        ) from e
    return Launched(out.returncode, out.stdout + out.stderr, time.perf_counter() - t0)


def tail(text: str, n: int = 60) -> str:
    lines = [ln for ln in text.splitlines() if "I0000" not in ln and "W0000" not in ln]
    return "\n".join(lines[-n:])


@pytest.fixture(scope="session")
def ctr_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctr_e2e")
    report = ctr.generate_split(150_000, 30_000, root, seed=11, files=4, eval_files=2)
    return root, report


@pytest.fixture(scope="session")
def ctr_small(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctr_small")
    report = ctr.generate_split(40_000, 5_000, root, seed=12, files=4, eval_files=1)
    return root, report


@pytest.fixture
def mem_dir():
    """A fresh ``ModelDir`` on memory:// (fsspec-only: TensorFlow cannot write it), removed after."""
    from kubeai_train.tf.model_dir import ModelDir

    url = f"memory://t-{uuid.uuid4().hex[:8]}/job"
    yield ModelDir(url)
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


def values_equal(a, b) -> bool:
    """Element-wise equality of two equally long lists of arrays / scalars / bytes."""
    return all(
        np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y for x, y in zip(a, b, strict=True)
    )


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
