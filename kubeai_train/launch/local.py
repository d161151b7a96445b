"""The local target: a job's replicas as supervised processes on this host, like the operator
(plus torchrun for ``nproc_per_node > 1``) would run them as pods.

Guarantees:

* every process gets exactly the operator's variables (``env.local_plan``) with 127.0.0.1 and
  ports reserved through ``_ports`` (no collisions between concurrent launchers);
* every output line is written whole, prefixed ``[role:index] `` (one ``write`` under a lock),
  and the raw output of each process goes to ``<log_dir>/<role>-<index>[.<local>].log``;
* fail fast: when a process fails for good, the others get SIGTERM, SIGKILL after
  ``grace_period``, and ``run()`` returns that process's exit code (signal N -> 128+N) after
  printing the tail of its log;
* success as the operator defines it (successPolicy ""): the job succeeds when the chief (or the
  master, or worker 0 when there is neither; with ``success_policy: AllWorkers`` and no chief,
  every worker) exits 0. Parameter servers and evaluators never exit on their own and are stopped
  then; workers still running get ``success_grace`` seconds to finish, then are stopped, and the
  job still succeeds (the operator marks the job Succeeded at that point too);
* restarts: the restart policy and backoff limit decide (``decide``): ``ExitCode`` retries exit
  codes >= 128 (killed by a signal) and treats 1-127 as permanent, ``OnFailure``/``Always``
  retry any non-zero code (``Always`` does not restart a process that exited 0: it is done),
  ``Never`` none; at most ``backoff_limit`` restarts per job. The failed replica alone is
  restarted (all its processes when ``nproc_per_node > 1``), with the same environment, after
  0.5 s doubling per restart (at most 10 s), like the operator recreating one pod;
* readable output: TensorFlow jobs get ``TF_CPP_MIN_LOG_LEVEL=2`` unless the job or this
  environment sets it, and the lines TensorFlow prints on every CPU-only machine whatever that
  level (the absl pre-init notice, the CUDA stub's "Could not find cuda drivers", cuInit
  failures; ``TF_NOISE``) go to the process's log but not to the terminal;
* a closing line: the job's result, wall time and, when a process published a model
  (``kubeai_train.repository.announce`` through ``KUBEAI_TRAIN_RESULT_FILE``), the version,
  its URI and its metrics;
* CPU binding (``cpu_bind: cores``): each process runs on its share of the launcher's cores
  (``cpus.bind``: disjoint shares, round-robin single cores when there are fewer cores than
  processes), applied with ``sched_setaffinity`` between fork and exec so that the runtimes
  size themselves inside it, with ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` (and TF's
  ``TF_NUM_INTRAOP_THREADS`` / ``TF_NUM_INTEROP_THREADS``) set to its size unless the job or this
  environment sets them; the binding is logged once; a restarted replica keeps its cores;
* no orphans: each process leads its own process group, dies with the launcher
  (``PR_SET_PDEATHSIG``), and a watchdog process kills the groups if the launcher is SIGKILLed;
  SIGINT/SIGTERM to the launcher are forwarded to every group.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from kubeai_train.cluster import DISPATCHER_ENV, PLAN_DIR_ENV
from kubeai_train.launch import cpus as cpumod
from kubeai_train.launch import env as envmod
from kubeai_train.launch._ports import PortLease, reserve_ports
from kubeai_train.launch.types import (
    RESERVED_ENV,
    JobSpec,
    LaunchError,
    ScriptNotFoundError,
    SpecError,
    exit_code_of,
)

__all__ = ["TF_NOISE", "Decision", "LocalJob", "ProcessExit", "decide", "is_retryable", "run_local"]

# Printed by TensorFlow in every process on a machine without CUDA, before (or regardless of)
# TF_CPP_MIN_LOG_LEVEL; matched exactly, so that nothing else is ever hidden.
TF_NOISE = re.compile(
    rb"^(?:WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|[IWE]\d{4} [\d:.]+ +\d+ (?:cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine, GPU will not be used\."
    rb"|cuda_platform\.cc:\d+\] failed call to cuInit: .*"
    rb"|cuda_executor\.cc:\d+\] failed call to cuInit: .*"
    rb"|cuda_diagnostics\.cc:\d+\] .*))\r?\n?$"
)
RESULT_ENV = "KUBEAI_TRAIN_RESULT_FILE"  # kubeai_train.repository.announce writes it

_PR_SET_PDEATHSIG = 1
_prctl: Any
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: the watchdog alone guards against orphans
    _prctl = None


def _child_setup(parent_pid: int, cpus: tuple[int, ...]) -> None:
    # runs in the child between fork and exec: only async-signal-safe-ish calls
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the launcher died before prctl took effect
        os._exit(137)
    if cpus:
        # before exec: OpenMP, MKL and TF size their pools from the mask they start in
        os.sched_setaffinity(0, cpus)


_WATCHDOG = r"""
import os, signal, sys
groups = set()
for line in sys.stdin:
    line = line.strip()
    if line == "done":
        sys.exit(0)
    if line.startswith("+"):
        groups.add(int(line[1:]))
    elif line.startswith("-"):
        groups.discard(int(line[1:]))
