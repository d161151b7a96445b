"""The whole job killed and resumed from its checkpoint: three processes under the local
launcher read with ``assignment="dynamic"`` (one slow), checkpoint their (ids, state) at the
same steps, are all SIGKILLed mid-epoch, and a second job resumes from the last checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kubeai_train.launch import run_processes
from tests.data.dispatch.test_dynamic import write_ids

ENV = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


@pytest.mark.integration
def test_job_killed_mid_epoch_resumes_from_its_checkpoint_every_row_once(tmp_path: Path) -> None:
    ids = write_ids(tmp_path / "d", files=3, rows=1000)
    ckpt = tmp_path / "ckpt"
    kw = {"root": str(tmp_path / "d"), "ckpt": str(ckpt), "every": 4, "slow_rank": 2}
    first = run_processes(
        "tests.data.dispatch._jobs:read_checkpoint_kill",
        framework="torch",
        workers=3,
        kwargs={**kw, "kill_step": 8},
        env=ENV,
        timeout=60,
        check=False,
    )
    logs = "\n".join(first.log(e.label)[-1500:] for e in first.exits)
    assert first.exit_code != 0 and not first.results, logs  # nobody finished
    # SIGKILLed (128 + 9); rank 0, which kills the others first, may be stopped by the launcher
    # (SIGTERM, 128 + 15) before it kills itself: its checkpoint files are written by then
    codes = {e.label: e.exit_code for e in first.exits}
    assert codes["worker:0"] == codes["worker:1"] == 137 and codes["master:0"] in (137, 143), codes
    cut = [json.loads((ckpt / f"step8-rank{r}.json").read_text()) for r in range(3)]
    assert not any((ckpt / f"step12-rank{r}.json").exists() for r in range(3))
    assert [len(c["ids"]) for c in cut] == [8 * 40] * 3
    assert "dispatcher" in cut[0]["state"]["assignment"]  # rank 0's state carries the dispatcher's
    # killed partway through pieces, with rows read past the checkpoint (lost with the job)
    assert any(c["state"]["assignment"]["piece"] is not None for c in cut)

    second = run_processes(
        "tests.data.dispatch._jobs:read_checkpoint_kill",
        framework="torch",
        workers=3,
        kwargs={**kw, "kill_step": 0},
        env=ENV,
        timeout=60,
    )
    assert len(second.results) == 3
    final = [json.loads((ckpt / f"final-rank{r}.json").read_text())["ids"] for r in range(3)]
    for c, f in zip(cut, final, strict=True):
        assert f[: len(c["ids"])] == c["ids"]  # each resumed from its own checkpoint
    every = np.asarray([i for f in final for i in f], dtype=np.int64)
    assert len(every) == len(ids), "rows lost or read twice across the kill"
    np.testing.assert_array_equal(np.sort(every), ids)
