from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch.distributed as dist

from kubeai_train.torch import group as pg
from kubeai_train.torch.types import RETRYABLE_EXIT_CODE, ConfigError, PeerFailedError


def test_single_process_group_of_one(clean_cluster_env):
    with pg.process_group() as ctx:
        assert (ctx.rank, ctx.world_size, ctx.backend, str(ctx.device)) == (0, 1, "gloo", "cpu")
        assert pg.init() == ctx  # idempotent while the group exists
        ctx.barrier()
    assert not dist.is_initialized()


def test_bad_arguments(clean_cluster_env):
    with pytest.raises(ConfigError, match="backend must be 'gloo' or 'nccl', got 'mpi'"):
        pg.init(backend="mpi")
    with pytest.raises(ConfigError, match="timeout_s must be a number > 0, got 0"):
        pg.init(timeout_s=0)


def test_guard_turns_collective_errors_into_peer_failures():
    with pytest.raises(PeerFailedError, match="all_reduce failed, a peer died or hangs: boom") as ei:
        with pg.guard("all_reduce"):
            raise RuntimeError("boom")
    assert isinstance(ei.value.__cause__, RuntimeError)
    with pytest.raises(KeyError), pg.guard("x"):
        raise KeyError("not a collective error")


def test_run_exits_retryable_on_peer_failure():
    code = textwrap.dedent(
        """
        from kubeai_train.torch import run, PeerFailedError
        def main():
            raise PeerFailedError("rank 1 gone")
        run(main)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == RETRYABLE_EXIT_CODE
    assert "rank 1 gone; exiting with retryable code 143" in proc.stderr


def test_rendezvous_timeout_when_a_peer_never_comes(clean_cluster_env):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "WORLD_SIZE": "2",
    }.items():
        clean_cluster_env.setenv(k, v)
    with pytest.raises(PeerFailedError, match=r"rendezvous at 127.0.0.1:\d+ as rank 0 of 2 failed within 2s"):
        pg.init(timeout_s=2)
    assert not dist.is_initialized()


def test_refuses_a_tf_cluster(clean_cluster_env):
    clean_cluster_env.setenv(
        "TF_CONFIG", '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}'
    )
    with pytest.raises(ConfigError, match="kubeai_train.torch needs a PyTorchJob/torchrun environment"):
        pg.init()
