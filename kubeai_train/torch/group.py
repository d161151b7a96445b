"""The process group: which backend, which rendezvous, and how a dead peer becomes an error.

The group comes from :func:`kubeai_train.cluster.current`, so the same script runs under
``python -m kubeai_train.launch --framework torch``, under plain ``torchrun`` and as a
PyTorchJob (all three set ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``; rendezvous
goes through ``env://``, which also joins torchrun's agent store). One process with no cluster
gets a group of one on an in-memory store, so the training code has no special case.

Failure model. A collective on a group whose peer died fails at once on gloo (the socket
closes); one whose peer hangs fails after ``timeout``. Either way every surviving rank gets a
:class:`~kubeai_train.torch.types.PeerFailedError` from :func:`guard`, and :func:`run` exits
with :data:`~kubeai_train.torch.types.RETRYABLE_EXIT_CODE` without calling into the broken
group again (tearing it down can block or abort). The launcher (or the operator's
``restartPolicy``) then restarts the job, which resumes from its last checkpoint.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from kubeai_train import cluster as cluster_mod
from kubeai_train.torch.types import RETRYABLE_EXIT_CODE, ConfigError, PeerFailedError

__all__ = ["DistContext", "guard", "init", "process_group", "run", "shutdown"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
_T = TypeVar("_T")


@dataclass(frozen=True)
class DistContext:
    """The initialised group as the trainer sees it.

    Attributes:
        rank / world_size / local_rank: this process in the job.
        backend: ``"gloo"`` or ``"nccl"``.
        device: where the model and batches live (``cpu`` for gloo, ``cuda:<local_rank>`` for nccl).
        timeout_s: the group's timeout for collectives and rendezvous.
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    timeout_s: float

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def barrier(self, what: str = "barrier") -> None:
        """Wait for every rank; on gloo a monitored barrier names the ranks that did not come."""
        with guard(what):
            if self.backend == "gloo" and self.world_size > 1:
                dist.monitored_barrier(
                    timeout=datetime.timedelta(seconds=self.timeout_s), wait_all_ranks=True
                )
            else:
                dist.barrier()


def _pick_backend(backend: str | None) -> str:
    if backend is None:
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ConfigError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("backend 'nccl' needs CUDA, which this process does not have: use backend='gloo'")
    return backend


def init(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Initialise the default process group for this process's place in the cluster.

    Args:
        backend: ``"gloo"`` / ``"nccl"``; default nccl when CUDA is present, else gloo.
        timeout_s: rendezvous and collective timeout. A rank whose peer hangs raises
            :class:`PeerFailedError` after this long instead of hanging.

    Returns:
        The :class:`DistContext`. Calling ``init`` again while a group exists returns the
        context of that group.

    Raises:
        ConfigError: bad backend or timeout.
        PeerFailedError: the rendezvous did not complete within ``timeout_s``.
        kubeai_train.cluster.ClusterError: inconsistent cluster variables.
    """
    if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or timeout_s <= 0:
        raise ConfigError(f"timeout_s must be a number > 0, got {timeout_s!r}")
    info = cluster_mod.current()
    backend = _pick_backend(backend)
    timeout = datetime.timedelta(seconds=float(timeout_s))
    if dist.is_initialized():
        return _context(backend, info.local_rank, float(timeout_s))
    if backend == "gloo" and info.master_addr in (None, "127.0.0.1", "localhost"):
        # gloo picks the interface of the hostname unless told; on loopback-only set-ups
        # (local launcher, tests) that may not be routable.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    try:
        if info.framework == "torch":
            dist.init_process_group(backend, init_method="env://", timeout=timeout)
        elif info.framework == "local":
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            raise ConfigError(
                f"this process is in a {info.framework!r} cluster (role {info.role!r}); "
                "kubeai_train.torch needs a PyTorchJob/torchrun environment or none"
            )
    except (RuntimeError, TimeoutError) as e:
        raise PeerFailedError(
            f"rendezvous at {info.master_addr}:{info.master_port} as rank {info.rank} of {info.world_size} "
            f"failed within {timeout_s:g}s: {e}"
        ) from e
    ctx = _context(backend, info.local_rank, float(timeout_s))
    log.info(
        "process group up: rank %d/%d backend=%s device=%s master=%s:%s timeout=%gs",
        ctx.rank,
        ctx.world_size,
        backend,
        ctx.device,
        info.master_addr,
        info.master_port,
        timeout_s,
    )
    return ctx


def _context(backend: str, local_rank: int, timeout_s: float) -> DistContext:
    device = torch.device(f"cuda:{local_rank}") if backend == "nccl" else torch.device("cpu")
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        backend=dist.get_backend(),
        device=device,
        timeout_s=timeout_s,
    )


def shutdown(timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Tear the group down (idempotent). Call only on success: after a peer failure
    :func:`run` exits without touching the broken group.

    Every rank meets in a barrier first: a gloo group destroyed while a peer still finishes
    its last collective aborted the process ("terminate called without an active exception",
    exit 134) in about one of three runs of a two-rank DDP job. A peer that does not come
    within ``timeout_s`` is logged and the group is left to the process's exit."""
    if not dist.is_initialized():
        return
    try:
        if dist.get_backend() == "gloo" and dist.get_world_size() > 1:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
        else:
            dist.barrier()
    except RuntimeError as e:
        log.warning(
            "process group shutdown: a peer did not reach the final barrier (%s); not destroying it", e
        )
        return
    dist.destroy_process_group()


@contextmanager
def process_group(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[DistContext]:
    """``with process_group() as ctx:`` -- :func:`init` on entry, :func:`shutdown` on a clean exit."""
    ctx = init(backend, timeout_s)
    ok = False
    try:
        yield ctx
        ok = True
    finally:
        if ok:
            shutdown(ctx.timeout_s)


@contextmanager
def guard(what: str) -> Iterator[None]:
    """Turn a failing collective inside the block into :class:`PeerFailedError`.

    Wrap only code whose RuntimeErrors come from collectives (DDP's backward, all_reduce,
    barriers): gloo reports a dead or hung peer as a plain RuntimeError, so the block's
    extent, not the message text, decides what counts as a peer failure.
    """
    try:
        yield
    except PeerFailedError:
        raise
    except RuntimeError as e:
        rank = dist.get_rank() if dist.is_initialized() else -1
        raise PeerFailedError(f"rank {rank}: {what} failed, a peer died or hangs: {e}") from e


def run(main: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Call ``main(*args, **kwargs)``; on :class:`PeerFailedError` log one line and exit with
    :data:`RETRYABLE_EXIT_CODE` at once (``os._exit``: a broken gloo group aborts the process
    in its destructors otherwise, and its collectives may block)."""
    try:
        return main(*args, **kwargs)
    except PeerFailedError as e:
        print(f"kubeai_train.torch: {e}; exiting with retryable code {RETRYABLE_EXIT_CODE}", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        logging.shutdown()
        os._exit(RETRYABLE_EXIT_CODE)
