"""CPU binding: which cores each process may run on and how many threads its runtimes start.

Without it every process sizes its thread pools from what it can see: torch (OpenMP / MKL) and
TensorFlow (Eigen) start one thread per core of the host, not of the container's CPU limit or of
a fair share of the machine, so co-located replicas oversubscribe the cores. Two pure builders
fix that, one per target:

* local (``cpu_bind: cores``): ``share_cores`` gives every local process a disjoint, contiguous
  share of the launcher's cores, shares differing by at most one core (the first processes, in
  start order, get the extra ones). With fewer cores than processes each process gets one core,
  dealt round-robin (process i -> core i mod n): processes then share cores, evenly. ``bind``
  puts the share on each ``ProcessPlan`` (the local target applies it with
  ``os.sched_setaffinity`` between fork and exec, so every runtime, and every child such as
  DataLoader workers, starts inside it) and sets the thread variables to its size;
* Kubernetes: ``limit_threads`` turns a role's CPU limit into a thread count, rounded up (as the
  downward API rounds ``limits.cpu``), divided among the ``nproc_per_node`` processes of a pod,
  at least 1; no limit, no variables.

The variables (``THREAD_VARS``): ``OMP_NUM_THREADS`` (torch sizes its intra-op pool from it,
libgomp/libiomp their teams), ``MKL_NUM_THREADS``, and for TensorFlow ``TF_NUM_INTRAOP_THREADS``
and ``TF_NUM_INTEROP_THREADS``, which TF 2.21 reads when a session's ConfigProto leaves the
pools at 0 (ours do); both are set to the share, what TF picks by itself on a machine of that
many cores. Each variable is set only when the caller did not name it in ``keep``: a value the
job sets (``env``, ``secret_env``), or the launcher's own environment, always wins, variable by
variable, and a given ``OMP_NUM_THREADS`` also keeps ``MKL_NUM_THREADS`` unset (torch reads the
latter first). torch's inter-op pool has no variable and stays at torch's default.

Cores are logical CPUs as the kernel numbers them; SMT siblings and NUMA nodes are not
considered. Nothing here reads the environment or touches a process.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from fractions import Fraction

from kubeai_train.launch.env import ProcessPlan
from kubeai_train.launch.errors import SpecError

__all__ = [
    "THREAD_VARS",
    "bind",
    "cpu_cores",
    "describe",
    "format_cpus",
    "limit_threads",
    "share_cores",
    "thread_env",
]

THREAD_VARS: Mapping[str, tuple[str, ...]] = {
    "torch": ("OMP_NUM_THREADS", "MKL_NUM_THREADS"),
    "tf": ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"),
}

# a variable left unset when the one it defaults to is the caller's
_FOLLOWS = {"MKL_NUM_THREADS": "OMP_NUM_THREADS"}

_SUFFIX = {
    "": Fraction(1),
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 1000),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
    "Ki": Fraction(2**10),
    "Mi": Fraction(2**20),
    "Gi": Fraction(2**30),
    "Ti": Fraction(2**40),
    "Pi": Fraction(2**50),
    "Ei": Fraction(2**60),
}
# _rules.QUANTITY with groups: the number, a decimal exponent, a suffix
_QUANTITY_PARTS = re.compile(
    r"^[+]?([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([-+]?[0-9]+)|([KMGTPE]i|[numkMGTPE]))?$"
)


def thread_env(framework: str, threads: int, keep: Collection[str] = ()) -> dict[str, str]:
    """The thread variables of ``framework`` set to ``threads``, except those named in ``keep``;
    when ``keep`` names ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` is left unset too, so that it
    follows the kept value (MKL falls back to it, and torch reads ``MKL_NUM_THREADS`` over it:
    setting ours would override the user's ``OMP_NUM_THREADS`` in torch).

    Raises:
        ValueError: ``threads`` < 1 or an unknown framework.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if framework not in THREAD_VARS:
        raise ValueError(f"framework must be one of {', '.join(THREAD_VARS)}, got {framework!r}")
    return {
        k: str(threads)
        for k in THREAD_VARS[framework]
        if k not in keep and not (k in _FOLLOWS and _FOLLOWS[k] in keep)
    }


def share_cores(n: int, cpus: Sequence[int]) -> list[tuple[int, ...]]:
    """``n`` shares of ``cpus`` (in the order given): disjoint and contiguous, sizes differing by
    at most one, the larger first, when ``n <= len(cpus)``; else one core each, round-robin.

    Raises:
        ValueError: ``n`` < 0, or no cpus for a non-empty job.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n and not cpus:
        raise ValueError("no cpus to share")
    cpus = tuple(cpus)
    if n > len(cpus):
        return [(cpus[i % len(cpus)],) for i in range(n)]
    size, extra = divmod(len(cpus), n) if n else (0, 0)
    shares, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        shares.append(cpus[start:end])
        start = end
    return shares


def bind(
    plans: Sequence[ProcessPlan], cpus: Sequence[int], framework: str, keep: Collection[str] = ()
) -> list[ProcessPlan]:
    """``plans`` with a share of ``cpus`` each (``share_cores``, in plan order) and the thread
    variables set to the share's size, except those in ``keep`` (the job's own env and the
    launcher's environment). A torchrun default of ``OMP_NUM_THREADS=1`` already in a plan is
    replaced: the share is the better guess.

    Raises:
        ValueError: no cpus.
    """
    shares = share_cores(len(plans), cpus)
    out = []
    for plan, share in zip(plans, shares, strict=True):
        env = dict(plan.env)
        env.update(thread_env(framework, len(share), keep))
        out.append(replace(plan, env=env, cpus=share))
    return out


def format_cpus(cpus: Sequence[int]) -> str:
    """``0-3,6`` for cores 0, 1, 2, 3, 6 (the kernel's cpulist format)."""
    parts: list[str] = []
    run: list[int] = []
    for c in sorted(set(cpus)):
        if run and c != run[-1] + 1:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(c)
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def describe(plans: Sequence[ProcessPlan], framework: str) -> str:
    """One log line of the binding: each process's cores and thread count, and any thread
    variable whose value differs from it (one the job or the environment set)."""
    items = []
    for p in plans:
        threads = len(p.cpus)
        given = [
            f"{k}={p.env[k]}" for k in THREAD_VARS[framework] if p.env.get(k, str(threads)) != str(threads)
        ]
        items.append(" ".join([f"{p.label} cpus {format_cpus(p.cpus)} threads {threads}", *given]))
    return "; ".join(items)


def cpu_cores(quantity: str) -> Fraction:
    """A Kubernetes CPU quantity (``4``, ``500m``, ``1.5``, ``2e3``) as an exact number of cores.

    Raises:
        SpecError: not a quantity, naming it.
    """
    m = _QUANTITY_PARTS.match(str(quantity).strip())
    if m is None:
        raise SpecError(f"cpu quantity must be like 2, 500m or 1.5, got {quantity!r}")
    number, exponent, suffix = m.group(1), m.group(2), m.group(3) or ""
    value = Fraction(number) * _SUFFIX[suffix]
    return value * Fraction(10) ** int(exponent) if exponent else value


def limit_threads(limit: str | None, nproc: int = 1) -> int | None:
    """Threads per process for a container CPU ``limit`` shared by ``nproc`` processes:
    ``ceil(limit / nproc)``, at least 1; None without a limit (``4`` -> 4, ``500m`` -> 1,
    ``1.5`` -> 2; ``4`` over 2 processes -> 2).

    Raises:
        SpecError: ``limit`` is not a quantity.
        ValueError: ``nproc`` < 1.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if limit is None:
        return None
    return max(1, math.ceil(cpu_cores(limit) / nproc))
