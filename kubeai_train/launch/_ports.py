"""Free TCP ports for local jobs that never collide, even when many launchers start at once.

Binding port 0 and closing the socket is not enough: the port is free again the moment it is
closed, a concurrent launcher (or any program binding port 0, or an outgoing connection) may get
it before our child binds it, seconds later, after importing TensorFlow. So:

* ports are drawn at random from a range *below* the kernel's ephemeral range
  (``/proc/sys/net/ipv4/ip_local_port_range``), which bind(0) and outgoing connections never
  use;
* a candidate must be bindable right now on the host (no listener, no TIME_WAIT);
* the choice is recorded, under an exclusive ``flock``, in a ledger file shared by every
  launcher of this user on this host, with the owner's pid and an expiry; other launchers skip
  recorded ports until the owner releases them, dies, or the lease expires.

The ledger lives in ``$KUBEAI_TRAIN_PORT_DIR`` (default ``<tmp>/kubeai_train-<uid>``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import random
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["PortLease", "reserve_ports"]

_DEFAULT_LEASE_S = 6 * 3600.0


def _ephemeral_low() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return low


def port_range() -> tuple[int, int]:
    """``[lo, hi)`` of ports handed out: just below the ephemeral range."""
    low = _ephemeral_low()
    hi = max(low, 12000)
    return max(1024, hi - 12000), hi


def _ledger_dir() -> Path:
    d = os.environ.get("KUBEAI_TRAIN_PORT_DIR") or os.path.join(
        tempfile.gettempdir(), f"kubeai_train-{os.getuid()}"
    )
    path = Path(d)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked_ledger() -> Iterator[dict[str, list[float]]]:
    d = _ledger_dir()
    with open(d / "ports.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        path = d / "ports.json"
        try:
            ledger = json.loads(path.read_text()) if path.exists() else {}
            if not isinstance(ledger, dict):
                ledger = {}
        except (OSError, ValueError):
            ledger = {}  # a torn/corrupt ledger only costs the reservations it held
        now = time.time()
        ledger = {
            p: v
            for p, v in ledger.items()
            if isinstance(v, list) and len(v) == 2 and v[1] > now and _alive(int(v[0]))
        }
        yield ledger
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(ledger))
        os.replace(tmp, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _bindable(port: int, host: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                return False
            raise
    return True


class PortLease:
    """Ports reserved for one job; ``release()`` (or leaving the ``with`` block) frees them."""

    def __init__(self, ports: list[int]):
        self.ports = ports
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        with _locked_ledger() as ledger:
            for p in self.ports:
                ledger.pop(str(p), None)

    def __enter__(self) -> PortLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def reserve_ports(n: int, host: str = "127.0.0.1", lease_s: float = _DEFAULT_LEASE_S) -> PortLease:
    """Reserve ``n`` distinct ports that are free on ``host`` and not held by another launcher.

    Raises:
        OSError: no free port could be found in the range after many tries.
    """
    lo, hi = port_range()
    rng = random.SystemRandom()
    with _locked_ledger() as ledger:
        chosen: list[int] = []
        tries = 0
        while len(chosen) < n:
            tries += 1
            if tries > 50 * n + 1000:
                raise OSError(errno.EADDRINUSE, f"no free port in {lo}..{hi - 1} after {tries} tries")
            port = rng.randrange(lo, hi)
            if str(port) in ledger or port in chosen or not _bindable(port, host):
                continue
            chosen.append(port)
        expiry = time.time() + lease_s
        for p in chosen:
            ledger[str(p)] = [os.getpid(), expiry]
    return PortLease(chosen)
