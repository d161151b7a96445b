"""Dynamic dispatch with no user code under the local launcher: rank 0 hosts the dispatcher at
the address the launcher passes, the other ranks find it there; one rank is slow."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.data.dispatch.test_dynamic import write_ids

SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    from kubeai_train import cluster, data

    out = sys.argv[2]
    info = cluster.current()
    # all ranks up before reading (as init_process_group would): otherwise rank 0 may read the
    # whole small epoch before the others have imported pyarrow
    open(os.path.join(out, f"up{info.rank}"), "w").close()
    while len([f for f in os.listdir(out) if f.startswith("up")]) < info.world_size:
        time.sleep(0.01)
    ds = data.read(sys.argv[1], batch_size=50, assignment="dynamic", shuffle=True, seed=4)
    got = []
    for b in ds:
        got.append(b["id"])
        time.sleep(0.06 if info.rank == 2 else 0.02)  # compute-proportional; rank 2 is 3x slower
    np.save(os.path.join(out, f"rank{info.rank}.npy"), np.concatenate(got) if got else np.zeros(0, np.int64))
    print("rank", info.rank, "rows", sum(len(g) for g in got), "dispatcher", os.environ.get("KUBEAI_TRAIN_DISPATCHER"))
    """
)


@pytest.mark.integration
def test_torch_job_under_the_local_launcher_reads_every_row_once(tmp_path: Path) -> None:
    ids = write_ids(tmp_path / "d", files=3, rows=1000)
    script = tmp_path / "reader.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubeai_train.launch",
            "--framework",
            "torch",
            "--workers",
            "3",
            str(script),
            str(tmp_path / "d"),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    parts = [np.load(out / f"rank{r}.npy") for r in range(3)]
    every = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(every), ids)
    assert len(parts[2]) < min(len(parts[0]), len(parts[1])), [len(p) for p in parts]
    assert "dispatcher 127.0.0.1:" in res.stdout
