"""One intra-op thread per process: the test machine has 2 cores shared by many processes, and
OpenMP threads spinning against each other make a 3 ms step take 150 ms."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by every process a test starts
torch.set_num_threads(1)
