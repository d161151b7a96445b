"""The coordinator example script (``examples/tf_coord_ctr.py``) with real fault injection, run
by the integration tests under the launcher.

PS and worker processes write ``<state>/<role>-<index>.pid``; the chief's step hook appends a
JSON line per hook call to ``<state>/steps.jsonl`` and, once per job (a marker file):

* ``KT_KILL=<role>:<index>:<step>``: SIGKILLs that process at the chief's ``step``-th step;
* ``KT_STEP_SLEEP=<seconds>``: sleeps in every hook call (so faults land mid-run).

``<state>`` is ``KT_STATE_DIR`` if set (needed when ``--model-dir`` is a URL), else the model dir.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from kubeai_train import cluster
from tests.tf._cluster import append_jsonl, exit_now, load_example, once, state_dir


def main() -> int:
    argv = sys.argv[1:]
    model_dir = state_dir(argv)
    info = cluster.current()
    role = "chief" if info.role == "master" else info.role
    if role in ("ps", "worker"):
        (model_dir / f"{role}-{info.index}.pid").write_text(str(os.getpid()))
    kill = os.environ.get("KT_KILL", "")
    sleep = float(os.environ.get("KT_STEP_SLEEP", "0") or 0)

    def hook(step) -> None:
        append_jsonl(
            model_dir / "steps.jsonl",
            {
                "pid": os.getpid(),
                "local_step": step.local_step,
                "global_step": step.global_step,
                "loss": step.loss,
                "examples": step.examples,
                "time": time.time(),
            },
        )
        if kill:
            r, i, s = kill.split(":")
            if step.local_step >= int(s) and once(model_dir, f"killed-{r}-{i}"):
                os.kill(int((model_dir / f"{r}-{i}.pid").read_text()), signal.SIGKILL)
        if sleep:
            time.sleep(sleep)

    return load_example("coordinator").main(argv, hooks=[hook])


if __name__ == "__main__":
    exit_now(main())
