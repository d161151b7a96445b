"""The one helper multi-process tests use: N processes on 127.0.0.1 with free ports, every
exit code checked, each process's return value collected.

::

    from kubeai_train.launch import run_processes

    def _train(steps):                      # top level of an importable module
        info = cluster.current()            # the operator's variables are all set
        ...
        return {"rank": info.rank, "loss": loss}

    res = run_processes(_train, framework="torch", workers=2, kwargs={"steps": 5}, timeout=120)
    res.results["master:0"]["loss"]         # the return values, by process label

It runs the function (or a script) through the real local launcher (``LocalJob``), so the
processes see exactly what they would see under the operator. Parameter servers and
evaluators are stopped when the job succeeds; every other process must exit 0 or ``check``
raises ``JobFailedError`` naming the process, its exit code and the tail of its log.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubeai_train.launch.local import LocalJob, ProcessExit
from kubeai_train.launch.types import JobFailedError, JobSpec, SpecError

__all__ = ["ProcessesResult", "run_processes"]


@dataclass
class ProcessesResult:
    """How a ``run_processes`` job ended.

    Attributes:
        exit_code: the job's exit code (0 = succeeded as the operator defines it).
        exits: how each process ended.
        results: each process's return value by label (``"worker:1"``, ``"master:0.1"``);
            absent for processes that did not return (stopped parameter servers).
        log_dir: the per-process logs.
        job: the ``LocalJob`` that ran.
    """

    exit_code: int
    exits: list[ProcessExit]
    results: dict[str, Any]
    log_dir: Path
    job: LocalJob = field(repr=False)

    def log(self, label: str) -> str:
        """The whole log of one process."""
        ex = next(e for e in self.exits if e.label == label)
        return ex.log_path.read_text(errors="replace")

    def check(self) -> ProcessesResult:
        """Raise ``JobFailedError`` unless the job succeeded and every process that trains
        (not ps / evaluator) exited 0 by itself; returns self."""
        bad = [e for e in self.exits if e.role not in ("ps", "evaluator") and (e.exit_code != 0 or e.stopped)]
        if self.exit_code == 0 and not bad:
            return self
        culprit = next(
            (e for e in self.exits if e.label == self.job.failed), bad[0] if bad else self.exits[0]
        )
        codes = ", ".join(f"{e.label}={e.exit_code}{'(stopped)' if e.stopped else ''}" for e in self.exits)
        tail = self.job.log_tail(culprit.label, 30)
        raise JobFailedError(
            f"job exited with code {self.exit_code}; exit codes: {codes}; last lines of {culprit.label} ({culprit.log_path}):\n{tail}"
        )


def _resolve(target: Callable[..., Any] | str | os.PathLike[str]) -> tuple[dict[str, Any], str | None]:
    """JobSpec kwargs for the target, and a directory to put on PYTHONPATH."""
    if callable(target):
        mod = getattr(target, "__module__", None)
        qual = getattr(target, "__qualname__", "")
        if not mod or mod == "__main__" or "<locals>" in qual:
            raise SpecError(
                f"run_processes needs a top-level function of an importable module, got {target!r}"
            )
        module = sys.modules.get(mod)
        root = None
        file = getattr(module, "__file__", None)
        if file:
            root_path = Path(file).resolve().parent
            for _ in range(mod.count(".")):
                root_path = root_path.parent
            root = str(root_path)
        return {"module": "kubeai_train.launch._runner", "args": (f"{mod}:{qual}",)}, root
    text = os.fspath(target)
    if ":" in text and not text.endswith(".py") and not os.path.exists(text):
        return {"module": "kubeai_train.launch._runner", "args": (text,)}, None
    return {"script": text}, None


def run_processes(
    target: Callable[..., Any] | str | os.PathLike[str],
    *,
    framework: str = "torch",
    workers: int = 2,
    ps: int = 0,
    chief: bool = True,
    evaluator: bool = False,
    nproc_per_node: int = 1,
    args: Sequence[str] = (),
    kwargs: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    log_dir: str | os.PathLike[str] | None = None,
    check: bool = True,
    grace_period: float = 5.0,
    **spec_kwargs: Any,
) -> ProcessesResult:
    """Run ``target`` in every process of a local job and wait for all of them.

    Args:
        target: a top-level function of an importable module (called with ``**kwargs`` in each
            process; its JSON-serialisable return value is collected), a ``"module:function"``
            string, or the path of a script (run with ``args``).
        framework, workers, ps, chief, evaluator, nproc_per_node: the CLI's replica mapping
            (torch ``workers=N``: 1 master + N-1 workers).
        kwargs: JSON-serialisable keyword arguments for the function.
        env: extra environment variables for every process.
        timeout: the whole job is stopped after this many seconds (exit code 124): never hangs.
        log_dir: per-process logs (default a new temporary directory).
        check: raise ``JobFailedError`` unless every training process exited 0.
        **spec_kwargs: more ``JobSpec`` fields (``restart_policy``, ``backoff_limit``, ...).

    Raises:
        JobFailedError: with ``check``, naming the failing process and the tail of its log.
        SpecError: a bad target or job shape.
    """
    run_kw, root = _resolve(target)
    if "script" in run_kw:
        run_kw["args"] = tuple(args)
    job_env = dict(env or {})
    out_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="kubeai-procs-"))
    results_dir = out_dir / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    job_env["KUBEAI_TRAIN_RUNNER_KWARGS"] = json.dumps(dict(kwargs or {}))
    job_env["KUBEAI_TRAIN_RUNNER_OUT"] = str(results_dir)
    if root:
        job_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    spec_kwargs.setdefault("name", "procs")
    spec = JobSpec.from_counts(
        framework,
        workers=workers,
        ps=ps,
        chief=chief,
        evaluator=evaluator,
        nproc_per_node=nproc_per_node,
        env=job_env,
        **run_kw,
        **spec_kwargs,
    )
    if spec.total_replicas * spec.nproc_per_node == 1:
        role, index = spec.replica_keys()[0]
        job_env["KUBEAI_TRAIN_RUNNER_SOLE"] = f"{role}:{index}"
        spec = JobSpec.from_counts(
            framework,
            workers=workers,
            ps=ps,
            chief=chief,
            evaluator=evaluator,
            nproc_per_node=nproc_per_node,
            env=job_env,
            **run_kw,
            **spec_kwargs,
        )
    # success_grace = timeout: workers finish by themselves, so their exit codes mean something
    job = LocalJob(
        spec,
        log_dir=out_dir,
        timeout=timeout,
        success_grace=timeout,
        grace_period=grace_period,
        handle_signals=False,
    )
    code = job.run()
    results: dict[str, Any] = {}
    for path in sorted(results_dir.glob("*.json")):
        label = path.stem.replace("-", ":", 1)
        try:
            results[label] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    res = ProcessesResult(code, job.exits, results, out_dir, job)
    return res.check() if check else res
