"""Static split assignment: each reader's share of an epoch as a pure function of
(splits, reader, epoch, seed).

The splits are put in order (the source's order, or a permutation drawn from (seed, epoch)),
their rows are laid end to end, and that row space is cut into ``world_size`` contiguous
shares whose sizes differ by at most one row; each rank's share is cut the same way among its
``num_workers`` DataLoader workers. A split that straddles a cut becomes two row ranges read
by two readers, so:

* every row is read exactly once per epoch for any world size and worker count;
* shares differ by at most one row (not merely one split), and when there are fewer splits
  than readers, row groups are cut into row ranges so that no reader idles while another has
  rows to spare (a reader idles only when the dataset has fewer rows than readers);
* the cost is at most one extra partial read of a split per cut (a Parquet row range still
  decodes its row group's selected column chunks).

A rank's share does not depend on its number of DataLoader workers, so the union of its
workers' rows is the same with 0, 2 or 8 workers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from kubeai_train.data.types import Assignment, ReaderId, Split

__all__ = ["StaticAssignment", "cut", "order", "share_bounds", "slice_rows"]


def order(splits: Sequence[Split], epoch: int, seed: int | None) -> list[Split]:
    """The epoch's split order: as given when ``seed`` is None, else a permutation of (seed, epoch)."""
    if seed is None:
        return list(splits)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0x5EED])
    perm = rng.permutation(len(splits))
    return [splits[i] for i in perm]


def slice_rows(splits: Sequence[Split], lo: int, hi: int) -> list[Split]:
    """Rows ``[lo, hi)`` of ``splits`` laid end to end, as (sub-)splits."""
    out: list[Split] = []
    pos = 0
    for s in splits:
        n = s.num_rows
        a, z = max(lo - pos, 0), min(hi - pos, n)
        if z > a:
            out.append(
                s if (a == 0 and z == n) else dataclasses.replace(s, start=s.start + a, stop=s.start + z)
            )
        pos += n
        if pos >= hi:
            break
    return out


def share_bounds(total: int, parts: int, index: int) -> tuple[int, int]:
    """Row bounds of part ``index`` of ``parts`` near-equal contiguous parts of ``total`` rows."""
    base, extra = divmod(total, parts)
    lo = index * base + min(index, extra)
    return lo, lo + base + (1 if index < extra else 0)


def cut(splits: Sequence[Split], parts: int, index: int) -> list[Split]:
    """Part ``index`` of ``parts`` near-equal contiguous row ranges of ``splits`` laid end to end."""
    lo, hi = share_bounds(sum(s.num_rows for s in splits), parts, index)
    return slice_rows(splits, lo, hi)


class StaticAssignment(Assignment):
    """Contiguous near-equal row shares by rank, then by DataLoader worker (see module doc)."""

    def assign(self, splits: Sequence[Split], reader: ReaderId, epoch: int, seed: int | None) -> list[Split]:
        ordered = order(splits, epoch, seed)
        share = cut(ordered, reader.world_size, reader.rank)
        if reader.num_workers == 1:
            return share
        return cut(share, reader.num_workers, reader.worker)