# EOF without "done": the launcher died; take its process groups with it
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""


def is_retryable(restart_policy: str, exit_code: int) -> bool:
    """Whether a replica that exited with ``exit_code`` (non-zero) is restarted under the policy.

    ``ExitCode``: codes >= 128 (the process was killed: 128 + signal) are retried, 1-127 are
    permanent (the operator's ``IsRetryableExitCode``); ``OnFailure`` and ``Always``: any failure;
    ``Never``: none.
    """
    if exit_code == 0:
        return False
    if restart_policy == "ExitCode":
        return exit_code >= 128
    return restart_policy in ("OnFailure", "Always")


@dataclass(frozen=True)
class Decision:
    """What the supervisor does next: ``wait``, ``restart`` / ``fail`` a replica, ``succeed``."""

    action: str
    replica: tuple[str, int] | None = None
    exit_code: int = 0


def decide(spec: JobSpec, codes: Mapping[tuple[str, int], tuple[int | None, ...]], restarts: int) -> Decision:
    """The operator's job-level decision on a snapshot, pure.

    Args:
        spec: the job.
        codes: per replica ``(role, index)``, the exit code of each of its processes (None while
            running; container-style, signal N is 128+N).
        restarts: restarts already made in this job.
    """
    for replica, per_proc in codes.items():
        bad = next((c for c in per_proc if c not in (None, 0)), None)
        if bad is None:
            continue
        if is_retryable(spec.restart_policy, bad) and restarts < spec.backoff_limit:
            return Decision("restart", replica, bad)
        return Decision("fail", replica, bad)

    def done(replica: tuple[str, int]) -> bool:
        per_proc = codes.get(replica, ())
        return bool(per_proc) and all(c == 0 for c in per_proc)

    for head in ("chief", "master"):
        if spec.replicas.get(head):
            return Decision("succeed", (head, 0)) if done((head, 0)) else Decision("wait")
    n_workers = spec.replicas.get("worker", 0)
    if spec.success_policy == "AllWorkers":
        if all(done(("worker", i)) for i in range(n_workers)):
            return Decision("succeed", ("worker", n_workers - 1))
        return Decision("wait")
    return Decision("succeed", ("worker", 0)) if done(("worker", 0)) else Decision("wait")


@dataclass
class ProcessExit:
    """How one local process ended."""

    label: str
    role: str
    index: int
    local_rank: int
    exit_code: int | None
    stopped: bool
    restarts: int
    log_path: Path


class _Sink:
    """Writes whole lines to a stream: one write per line, under one lock."""

    def __init__(self, stream: BinaryIO | None, fd: int | None):
        self._lock = threading.Lock()
        self._stream = stream
        self._fd = fd

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._fd is not None:
                view = memoryview(data)
                while view:
                    try:
                        n = os.write(self._fd, view)
                    except InterruptedError:
                        continue
                    except OSError:
                        return  # the reader of our output went away; keep supervising
                    view = view[n:]
            elif self._stream is not None:
                try:
                    self._stream.write(data)
                    self._stream.flush()
                except (OSError, ValueError):
                    return


def _sink_for(stream: BinaryIO | None, default_fd: int) -> _Sink:
    if stream is None:
        return _Sink(None, default_fd)
    try:
        return _Sink(None, stream.fileno())
    except (AttributeError, OSError, ValueError):
        return _Sink(stream, None)


