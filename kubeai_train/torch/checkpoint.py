"""Checkpoints: model + optimizer from rank 0, the data position of every rank, one commit point.

Layout under the checkpoint directory (a local path or any fsspec URL)::

    step-000000001200/model.pt          model and optimizer state, step, world size (rank 0)
    step-000000001200/data-00000.json   rank 0's dataset state (one file per rank)
    LATEST                              "step-000000001200": the commit point

Every rank writes its own data file, all ranks meet at a barrier, and only then rank 0 writes
``model.pt`` and replaces ``LATEST``. Each file is written atomically (a temporary name and a
rename on local disks; a single PUT on object stores), so a job killed at any moment resumes
from the last checkpoint whose ``LATEST`` was written and never from a torn one. Replicas are
identical after every step (see ``trainer``), so rank 0's model and optimizer state stand for
all ranks.
"""

from __future__ import annotations

import io
import json
import logging
import os
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from kubeai_train.torch.types import CheckpointError

__all__ = ["Checkpoint", "CheckpointStore"]

log = logging.getLogger(__name__)
LATEST = "LATEST"


@dataclass
class Checkpoint:
    """What a rank gets back on resume: the step, rank 0's model/optimizer state and its own
    data state (plus free-form ``extra`` the trainer keeps, e.g. running loss sums)."""

    step: int
    model: dict[str, Any]
    optimizer: dict[str, Any]
    data: dict[str, Any] | None
    extra: dict[str, Any]
    path: str


class CheckpointStore:
    """Writes and finds checkpoints under ``root`` (see the module docstring).

    Args:
        root: local path or fsspec URL.
        keep: how many committed checkpoints rank 0 keeps; older ones are deleted.
        storage_options: passed to fsspec.
    """

    def __init__(self, root: str, keep: int = 2, storage_options: dict[str, Any] | None = None) -> None:
        self.root = str(root).rstrip("/")
        self.keep = keep
        self.fs, self._base = fsspec.core.url_to_fs(self.root, **(storage_options or {}))
        self.fs.makedirs(self._base, exist_ok=True)

    @staticmethod
    def step_dir(step: int) -> str:
        return f"step-{step:012d}"

    def _path(self, *parts: str) -> str:
        return "/".join([self._base, *parts])

    def _write(self, path: str, data: bytes) -> None:
        if isinstance(self.fs, LocalFileSystem):
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def write_data_state(self, step: int, rank: int, state: dict[str, Any] | None) -> None:
        """Write one rank's data state for ``step`` (every rank, before the barrier)."""
        self.fs.makedirs(self._path(self.step_dir(step)), exist_ok=True)
        self._write(self._path(self.step_dir(step), f"data-{rank:05d}.json"), json.dumps(state).encode())

    def commit(
        self,
        step: int,
        world_size: int,
        model: dict[str, Any],
        optimizer: dict[str, Any],
        extra: dict[str, Any],
    ) -> str:
        """Rank 0, after the barrier: write model.pt, point LATEST at it, drop old checkpoints."""
        buf = io.BytesIO()
        torch.save(
            {"step": step, "world_size": world_size, "model": model, "optimizer": optimizer, "extra": extra},
            buf,
        )
        d = self.step_dir(step)
        self.fs.makedirs(self._path(d), exist_ok=True)
        self._write(self._path(d, "model.pt"), buf.getvalue())
        self._write(self._path(LATEST), d.encode())
        self._gc(keep_newest=d)
        return f"{self.root}/{d}"

    def _gc(self, keep_newest: str) -> None:
        try:
            names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._base, detail=False))
        except FileNotFoundError:
            return
        steps = [n for n in names if n.startswith("step-") and n <= keep_newest]
        for old in steps[: max(0, len(steps) - self.keep)]:
            try:
                self.fs.rm(self._path(old), recursive=True)
            except FileNotFoundError:
                pass

    def latest_step(self) -> int | None:
        """The committed step LATEST points at, or None when there is none."""
        try:
            name = self.fs.cat_file(self._path(LATEST)).decode().strip()
        except FileNotFoundError:
            return None
        try:
            return int(name.removeprefix("step-"))
        except ValueError as e:
            raise CheckpointError(f"{self.root}/{LATEST} holds {name!r}, not a step directory name") from e

    def load(self, rank: int, world_size: int, step: int | None = None) -> Checkpoint | None:
        """Rank ``rank``'s view of checkpoint ``step`` (default: the latest), or None if none.

        Raises:
            CheckpointError: a part is missing, or the checkpoint was written by a job with
                another world size (its per-rank data positions do not map onto this job).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        d = self.step_dir(step)
        try:
            raw = self.fs.cat_file(self._path(d, "model.pt"))
            data_raw = self.fs.cat_file(self._path(d, f"data-{rank:05d}.json"))
        except FileNotFoundError as e:
            raise CheckpointError(
                f"checkpoint {self.root}/{d} is incomplete ({e}); delete it or LATEST"
            ) from e
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)
        if state["world_size"] != world_size:
            raise CheckpointError(
                f"checkpoint {self.root}/{d} was written by {state['world_size']} ranks, this job has "
                f"{world_size}: resume with the same number of workers or start a new checkpoint dir"
            )
        return Checkpoint(
            step=int(state["step"]),
            model=state["model"],
            optimizer=state["optimizer"],
            data=json.loads(data_raw),
            extra=dict(state.get("extra") or {}),
            path=f"{self.root}/{d}",
        )
