"""The example script with fault injection, run by the integration tests under the launcher.

Faults are real: ``os.kill(pid, SIGKILL)`` of this process or of a parameter server, once per
job (a marker file in the model dir), triggered from a step hook. Environment:

* ``KT_DIE=<role>:<index>:<step>``: that process kills itself at its ``step``-th local step.
* ``KT_KILL_PS=<index>:<step>``: the chief kills PS ``index`` at its ``step``-th local step.
* ``KT_STEP_SLEEP=<seconds>``: sleep in every hook call (slows training so faults land mid-run).
* ``KT_SLOW=<role>:<index>:<seconds>``: that process alone sleeps in every hook call (a straggler).

Every hook call appends a JSON line (role, rank, pid, steps, loss) to ``<state>/steps.jsonl``;
PS processes write ``<state>/ps-<index>.pid``. ``<state>`` is ``KT_STATE_DIR`` if set (needed when
``--model-dir`` is a URL), else the model dir.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path

from kubeai_train import cluster

ROOT = Path(__file__).resolve().parents[2]


def _example():
    spec = importlib.util.spec_from_file_location("tf_ps_ctr", ROOT / "examples" / "tf_ps_ctr.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    argv = sys.argv[1:]
    model_dir = Path(os.environ.get("KT_STATE_DIR") or argv[argv.index("--model-dir") + 1])
    model_dir.mkdir(parents=True, exist_ok=True)
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

    def once(name: str) -> bool:
        try:
            fd = os.open(model_dir / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def hook(step) -> None:
        with open(model_dir / "steps.jsonl", "a") as f:
            f.write(
                json.dumps(
                    {
                        "role": role,
                        "index": info.index,
                        "rank": step.rank,
                        "pid": os.getpid(),
                        "local_step": step.local_step,
                        "global_step": step.global_step,
                        "loss": step.loss,
                        "time": time.time(),
                    }
                )
                + "\n"
            )
        if die:
            r, i, s = die.split(":")
            if r == role and int(i) == info.index and step.local_step >= int(s) and once(f"died-{r}-{i}"):
                os.kill(os.getpid(), signal.SIGKILL)
        if kill_ps and role == "chief":
            i, s = kill_ps.split(":")
            if step.local_step >= int(s) and once(f"killed-ps-{i}"):
                pid = int((model_dir / f"ps-{i}.pid").read_text())
                os.kill(pid, signal.SIGKILL)
        if sleep:
            time.sleep(sleep)

    return _example().main(argv, hooks=[hook])


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