class _Proc:
    def __init__(self, plan: envmod.ProcessPlan, log_path: Path):
        self.plan = plan
        self.log_path = log_path
        self.popen: subprocess.Popen[bytes] | None = None
        self.reader: threading.Thread | None = None
        self.exit_code: int | None = None
        self.stopped = False
        self.cleaned = False
        self.starts = 0


def clean_base_env(base: Mapping[str, str]) -> dict[str, str]:
    """The launcher's environment without any cluster variables it may itself have inherited."""
    return {k: v for k, v in base.items() if not RESERVED_ENV.match(k)}


class LocalJob:
    """One job run as local processes; ``run()`` supervises it to the end.

    Args:
        spec: the job.
        log_dir: where per-process logs go (created); default a new temporary directory.
        output: where prefixed output lines go (a binary stream); default the launcher's stdout.
        errors: where the launcher's own messages go; default the launcher's stderr.
        grace_period: seconds between SIGTERM and SIGKILL when stopping processes.
        success_grace: seconds workers may keep running after the job succeeded.
        timeout: stop everything and return 124 after this many seconds (also
            ``spec.active_deadline_seconds``).
        base_env: the environment processes inherit (default ``os.environ``), cluster variables
            removed.
        restart_delay: seconds before the first restart of a replica, doubling per restart (max 10).
        handle_signals: forward SIGINT/SIGTERM to the job (only when ``run()`` is called in the
            main thread).
        python: the interpreter for ``script`` / ``module`` jobs.
        cpus: the cores ``cpu_bind: cores`` shares out (default the launcher's own affinity,
            ``os.sched_getaffinity(0)``).
    """

    def __init__(
        self,
        spec: JobSpec,
        *,
        log_dir: str | os.PathLike[str] | None = None,
        output: BinaryIO | None = None,
        errors: BinaryIO | None = None,
        grace_period: float = 5.0,
        success_grace: float = 10.0,
        timeout: float | None = None,
        base_env: Mapping[str, str] | None = None,
        restart_delay: float = 0.5,
        handle_signals: bool = True,
        python: str = sys.executable,
        cpus: Sequence[int] | None = None,
    ):
        self.spec = spec
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._out = _sink_for(output, 1)
        self._err = _sink_for(errors, 2)
        self.grace_period = grace_period
        self.success_grace = success_grace
        deadlines = [t for t in (timeout, spec.active_deadline_seconds) if t is not None]
        self.timeout = min(deadlines) if deadlines else None
        self._base_env = clean_base_env(os.environ if base_env is None else base_env)
        self.restart_delay = restart_delay
        self.handle_signals = handle_signals
        self.python = python
        self._cpus = None if cpus is None else tuple(cpus)
        self.restarts = 0
        self.exit_code: int | None = None
        self.failed: str | None = None
        self.ports: list[int] = []
        self.dispatcher_port = 0
        self._procs: list[_Proc] = []
        self._signal: int | None = None
        self._wake = threading.Event()
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._lease: PortLease | None = None
        self._deadline: float | None = None
        self._result_file: Path | None = None

    # -- reporting ----------------------------------------------------------------------------

    def say(self, message: str) -> None:
        """One launcher line on the error stream, prefixed ``[launch]``."""
        self._err.write(f"[launch] {message}\n".encode())

    @property
    def exits(self) -> list[ProcessExit]:
        """How each process ended (valid after ``run()``)."""
        return [
            ProcessExit(
                p.plan.label,
                p.plan.role,
                p.plan.index,
                p.plan.local_rank,
                p.exit_code,
                p.stopped,
                max(0, p.starts - 1),
                p.log_path,
            )
            for p in self._procs
        ]

    def log_tail(self, label: str, lines: int = 20) -> str:
        """The last ``lines`` lines of a process's log."""
        proc = next(p for p in self._procs if p.plan.label == label)
        return _tail(proc.log_path, lines)

    # -- the run ------------------------------------------------------------------------------

    def check_inputs(self) -> None:
        """Raises ScriptNotFoundError when the script is missing, SpecError when ``cpu_bind:
        cores`` cannot be applied here (before anything starts)."""
        if self.spec.script and not Path(self.spec.script).is_file():
            raise ScriptNotFoundError(
                f"script {self.spec.script} not found (cwd {os.getcwd()}): give the path of a Python file"
            )
        if self.spec.cpu_bind == "cores":
            if not hasattr(os, "sched_setaffinity"):
                raise SpecError(
                    f"cpu_bind cores needs os.sched_setaffinity, which {sys.platform} lacks; use cpu_bind none"
                )
            if self._cpus is not None and not self._cpus:
                raise SpecError("cpu_bind cores was given no cpus to share; give at least one")

    def _available_cpus(self) -> tuple[int, ...]:
        if self._cpus is not None:
            return self._cpus
        return tuple(sorted(os.sched_getaffinity(0)))

    def run(self) -> int:
        """Run the job to its end and return its exit code: 0 when it succeeded, else the exit
        code of the process that failed it (124 on timeout, 128+N when the launcher got signal N).

        Raises:
            ScriptNotFoundError: the script does not exist (nothing was started).
            LaunchError: no free ports or the log directory cannot be created.
        """
        self.check_inputs()
        spec = self.spec
        try:
            if self.log_dir is None:
                self.log_dir = Path(tempfile.mkdtemp(prefix=f"kubeai-{spec.name}-"))
            self.log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LaunchError(f"cannot create log dir {self.log_dir}: {e.strerror}") from e
        try:
            # one more than the job's: the data dispatcher's (data.read(assignment="dynamic"))
            self._lease = reserve_ports(len(envmod.ports_needed(spec)) + 1)
        except OSError as e:
            raise LaunchError(f"cannot reserve local ports: {e}") from e
        self.ports = list(self._lease.ports[:-1])
        self.dispatcher_port = self._lease.ports[-1]
        endpoints = envmod.local_endpoints(spec, self.ports)
        plans = envmod.local_plan(spec, endpoints, self.python)
        if spec.cpu_bind == "cores":
            # the job's env and this environment keep their thread variables (as torchrun does)
            keep = {*spec.env, *spec.secret_env, *self._base_env}
            plans = cpumod.bind(plans, self._available_cpus(), spec.framework, keep)
        self._procs = [_Proc(p, self.log_dir / f"{p.label.replace(':', '-')}.log") for p in plans]
        self._result_file = self.log_dir / "published.jsonl"
        try:
            self._result_file.unlink()
        except OSError:
            pass
        self.say(f"{spec.summary()} target=local log_dir={self.log_dir}")
        if spec.cpu_bind == "cores":
            cores = cpumod.format_cpus(self._available_cpus())
            self.say(f"cpu_bind cores over cpus {cores}: {cpumod.describe(plans, spec.framework)}")
        missing = [k for k in spec.secret_env if k not in self._base_env]
        if missing:
            # locally a secret reference is read from this environment under the same name
            self.say(
                f"warning: secret_env {', '.join(missing)} not set in this environment; the processes will not see it"
            )

        started = time.monotonic()
        old_handlers = self._install_signals()
        try:
            self._start_watchdog()
            for proc in self._procs:
                self._spawn(proc)
            code = self._supervise()
        finally:
            self._stop([p for p in self._procs if p.exit_code is None], signal.SIGTERM)
            for proc in self._procs:
                self._cleanup_group(proc)
            self._finish_watchdog()
            self._restore_signals(old_handlers)
            self._lease.release()
        self.exit_code = code
        self.say(self.closing_line(code, time.monotonic() - started))
        return code

    def closing_line(self, code: int, wall: float) -> str:
        """``job NAME succeeded in 25.3s; published ctr/1 (auc 0.7274, logloss 0.5852) at URI``,
        or how it failed."""
        name = self.spec.name
        if code == 0:
            head = f"job {name} succeeded in {wall:.1f}s"
        elif code == 124:
            head = f"job {name} timed out after {wall:.1f}s (exit 124)"
        elif self.failed:
            head = f"job {name} failed in {wall:.1f}s: {self.failed} exited with code {code}"
        else:
            head = f"job {name} stopped after {wall:.1f}s (exit {code})"
        published = _announcements(self._result_file) if self._result_file is not None else []
        if not published:
            return head + ("; no model was published" if code == 0 else "")
        parts = []
        for item in published:
            metrics = ", ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in sorted(
                    item.get("metrics", {}).items(), key=lambda kv: (kv[0] not in ("auc", "logloss"), kv[0])
                )
                if isinstance(v, int | float) and not isinstance(v, bool)
            )
            verb = "already published" if item.get("existing") else "published"
            parts.append(
                f"{verb} {item.get('name')}/{item.get('version')}"
                + (f" ({metrics})" if metrics else "")
                + f" at {item.get('uri')}"
            )
        return head + "; " + "; ".join(parts)

    def _supervise(self) -> int:
        spec = self.spec
        start = time.monotonic()
        self._deadline = None if self.timeout is None else start + self.timeout
        pending_restart: dict[tuple[str, int], float] = {}
        while True:
            if self._signal is not None:
                return self._on_signal(self._signal)
            if self.timeout is not None and time.monotonic() - start > self.timeout:
                self.say(f"job {spec.name} timed out after {self.timeout:g}s; stopping every process")
                self._stop([p for p in self._procs if p.exit_code is None], signal.SIGTERM)
                return 124
            self._poll()
            now = time.monotonic()
            for replica, when in list(pending_restart.items()):
                if now >= when:
                    del pending_restart[replica]
                    for proc in self._replica(replica):
                        self._spawn(proc)
            codes = {
                (role, i): tuple(p.exit_code for p in self._replica((role, i)))
                for role, i in spec.replica_keys()
                if (role, i) not in pending_restart
            }
            decision = decide(spec, codes, self.restarts)
            if decision.action == "restart" and decision.replica is not None:
                replica = decision.replica
                self.restarts += 1
                victims = self._replica(replica)
                failed = next(p for p in victims if p.exit_code not in (None, 0))
                self.say(
                    f"{failed.plan.label} exited with code {decision.exit_code}; restarting {replica[0]}:{replica[1]} "
                    f"(restart {self.restarts} of backoff_limit {spec.backoff_limit}, restart_policy {spec.restart_policy})"
                )
                self._stop([p for p in victims if p.exit_code is None], signal.SIGTERM)
                for p in victims:
                    self._cleanup_group(p)
                    p.popen, p.exit_code, p.stopped, p.cleaned = None, None, False, False
                delay = min(10.0, self.restart_delay * 2 ** (self.restarts - 1))
                pending_restart[replica] = time.monotonic() + delay
            elif decision.action == "fail" and decision.replica is not None:
                return self._on_failure(decision)
            elif decision.action == "succeed" and decision.replica is not None:
                return self._on_success(decision.replica)
            # a process's exit closes its output pipe, which wakes us at once; the timeout only
            # bounds the case of a descendant keeping that pipe open
            self._wake.wait(0.1)
            self._wake.clear()

    def _on_failure(self, decision: Decision) -> int:
        spec = self.spec
        failed = next(
            p for p in self._procs if p.plan.replica == decision.replica and p.exit_code not in (None, 0)
        )
        self.failed = failed.plan.label
        if decision.exit_code and is_retryable(spec.restart_policy, decision.exit_code):
            why = f"backoff_limit {spec.backoff_limit} reached after {self.restarts} restart(s)"
        elif spec.restart_policy == "ExitCode":
            why = "exit codes 1-127 are permanent under restart_policy ExitCode"
        else:
            why = f"restart_policy {spec.restart_policy}"
        self._stop([p for p in self._procs if p.exit_code is None], signal.SIGTERM)
        self._join_reader(failed)
        tail = _tail(failed.log_path, 20)
        lines = "".join(f"[launch]   | {line}\n" for line in tail.splitlines())
        self.say(
            f"{failed.plan.label} exited with code {decision.exit_code}; job {spec.name} failed ({why}). Last lines of {failed.log_path}:"
        )
        if lines:
            self._err.write(lines.encode(errors="replace"))
        return decision.exit_code

    def _on_success(self, replica: tuple[str, int]) -> int:
        spec = self.spec
        label = f"{replica[0]}:{replica[1]}"
        idle = [p for p in self._procs if p.exit_code is None and p.plan.role in ("ps", "evaluator")]
        if idle:
            self.say(
                f"{label} succeeded: job {spec.name} succeeded; stopping {', '.join(p.plan.label for p in idle)} (they never exit on their own)"
            )
            self._stop(idle, signal.SIGTERM)
        else:
            self.say(f"{label} succeeded: job {spec.name} succeeded")
        running = [p for p in self._procs if p.exit_code is None]
        if running:
            self.say(
                f"waiting up to {self.success_grace:g}s for {', '.join(p.plan.label for p in running)} to finish"
            )
            deadline = time.monotonic() + self.success_grace
            if self._deadline is not None:
                deadline = min(deadline, self._deadline)
            while time.monotonic() < deadline and self._signal is None:
                self._poll()
                running = [p for p in self._procs if p.exit_code is None]
                if not running:
                    break
                self._wake.wait(0.02)
                self._wake.clear()
            if running:
                self.say(
                    f"stopping {', '.join(p.plan.label for p in running)} after the success grace period"
                )
                self._stop(running, signal.SIGTERM)
        for p in self._procs:
            if p.exit_code not in (None, 0) and not p.stopped:
                self.say(f"note: {p.plan.label} exited with code {p.exit_code} after the job had succeeded")
        return 0

    def _on_signal(self, signum: int) -> int:
        running = [p for p in self._procs if p.exit_code is None]
        self.say(f"got {signal.Signals(signum).name}; forwarding it to {len(running)} process(es)")
        self._stop(running, signum)
        return 128 + signum

    # -- processes ----------------------------------------------------------------------------

    def _replica(self, replica: tuple[str, int]) -> list[_Proc]:
        return [p for p in self._procs if p.plan.replica == replica]

    def _spawn(self, proc: _Proc) -> None:
        env = dict(self._base_env)
        # locally every task is on 127.0.0.1 with neighbouring ports, so the dispatcher's port
        # cannot be derived from the chief's as on Kubernetes: pass the reserved one (a value
        # in the job's own env wins)
        env[DISPATCHER_ENV] = f"127.0.0.1:{self.dispatcher_port}"
        env.update(proc.plan.env)
        if self.log_dir is not None and PLAN_DIR_ENV not in env:
            # file datasets are planned once per job: rank 0 reads the footers, the others its plan
            env[PLAN_DIR_ENV] = str(self.log_dir / "plans")
        if self.spec.framework == "tf":
            env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        if self._result_file is not None:
            env[RESULT_ENV] = str(self._result_file)
        if proc.plan.nproc > 1 and self.log_dir is not None:
            # torchrun's per-process error file, where torch.distributed.elastic's @record writes
            env["TORCHELASTIC_ERROR_FILE"] = str(self.log_dir / f"{proc.log_path.stem}.error.json")
        proc.starts += 1
        log = open(proc.log_path, "ab")  # noqa: SIM115 - owned by the reader thread
        if proc.starts > 1:
            log.write(f"--- restart {proc.starts - 1} ---\n".encode())
            log.flush()
        parent = os.getpid()
        try:
            proc.popen = subprocess.Popen(
                list(proc.plan.argv),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=lambda: _child_setup(parent, proc.plan.cpus),
                close_fds=True,
            )
        except OSError as e:
            log.close()
            raise LaunchError(f"cannot start {proc.plan.label} ({proc.plan.argv[0]}): {e.strerror}") from e
        except subprocess.SubprocessError as e:  # only _child_setup raises in the child: the affinity
            log.close()
            raise LaunchError(
                f"cannot bind {proc.plan.label} to cpus {cpumod.format_cpus(proc.plan.cpus)} "
                f"(the launcher's cpus changed?): {e}; use cpu_bind none"
            ) from e
        proc.exit_code = None
        proc.stopped = False
        proc.cleaned = False
        self._watch(f"+{proc.popen.pid}")
        prefix = f"[{proc.plan.label}] ".encode()
        proc.reader = threading.Thread(
            target=_pump,
            args=(proc.popen.stdout, log, prefix, self._out, self._wake),
            name=f"out-{proc.plan.label}",
            daemon=True,
        )
        proc.reader.start()

    def _poll(self) -> None:
        for p in self._procs:
            if p.popen is None or p.exit_code is not None:
                continue
            rc = p.popen.poll()
            if rc is not None:
                p.exit_code = exit_code_of(rc)
                self._cleanup_group(p)

    def _cleanup_group(self, proc: _Proc) -> None:
        """Kill what is left of an exited process's group (its own children)."""
        if proc.popen is None or proc.cleaned or proc.popen.poll() is None:
            return
        try:
            os.killpg(proc.popen.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.cleaned = True
        self._join_reader(proc, 2.0)
        self._watch(f"-{proc.popen.pid}")

    def _join_reader(self, proc: _Proc, timeout: float = 2.0) -> None:
        if proc.reader is not None:
            proc.reader.join(timeout)

    def _stop(self, procs: list[_Proc], sig: int) -> None:
        """``sig`` to each process group, SIGKILL after the grace period; reaps them all."""
        procs = [p for p in procs if p.popen is not None and p.exit_code is None]
        if not procs:
            return
        for p in procs:
            p.stopped = True
            _killpg(p, sig)
        deadline = time.monotonic() + self.grace_period
        while time.monotonic() < deadline:
            self._poll()
            if all(p.exit_code is not None for p in procs):
                break
            time.sleep(0.01)
        for p in procs:
            if p.exit_code is None:
                _killpg(p, signal.SIGKILL)
        for p in procs:
            if p.popen is not None and p.exit_code is None:
                try:
                    p.exit_code = exit_code_of(p.popen.wait(timeout=5))
                except subprocess.TimeoutExpired:
                    p.exit_code = 137
            self._cleanup_group(p)

    # -- watchdog and signals -----------------------------------------------------------------

    def _start_watchdog(self) -> None:
        try:
            self._watchdog = subprocess.Popen(
                [self.python, "-I", "-S", "-c", _WATCHDOG],
                stdin=subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as e:
            self.say(f"warning: no orphan watchdog ({e.strerror}); relying on the parent-death signal")
            self._watchdog = None

    def _watch(self, line: str) -> None:
        wd = self._watchdog
        if wd is None or wd.stdin is None:
            return
        try:
            wd.stdin.write(f"{line}\n".encode())
            wd.stdin.flush()
        except (OSError, ValueError):
            self._watchdog = None

    def _finish_watchdog(self) -> None:
        wd = self._watchdog
        if wd is None:
            return
        self._watch("done")
        try:
            if wd.stdin is not None:
                wd.stdin.close()
        except OSError:
            pass
        try:
            wd.wait(timeout=5)
        except subprocess.TimeoutExpired:
            wd.kill()
            wd.wait()
        self._watchdog = None

    def _install_signals(self) -> dict[int, object]:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum: int, frame: object) -> None:
            if self._signal is not None:  # a second signal: no more grace
                for p in self._procs:
                    if p.exit_code is None:
                        _killpg(p, signal.SIGKILL)
            self._signal = signum
            self._wake.set()

        old: dict[int, object] = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, handler)
        return old

    @staticmethod
    def _restore_signals(old: Mapping[int, object]) -> None:
        for sig, h in old.items():
            signal.signal(sig, h)  # type: ignore[arg-type]


