"""Backup workers for DDP: the trainer's side of :meth:`kubeai_train.straggler.BackupWorkers.sit_out`.

DDP's gradient all-reduce is collective: a slow rank cannot be left out of a step once it has
computed. With ``TrainConfig(straggler="backup", backup_workers=b)`` the ranks decide *before*
each step which of them sit it out:

* **Who.** Up to ``b`` ranks the :class:`~kubeai_train.straggler.SlowWorkerDetector` flags
  (slower than ``k`` x the others' median per row for ``m`` steps; the settings are
  ``TrainConfig.adaptive.slow_factor`` / ``slow_steps``), the slowest first, never every rank
  that still holds data. Only flagged ranks, not "always the ``b`` slowest": a rank that sits
  out idles, so with no straggler it would throw away ``b / N`` of the job's compute (TF's
  backup replicas compute and lose only the late gradient; here the loss would be the step).
* **What a sitting rank does.** It takes no batch (its rows stay in its reader: none is lost,
  unlike TF where a dropped gradient's rows were read for nothing), runs a shadow step (a
  dummy row with weight 0, so it joins DDP's all-reduce with a zero gradient and applies the
  same averaged update: replicas and optimizer states stay bit-identical), and meanwhile
  *probes* its speed: a forward pass without gradients over a quarter of its last batch, timed.
  The probe is the only way to see it recover (a rank that never computes is never measured);
  a quarter, so that a rank up to 4x slower probes within the time the others' step takes.
  The probe times forward and loss only, training steps also count taking the input: a probe
  looks slightly faster per row, which errs toward clearing the flag.
* **Weights.** Each training rank scales its summed loss by ``N / (K g)`` (``K`` ranks expected
  to train, ``g`` the reader's batch size): DDP's average over ``N`` is then the mean over the
  kept ranks' rows, the same estimate as a step of ``K`` equal batches.
* **Exchange at no extra collective.** As with ``"adaptive"``: each rank's ``(rows, compute
  seconds)`` of the previous step, whether it sat out and whether its data ran out, ride in the
  input-sync all-reduce the loop issues anyway, so every rank feeds the same numbers to the same
  pure policies and decides the same thing. A decision made during step ``s`` from the timings
  of ``s - 1`` applies to step ``s + 1``.
* **Ends of data.** A rank that sits out keeps its rows; when every other rank has run out, the
  policy keeps it training (it is the last holder). If the others run out in the very step it
  sits out, nobody trains: every rank sees that in the same all-reduce and skips the step (no
  optimizer update), and the next step it trains.

The bias, written down (see also :mod:`kubeai_train.straggler.backup`): while a rank sits out,
steps average ``N - s`` local batches instead of ``N`` (a smaller effective batch, more steps per
epoch). Every row of the epoch is still trained on once: with a static split the slow rank's
rows are learnt from late (after the others' shards ran out, when it trains alone, which also
means the epoch is no shorter); with dynamic assignment the other ranks read the pieces it does
not, so the slow rank's share of the data shrinks -- a lean toward the fast ranks' data when the
shares are not i.i.d. The detector's state is not checkpointed: a resumed job starts with no
rank flagged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kubeai_train.straggler import BackupWorkers, SlowWorkerDetector, StragglerError
from kubeai_train.torch.adaptive import unpack_timings
from kubeai_train.torch.types import AdaptiveBatching, ConfigError

__all__ = ["PROBE_FRACTION", "BackupController", "BackupReport"]

log = logging.getLogger(__name__)

#: Share of its last batch a sitting rank runs forward on to measure its speed.
PROBE_FRACTION = 0.25


@dataclass
class BackupReport:
    """What ``straggler="backup"`` did in a fit (the same on every rank).

    Attributes:
        backup_workers: ``b``.
        batch: rows of a reader batch (a training rank's local batch).
        sat_out: how many steps each rank sat out (index = rank).
        changes: each change of the set sitting out: ``{"step": the first step it applied to,
            "sit_out": [...]}``.
        detections: each change of the slow flags: ``{"step": the step observed, "new": [...],
            "cleared": [...], "ratio": {rank: seconds per row over the others' median}}``.
        skipped: steps nobody trained in (the others ran out while the last holder sat out).
        flagged: ranks flagged slow at the end.
    """

    backup_workers: int
    batch: int
    sat_out: list[int] = field(default_factory=list)
    changes: list[dict[str, Any]] = field(default_factory=list)
    detections: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    flagged: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": "backup",
            "backup_workers": self.backup_workers,
            "batch": self.batch,
            "sat_out": self.sat_out,
            "changes": self.changes,
            "detections": self.detections,
            "skipped": self.skipped,
            "flagged": self.flagged,
        }


class BackupController:
    """The detector and the sit-out policy of one rank, fed the gathered values of every step.

    Args:
        options: the detector's settings (``slow_factor``, ``slow_steps``).
        world: ranks in the job.
        rank: this rank.
        backup: ``b``, how many flagged ranks may sit a step out (1 <= b < world).
        batch: rows of a reader batch (``g``).

    Every rank builds one and calls :meth:`observe` with the same values at the same steps, so
    all of them decide the same sit-out set (pure functions of those values).
    """

    def __init__(self, options: AdaptiveBatching, world: int, rank: int, backup: int, batch: int) -> None:
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ConfigError(f"the reader's batch_size must be an integer >= 1, got {batch!r}")
        try:
            self.policy = BackupWorkers(world, backup)
        except StragglerError as e:
            raise ConfigError(f"straggler='backup': {e}; use backup_workers < world size") from e
        self.detector = SlowWorkerDetector(k=options.slow_factor, m=options.slow_steps)
        self.world = world
        self.rank = rank
        self.batch = batch
        self.report = BackupReport(backup, batch, [0] * world)
        self.sit_out: frozenset[int] = frozenset()  # the set of the next step taken
        self.training = world  # ranks expected to train in it
        self._ratio: dict[int, float] = {}

    def new_pass(self) -> None:
        """A pass over the data starts: every rank holds data again, nobody sits out its first step."""
        self.sit_out = frozenset()
        self.training = self.world

    @property
    def sits_out(self) -> bool:
        """This rank takes no batch in the next step."""
        return self.rank in self.sit_out

    @property
    def loss_scale(self) -> float:
        """The factor on a training rank's *summed* loss: ``N / (K g)``, so DDP's average over
        ``N`` ranks is the mean over the ``K`` training ranks' rows."""
        return self.world / (max(1, self.training) * self.batch)

    @staticmethod
    def probe_rows(rows: int) -> int:
        """Rows of a sitting rank's probe from a batch of ``rows``."""
        return max(1, math.ceil(rows * PROBE_FRACTION))

    def stepped(self, sit_out: frozenset[int]) -> None:
        """A step was taken with ``sit_out`` sitting out (the set at its start: count it)."""
        for r in sit_out:
            self.report.sat_out[r] += 1

    def skipped(self) -> None:
        self.report.skipped += 1

    def observe(
        self, step: int, timings: Sequence[float], exhausted: Sequence[float], applies_from: int
    ) -> str:
        """Feed the gathered ``(rows, seconds)`` of step ``step`` and which ranks' data ran out
        as of the current step; decides the sit-out set of the next step taken
        (``applies_from``). Returns the detector's log line ("" when nothing changed)."""
        line = ""
        ts = unpack_timings(timings)
        if any(t.rows for t in ts):
            det = self.detector.observe(step, ts)
            self._ratio.update(det.ratio)
            if det.new or det.cleared:
                self.report.detections.append(
                    {
                        "step": step,
                        "new": sorted(det.new),
                        "cleared": sorted(det.cleared),
                        "ratio": {w: round(r, 4) for w, r in det.ratio.items()},
                    }
                )
            self.report.flagged = sorted(det.flagged)
            line = det.describe()
        holding = [r for r in range(self.world) if exhausted[r] == 0]
        new = self.policy.sit_out(self.detector.flagged, self._ratio, holding)
        if new != self.sit_out:
            self.report.changes.append({"step": applies_from, "sit_out": sorted(new)})
        self.sit_out = new
        self.training = len(holding) - len(new)
        return line
