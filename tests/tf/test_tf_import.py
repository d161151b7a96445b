"""kubeai_train.tf imports TensorFlow once, without its CPU-only CUDA / absl start-up lines."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from kubeai_train.tf import _tf

ROOT = Path(__file__).resolve().parents[2]

# in a fresh interpreter: a thread writes a real line to fd 2 while the import redirects it
# (stderr goes to a regular file, so "fd 2 is a pipe" means "inside the window")
PROBE = r"""
import os, stat, sys, threading, time
seen = threading.Event()
def writer():
    while not stat.S_ISFIFO(os.fstat(2).st_mode):
        if "kubeai_train.tf" in sys.modules and sys.modules["kubeai_train.tf"].__dict__.get("run"):
            return
        time.sleep(0.001)
    os.write(2, b"a real line from a thread\n")
    seen.set()
t = threading.Thread(target=writer, daemon=True)
t.start()
import kubeai_train.tf
t.join(30)
print("in window:", seen.is_set())
sys.stderr.write("after the import\n")
"""


def test_import_prints_no_cuda_or_absl_line_and_keeps_real_lines(tmp_path):
    err = tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = str(ROOT)
    with open(err, "w") as f:
        out = subprocess.run(
            [sys.executable, "-c", PROBE], stdout=subprocess.PIPE, stderr=f, text=True, env=env, timeout=120
        )
    text = err.read_text()
    assert out.returncode == 0, text
    assert out.stdout.strip() == "in window: True"
    for word in ("cuda", "cuInit", "absl::InitializeLog"):
        assert word not in text, text
    assert text.splitlines() == ["a real line from a thread", "after the import"]


def test_forward_drops_exactly_the_noise_lines():
    lines = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1796617480.217968   13629 cudart_stub.cc:31] Could not find cuda drivers on your "
        "machine, GPU will not be used.",
        "E0000 00:00:1796617480.217968   13629 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
        "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
        "W0000 00:00:1796617480.217968   13629 cudart_stub.cc:31] something else about cuda drivers",
        "Traceback (most recent call last):",
        "ImportError: a real failure",
    ]
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    t = threading.Thread(target=_tf._forward, args=(r, out_w))
    t.start()
    os.write(w, ("\n".join(lines) + "\nno newline at the end").encode())
    os.close(w)
    t.join(10)
    os.close(out_w)
    with os.fdopen(out_r, "rb") as f:
        got = f.read().decode()
    assert got.splitlines() == lines[3:] + ["no newline at the end"]
    assert not t.is_alive()
