"""The between-graph example script with fault injection, run by the integration tests under the
launcher.

Faults are real: ``os.kill(pid, SIGKILL)`` of this process or of a parameter server, once per
job (a marker file in the state dir), triggered from a step hook. Environment:

* ``KT_DIE=<role>:<index>:<step>``: that process kills itself at its ``step``-th local step.
* ``KT_KILL_PS=<index>:<step>``: the chief kills PS ``index`` at its ``step``-th local step.
* ``KT_STEP_SLEEP=<seconds>``: sleep in every hook call (slows training so faults land mid-run).
* ``KT_SLOW=<role>:<index>:<seconds>``: that process alone sleeps in every hook call (a straggler).

Every hook call appends a JSON line (role, rank, pid, steps, loss) to ``<state>/steps.jsonl``;
PS processes write ``<state>/ps-<index>.pid``. ``<state>`` is ``KT_STATE_DIR`` if set (needed when
``--model-dir`` is a URL), else the model dir.
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
    if role == "ps":
        (model_dir / f"ps-{info.index}.pid").write_text(str(os.getpid()))
    die = os.environ.get("KT_DIE", "")
    kill_ps = os.environ.get("KT_KILL_PS", "")
    sleep = float(os.environ.get("KT_STEP_SLEEP", "0") or 0)
    slow_role, slow_index, slow_sleep = (os.environ.get("KT_SLOW") or "::0").split(":")
    if slow_role == role and slow_index == str(info.index):
        sleep += float(slow_sleep)

    def hook(step) -> None:
        append_jsonl(
            model_dir / "steps.jsonl",
            {
                "role": role,
                "index": info.index,
                "rank": step.rank,
                "pid": os.getpid(),
                "local_step": step.local_step,
                "global_step": step.global_step,
                "loss": step.loss,
                "time": time.time(),
            },
        )
        if die:
            r, i, s = die.split(":")
            if (
                r == role
                and int(i) == info.index
                and step.local_step >= int(s)
                and once(model_dir, f"died-{r}-{i}")
            ):
                os.kill(os.getpid(), signal.SIGKILL)
        if kill_ps and role == "chief":
            i, s = kill_ps.split(":")
            if step.local_step >= int(s) and once(model_dir, f"killed-ps-{i}"):
                pid = int((model_dir / f"ps-{i}.pid").read_text())
                os.kill(pid, signal.SIGKILL)
        if sleep:
            time.sleep(sleep)

    return load_example("between_graph").main(argv, hooks=[hook])


if __name__ == "__main__":
    exit_now(main())
