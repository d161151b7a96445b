"""The one place kubeai_train.tf imports TensorFlow: quietly, on a CPU-only machine.

On a machine without CUDA, ``import tensorflow`` prints lines that ``TF_CPP_MIN_LOG_LEVEL`` cannot
silence, because they are written before TensorFlow's logging reads it: absl's "All log messages
before absl::InitializeLog() is called are written to STDERR" and cudart_stub's "Could not find
cuda drivers on your machine, GPU will not be used." (twice: once from
libtensorflow_framework.so.2, once from the profiler plugin), then, at the first device
initialisation, cuda_platform's "failed call to cuInit: ...". Every process of a job printed them.

:func:`import_tensorflow` imports TensorFlow and initialises its devices while fd 2 is a pipe; a
thread forwards every line to the real stderr except exactly those lines (:data:`NOISE`), so
nothing else is lost: not a Python traceback if the import fails, not a line another thread writes
meanwhile. Importing this module calls it (``kubeai_train/tf/__init__.py`` imports this module
first), so the package's modules find TensorFlow in ``sys.modules``. When TensorFlow was imported before (by the user's code), nothing
is redirected and the lines have been printed already.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from typing import Any

__all__ = ["NOISE", "import_tensorflow", "is_noise"]

# TensorFlow's C++ INFO/WARNING lines (rendezvous cancellations at every PS shutdown, ...) drown
# the training log; errors still show. Takes effect when TensorFlow is not imported yet; set
# TF_CPP_MIN_LOG_LEVEL=0 yourself to see everything.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: the exact start-up lines dropped (narrow on purpose: any other line, even from the same
#: source files, is forwarded).
NOISE = (
    re.compile(r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"),
    re.compile(
        r"I0000 [\d:. ]+ +\d+ cudart_stub\.cc:\d+\] "
        r"Could not find cuda drivers on your machine, GPU will not be used\."
    ),
    re.compile(r"E0000 [\d:. ]+ +\d+ cuda_platform\.cc:\d+\] failed call to cuInit: .*"),
    re.compile(r"I0000 [\d:. ]+ +\d+ port\.cc:\d+\] oneDNN custom operations are on\. .*"),
)

#: seconds to wait for the forwarding thread after fd 2 is restored (it ends at once unless
#: something kept a copy of the pipe, e.g. a child process started during the import)
_JOIN_SECONDS = 5.0


def is_noise(line: str) -> bool:
    """True for one of TensorFlow's CPU-only start-up lines (:data:`NOISE`), without its newline."""
    return any(p.fullmatch(line) for p in NOISE)


def _forward(read_fd: int, out_fd: int) -> None:
    pending = b""
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            kept = [ln + b"\n" for ln in lines if not is_noise(ln.decode("utf-8", "replace"))]
            if kept:
                os.write(out_fd, b"".join(kept))
    if pending and not is_noise(pending.decode("utf-8", "replace")):
        os.write(out_fd, pending)


def import_tensorflow() -> Any:
    """Import TensorFlow (and initialise its devices) without its CPU-only start-up noise.

    Returns:
        The ``tensorflow`` module.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    sys.stderr.flush()
    saved = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    thread = threading.Thread(target=_forward, args=(read_fd, saved), name="kubeai-tf-stderr", daemon=True)
    thread.start()
    try:
        import tensorflow as tf

        tf.config.list_physical_devices()  # the cuInit line comes at the first device query
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the thread reads EOF and ends
        thread.join(_JOIN_SECONDS)
        if not thread.is_alive():  # else it still forwards to ``saved``: leave it open
            os.close(saved)
    return tf


tf = import_tensorflow()