def _killpg(proc: _Proc, sig: int) -> None:
    if proc.popen is None:
        return
    try:
        os.killpg(proc.popen.pid, sig)
    except OSError:
        pass


def _pump(pipe: BinaryIO, log: BinaryIO, prefix: bytes, sink: _Sink, wake: threading.Event) -> None:
    """Copy one process's output: raw to its log, prefixed line by line to the sink."""
    try:
        for line in iter(pipe.readline, b""):
            log.write(line)
            log.flush()
            if TF_NOISE.match(line):
                continue  # in the log, not on the terminal
            if not line.endswith(b"\n"):
                line += b"\n"
            sink.write(prefix + line)
    except (OSError, ValueError):
        pass
    finally:
        for f in (pipe, log):
            try:
                f.close()
            except OSError:
                pass
        wake.set()


def _announcements(path: Path) -> list[dict[str, Any]]:
    """What the job's processes published (``kubeai_train.repository.announce``'s lines)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue  # cut by a killed process
        if isinstance(item, dict):
            out.append(item)
    return out


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def run_local(spec: JobSpec, **kwargs: object) -> int:
    """Run ``spec`` as local processes to the end; returns the job's exit code (see ``LocalJob``)."""
    return LocalJob(spec, **kwargs).run()  # type: ignore[arg-type]
