"""The local target under real processes: fail-fast, restarts, orphans, ports, output, signals,
bad input. Every test bounds its waits."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from kubeai_train.launch import JobSpec, LocalJob, cpus, run_processes
from kubeai_train.launch.__main__ import main
from kubeai_train.launch._ports import port_range, reserve_ports

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = [sys.executable, "-m", "kubeai_train.launch"]


def script(tmp_path: Path, body: str, name: str = "job.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def launch(args, timeout=60, **kw):
    return subprocess.run(
        [*LAUNCH, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw
    )


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.integration
def test_every_bad_input_is_one_line_exit_2_before_anything_starts(tmp_path, capsys):
    marker = tmp_path / "started"
    ok = script(tmp_path, f"open({str(marker)!r}, 'w').write('x')\n")
    bad_job = tmp_path / "bad.yaml"
    bad_job.write_text("framework: tf\nworkers: [\n")
    typo_job = tmp_path / "typo.yaml"
    typo_job.write_text(f"framework: tf\nworkers: 2\nscript: {ok}\nbackof_limit: 1\n")
    unreadable = tmp_path / "dir.yaml"
    unreadable.mkdir()
    cases = [
        (["--framework", "jax", "--workers", "2", ok], "framework must be one of tf, torch, got 'jax'"),
        (["--framework", "torch", "--workers", "0", ok], "--workers must be >= 1, got 0"),
        (["--framework", "tf", "--workers", "0", "--no-chief", ok], "--workers must be >= 1"),
        (["--framework", "torch", "--ps", "2", "--workers", "2", ok], "--ps 2 is for tf jobs"),
        (
            ["--framework", "torch", "--workers", "2", "--name", "My_Job", ok],
            "'My_Job' is not a DNS-1035 label",
        ),
        (["--framework", "torch", "--workers", "2", tmp_path / "missing.py"], "missing.py not found"),
        (["--job", tmp_path / "nope.yaml"], "cannot read job file"),
        (["--job", unreadable], "cannot read job file"),
        (["--job", bad_job], "is not valid YAML at line"),
        (["--job", typo_job], "unknown field(s) backof_limit"),
        (["--framework", "torch", "--workers", "two", ok], "invalid int value: 'two'"),
        (["--framework", "torch", "--target", "k8s", "--dry-run", ok], "needs a container image"),
        (["--framework", "torch", "--restart-policy", "Sometimes", ok], "restart_policy must be one of"),
        (["--framework", "torch", "--workers", "2"], "no script given"),
        (["--workerz", "2", ok], "unknown launcher flag --workerz"),
        (["--framework", "torch", "--cpu-bind", "foo", ok], "cpu_bind must be 'none' (every process on"),
    ]
    # three through a real `python -m` process, the rest in-process through the same main()
    for n, (args, needle) in enumerate(cases):
        argv = ["--log-dir", tmp_path / "logs", *args]
        if n in (0, 5, 8):
            res = launch(argv, timeout=30)
            code, out, err = res.returncode, res.stdout, res.stderr
        else:
            code = main([str(a) for a in argv])
            out, err = capsys.readouterr()
        assert code == 2, (args, err)
        lines = err.splitlines()
        assert len(lines) == 1, (args, err)
        assert lines[0].startswith("python -m kubeai_train.launch: error: ") and needle in lines[0], (
            args,
            lines,
        )
        assert out == ""
    assert not marker.exists() and not (tmp_path / "logs").exists()


# -- fail fast ----------------------------------------------------------------------------------

FAILING = """
import os, signal, sys, time
from kubeai_train import cluster
c = cluster.current()
if os.environ.get("STUBBORN") and c.rank == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # needs the SIGKILL after the grace period
if c.rank == 2:
    time.sleep(1.0)
    print("rank 2: giving up", flush=True)
    open(os.environ["FAIL_STAMP"], "w").write(repr(time.time()))
    sys.exit(7)
print(f"rank {c.rank} waiting", flush=True)
time.sleep(120)
"""


@pytest.mark.integration
@pytest.mark.parametrize("stubborn", [False, True])
def test_fail_fast_exits_with_the_failing_code_within_seconds(tmp_path, stubborn):
    job = script(tmp_path, FAILING)
    stamp = tmp_path / "stamp"
    env = {**os.environ, "FAIL_STAMP": str(stamp), **({"STUBBORN": "1"} if stubborn else {})}
    res = launch(
        [
            "--framework",
            "torch",
            "--workers",
            "3",
            "--grace-period",
            "1",
            "--log-dir",
            tmp_path / "logs",
            job,
        ],
        timeout=60,
        env=env,
    )
    ended = time.time()
    assert res.returncode == 7, res.stderr
    elapsed = ended - float(stamp.read_text())
    assert elapsed < 5.0, f"{elapsed:.2f}s from the failing rank to the launcher's exit"
    assert "worker:1 exited with code 7" in res.stderr
    assert "[launch]   | rank 2: giving up" in res.stderr  # the tail of the failing process's log
    assert (tmp_path / "logs" / "worker-1.log").read_text().strip() == "rank 2: giving up"


# -- restarts ---------------------------------------------------------------------------------

RESTARTING = """
import json, os, signal, sys
from pathlib import Path
from kubeai_train import cluster
c = cluster.current()
if c.role == "worker":
    attempts = Path(os.environ["ATTEMPTS"])
    with attempts.open("a") as f:
        f.write(json.dumps({"TF_CONFIG": os.environ.get("TF_CONFIG"), "RANK": os.environ.get("RANK")}) + "\\n")
    n = len(attempts.read_text().splitlines())
    codes = [int(x) for x in os.environ["CODES"].split(",")]
    code = codes[min(n, len(codes)) - 1]
    if code == 137:
        os.kill(os.getpid(), signal.SIGKILL)
    sys.exit(code)
import time
deadline = time.time() + 60
while time.time() < deadline and len(Path(os.environ["ATTEMPTS"]).read_text().splitlines() if Path(os.environ["ATTEMPTS"]).exists() else []) < int(os.environ["WAIT_FOR"]):
    time.sleep(0.05)
"""


def run_restarting(tmp_path, codes, wait_for, **spec_kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    job = script(tmp_path, RESTARTING)
    attempts = tmp_path / "attempts"
    spec = JobSpec.from_counts(
        "tf",
        workers=1,
        script=str(job),
        env={"ATTEMPTS": str(attempts), "CODES": codes, "WAIT_FOR": str(wait_for)},
        **spec_kw,
    )
    err = io.BytesIO()
    lj = LocalJob(
        spec,
        log_dir=tmp_path / "logs",
        output=io.BytesIO(),
        errors=err,
        timeout=60,
        restart_delay=0.05,
        handle_signals=False,
    )
    code = lj.run()
    tries = [json.loads(line) for line in attempts.read_text().splitlines()]
    return code, tries, lj, err.getvalue().decode()


@pytest.mark.integration
def test_exit_code_policy_retries_signals_with_the_same_env(tmp_path):
    code, tries, lj, err = run_restarting(
        tmp_path, "137,0", wait_for=2, restart_policy="ExitCode", backoff_limit=3
    )
    assert code == 0 and len(tries) == 2 and lj.restarts == 1
    assert tries[0] == tries[1] and tries[0]["TF_CONFIG"]  # the replica came back with the same env
    assert "worker:0 exited with code 137; restarting worker:0" in err


@pytest.mark.integration
def test_exit_code_policy_does_not_retry_1_to_127(tmp_path):
    code, tries, lj, err = run_restarting(
        tmp_path, "3", wait_for=99, restart_policy="ExitCode", backoff_limit=3
    )
    assert code == 3 and len(tries) == 1 and lj.restarts == 0
    assert "exit codes 1-127 are permanent" in err


@pytest.mark.integration
def test_backoff_limit_bounds_restarts(tmp_path):
    code, tries, lj, err = run_restarting(
        tmp_path, "137", wait_for=99, restart_policy="ExitCode", backoff_limit=2
    )
    assert code == 137 and len(tries) == 3 and lj.restarts == 2
    assert "backoff_limit 2 reached after 2 restart(s)" in err
    code, tries, lj, _ = run_restarting(
        tmp_path / "b", "1,1,0", wait_for=3, restart_policy="OnFailure", backoff_limit=5
    )
    assert code == 0 and len(tries) == 3


# -- orphans and signals ----------------------------------------------------------------------

FAMILY = """
import os, subprocess, sys, time
from kubeai_train import cluster
c = cluster.current()
kid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
open(os.path.join(os.environ["PIDS"], f"{c.role}{c.index}"), "w").write(f"{os.getpid()} {kid.pid}")
time.sleep(300)
"""


def wait_pids(pid_dir: Path, n: int) -> list[int]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        files = list(pid_dir.iterdir())
        if len(files) == n and all(f.read_text().count(" ") == 1 for f in files):
            return [int(p) for f in files for p in f.read_text().split()]
        time.sleep(0.05)
    raise AssertionError(f"only {len(list(pid_dir.iterdir()))} of {n} processes started")


@pytest.mark.integration
def test_no_orphans_after_sigkill_of_the_launcher(tmp_path):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    job = script(tmp_path, FAMILY)
    proc = subprocess.Popen(
        [*LAUNCH, "--framework", "torch", "--workers", "3", job],
        cwd=ROOT,
        env={**os.environ, "PIDS": str(pid_dir)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        pids = wait_pids(pid_dir, 3)
        assert len(pids) == 6 and not any(gone(p) for p in pids)
        proc.kill()  # SIGKILL: the launcher gets no chance to clean up
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(gone(p) for p in pids):
            time.sleep(0.05)
        assert [p for p in pids if not gone(p)] == []
    finally:
        proc.kill()


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_are_forwarded(tmp_path, sig):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    job = script(tmp_path, FAMILY)
    proc = subprocess.Popen(
        [*LAUNCH, "--framework", "tf", "--workers", "1", "--ps", "1", job],
        cwd=ROOT,
        env={**os.environ, "PIDS": str(pid_dir)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pids = wait_pids(pid_dir, 3)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 128 + sig
        assert f"got {signal.Signals(sig).name}; forwarding it" in err
        assert all(gone(p) for p in pids)
    finally:
        proc.kill()


# -- ports ------------------------------------------------------------------------------------

BINDER = """
import json, os, socket, sys, time
cfg = json.loads(os.environ["TF_CONFIG"])
me = cfg["cluster"][cfg["task"]["type"]][cfg["task"]["index"]]
host, port = me.rsplit(":", 1)
s = socket.socket()
try:
    s.bind((host, int(port)))          # no SO_REUSEADDR: a collision is an error
except OSError as e:
    print("COLLISION", me, e, flush=True)
    sys.exit(3)
s.listen()
print("BOUND", me, flush=True)
time.sleep(1.5)                         # hold it while the other jobs start
"""


@pytest.mark.integration
def test_no_port_collisions_with_10_concurrent_launches(tmp_path):
    job = script(tmp_path, BINDER)
    procs = [
        subprocess.Popen(
            [
                *LAUNCH,
                "--framework",
                "tf",
                "--ps",
                "1",
                "--workers",
                "2",
                "--success-grace",
                "20",
                "--name",
                f"j{i}",
                job,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(10)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err + out
        outs.append(out)
    bound = [line.split()[2] for out in outs for line in out.splitlines() if " BOUND " in line]
    assert len(bound) == 10 * 4 and len(set(bound)) == 40
    lo, hi = port_range()
    assert all(lo <= int(b.rsplit(":", 1)[1]) < hi for b in bound)


def test_port_leases_are_exclusive_until_released(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBEAI_TRAIN_PORT_DIR", str(tmp_path))
    a = reserve_ports(50)
    b = reserve_ports(50)
    assert len(set(a.ports)) == 50 and not set(a.ports) & set(b.ports)
    ledger = json.loads((tmp_path / "ports.json").read_text())
    assert set(map(int, ledger)) == set(a.ports) | set(b.ports)
    a.release()
    assert set(map(int, json.loads((tmp_path / "ports.json").read_text()))) == set(b.ports)
    # a dead owner's reservations are dropped
    ledger = json.loads((tmp_path / "ports.json").read_text())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "ports.json").write_text(json.dumps({k: [dead.pid, v[1]] for k, v in ledger.items()}))
    c = reserve_ports(1)
    assert set(map(int, json.loads((tmp_path / "ports.json").read_text()))) == set(c.ports)
    b.release()
    c.release()


# -- output -----------------------------------------------------------------------------------

CHATTY = """
import os, sys
from kubeai_train import cluster
c = cluster.current()
me = f"{c.role}{c.index}"
out = sys.stdout.buffer
for i in range(400):
    size = 9000 if i % 50 == 0 else 120                 # some lines longer than a pipe buffer
    line = f"{me}-{i}-".encode() + b"x" * size + b"\\n"
    half = len(line) // 2
    out.write(line[:half]); out.flush()                 # lines arrive in pieces
    out.write(line[half:]); out.flush()
out.write(f"{me}-end-no-newline".encode()); out.flush()
"""


@pytest.mark.integration
def test_lines_are_prefixed_whole_and_never_interleaved(tmp_path):
    job = script(tmp_path, CHATTY)
    res = launch(["--framework", "tf", "--workers", "3", "--log-dir", tmp_path / "logs", job], timeout=60)
    assert res.returncode == 0, res.stderr
    pattern = re.compile(r"^\[(chief|worker):(\d)\] (chief|worker)(\d)-(\d+|end-no-newline)-?(x*)$")
    seen: dict[str, list[str]] = {}
    for line in res.stdout.splitlines():
        m = pattern.match(line)
        assert m, line[:200]
        assert (m.group(1), m.group(2)) == (m.group(3), m.group(4)), line[:80]
        seen.setdefault(f"{m.group(1)}{m.group(2)}", []).append(m.group(5))
        if m.group(5) != "end-no-newline":
            assert len(m.group(6)) == (9000 if int(m.group(5)) % 50 == 0 else 120)
    assert sorted(seen) == ["chief0", "worker0", "worker1", "worker2"]
    for steps in seen.values():
        assert steps == [str(i) for i in range(400)] + ["end-no-newline"]
    log = (tmp_path / "logs" / "worker-2.log").read_text()
    assert log.startswith("worker2-0-xxx") and log.endswith("worker2-end-no-newline")


# -- success semantics and the test helper -----------------------------------------------------

SUCCESS = """
import os, sys, time
from kubeai_train import cluster
c = cluster.current()
if c.role == "ps":
    time.sleep(300)                      # parameter servers never exit by themselves
if c.role == "worker" and c.index == 1:
    time.sleep(300)                      # a straggler the success grace period ends
print("done", c.role, c.index, flush=True)
"""


@pytest.mark.integration
def test_chief_success_stops_ps_and_stragglers(tmp_path):
    job = script(tmp_path, SUCCESS)
    t0 = time.monotonic()
    res = launch(
        [
            "--framework",
            "tf",
            "--ps",
            "2",
            "--workers",
            "2",
            "--success-grace",
            "3",
            "--grace-period",
            "1",
            job,
        ],
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - t0 < 30, res.stderr
    assert "chief:0 succeeded: job job succeeded; stopping ps:0, ps:1" in res.stderr, res.stderr
    # worker:0 normally finishes within the grace period; on a loaded machine it may be stopped too
    assert re.search(r"stopping (worker:0, )?worker:1 after the success grace period", res.stderr), res.stderr


def _rank_and_sum(scale):
    import torch
    import torch.distributed as dist

    from kubeai_train import cluster

    info = cluster.current()
    dist.init_process_group("gloo")
    t = torch.tensor([float(info.rank + 1) * scale])
    dist.all_reduce(t)
    dist.destroy_process_group()
    return {"rank": info.rank, "world": info.world_size, "sum": t.item()}


@pytest.mark.integration
def test_run_processes_helper_collects_results_from_a_real_gloo_group(tmp_path):
    res = run_processes(
        _rank_and_sum,
        framework="torch",
        workers=2,
        nproc_per_node=2,
        kwargs={"scale": 2.0},
        timeout=120,
        log_dir=tmp_path,
    )
    assert res.exit_code == 0
    assert sorted(res.results) == ["master:0.0", "master:0.1", "worker:0.0", "worker:0.1"]
    assert sorted(r["rank"] for r in res.results.values()) == [0, 1, 2, 3]
    assert {r["sum"] for r in res.results.values()} == {2.0 * (1 + 2 + 3 + 4)}


def _fails_on_rank_1():
    from kubeai_train import cluster

    if cluster.current().rank == 1:
        raise RuntimeError("rank 1 broke")
    return "ok"


@pytest.mark.integration
def test_run_processes_check_names_the_failing_process(tmp_path):
    from kubeai_train.launch import JobFailedError

    with pytest.raises(JobFailedError) as ei:
        run_processes(_fails_on_rank_1, framework="tf", workers=2, chief=False, timeout=60, log_dir=tmp_path)
    msg = str(ei.value)
    assert "worker:1=1" in msg and "RuntimeError: rank 1 broke" in msg


@pytest.mark.integration
def test_readme_demo_runs_a_real_gloo_all_reduce():
    res = launch(["--framework", "torch", "--workers", "2", "examples/launch_demo.py"], timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("all_reduce over 2 ranks = 3 (ok)") == 2


# -- readable output: framework noise, log level, the closing line -----------------------------

NOISY = """
import os, sys
from kubeai_train import cluster
c = cluster.current()
sys.stderr.write("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
sys.stderr.write("I0000 00:00:1796614675.334843    2583 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.\\n")
sys.stderr.write("E0000 00:00:1796614679.052833    2583 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\\n")
sys.stderr.write("E0000 00:00:1796614679.052833    2583 other.cc:12] a real error that mentions cuInit\\n")
print("level", os.environ.get("TF_CPP_MIN_LOG_LEVEL"), c.role, c.index, flush=True)
"""


@pytest.mark.integration
def test_tensorflow_cpu_noise_stays_in_the_logs_and_the_log_level_defaults(tmp_path):
    job = script(tmp_path, NOISY)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # not inherited
    res = launch(["--framework", "tf", "--workers", "1", "--log-dir", tmp_path / "logs", job], env=env)
    assert res.returncode == 0, res.stderr
    out = res.stdout + res.stderr
    assert not re.search(r"cuda drivers|absl::InitializeLog|cuda_platform", out), out
    assert (
        "[chief:0] E0000 00:00:1796614679.052833    2583 other.cc:12] a real error that mentions cuInit"
        in out
    )
    assert "[chief:0] level 2 chief 0" in out and "[worker:0] level 2 worker 0" in out
    log = (tmp_path / "logs" / "chief-0.log").read_text()
    assert "cudart_stub.cc:31] Could not find cuda drivers" in log and "absl::InitializeLog" in log
    res = launch(["--framework", "tf", "--workers", "1", "--env", "TF_CPP_MIN_LOG_LEVEL=0", job], env=env)
    assert "[chief:0] level 0 chief 0" in res.stdout, res.stderr
    res = launch(["--framework", "tf", "--workers", "1", job], env={**env, "TF_CPP_MIN_LOG_LEVEL": "1"})
    assert "[chief:0] level 1 chief 0" in res.stdout, res.stderr
    res = launch(["--framework", "torch", "--workers", "1", job], env=env)
    assert "[master:0] level None master 0" in res.stdout, res.stderr


PUBLISHER = """
import sys
from kubeai_train import cluster
from kubeai_train.repository import ModelRepository
if cluster.current().is_chief:
    export = sys.argv[2]
    open(export + "/model.bin", "w").write("weights")
    ModelRepository(sys.argv[1]).publish("ctr", export, metadata={"metrics": {"auc": 0.812345, "logloss": 0.5, "rows": 10}})
"""


@pytest.mark.integration
def test_the_last_line_says_what_was_published_where(tmp_path):
    job = script(tmp_path, PUBLISHER)
    export = tmp_path / "export"
    export.mkdir()
    repo = tmp_path / "models"
    for version in (1, 2):
        res = launch(["--framework", "tf", "--workers", "1", job, repo, export])
        assert res.returncode == 0, res.stderr
        last = res.stderr.strip().splitlines()[-1]
        assert re.fullmatch(
            rf"\[launch\] job job succeeded in \d+\.\ds; published ctr/{version} "
            rf"\(auc 0\.8123, logloss 0\.5000, rows 10\) at {re.escape(str(repo))}/ctr/{version}",
            last,
        ), last
    res = launch(["--framework", "torch", "--workers", "1", job, tmp_path / "nowhere", tmp_path / "none"])
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"\[launch\] job job failed in \d+\.\ds: master:0 exited with code 1", last), last
    res = launch(["--framework", "torch", "--workers", "1", script(tmp_path, "print('hi')\n", "noop.py")])
    last = res.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"\[launch\] job noop succeeded in \d+\.\ds; no model was published", last), last


# -- CPU binding ----------------------------------------------------------------------------------

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")

BOUND = """
import json, os, sys, time
from kubeai_train import cluster
c = cluster.current()
names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")
seen = {"cpus": sorted(os.sched_getaffinity(0)), "env": {k: os.environ.get(k) for k in names}}
if os.environ.get("WITH_TORCH"):
    import torch
    seen["torch_threads"] = torch.get_num_threads()
out, me = sys.argv[1], f"{c.role}-{c.index}"
with open(os.path.join(out, me + ".tmp"), "w") as f:
    json.dump(seen, f)
os.replace(os.path.join(out, me + ".tmp"), os.path.join(out, me + ".json"))
deadline = time.time() + 30  # the head stays until everyone has written
while len([n for n in os.listdir(out) if n.endswith(".json")]) < int(sys.argv[2]) and time.time() < deadline:
    time.sleep(0.02)
"""


def _bound_run(tmp_path, name, flags, expect, env=None):
    out = tmp_path / name
    out.mkdir()
    job = script(tmp_path, BOUND, "bound.py")
    base = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    res = launch([*flags, job, out, expect], env={**base, **(env or {})})
    assert res.returncode == 0, res.stderr
    seen = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
    assert len(seen) == expect, (seen, res.stderr)
    return seen, res.stderr


@pytest.mark.integration
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to show disjoint shares")
def test_cpu_bind_cores_gives_each_process_its_own_cores_and_matching_threads(tmp_path):
    avail = sorted(os.sched_getaffinity(0))
    flags = ["--framework", "torch", "--workers", "2", "--cpu-bind", "cores"]
    seen, err = _bound_run(tmp_path, "torch", flags, 2, env={"WITH_TORCH": "1"})
    master, worker = seen["master-0"]["cpus"], seen["worker-0"]["cpus"]
    assert not set(master) & set(worker) and sorted(master + worker) == avail
    assert abs(len(master) - len(worker)) <= 1
    for s in seen.values():
        share = str(len(s["cpus"]))
        assert s["env"]["OMP_NUM_THREADS"] == s["env"]["MKL_NUM_THREADS"] == share
        assert s["torch_threads"] == len(s["cpus"])  # torch sizes its pool from them
        assert s["env"]["TF_NUM_INTRAOP_THREADS"] is None  # a torch job gets torch's variables only
    (line,) = [ln for ln in err.splitlines() if ln.startswith("[launch] cpu_bind cores over cpus ")]
    assert f"master:0 cpus {cpus.format_cpus(master)} threads {len(master)};" in line

    # more processes than cores: single cores, round-robin, TF's variables too; the job's env and
    # the launcher's environment keep theirs
    flags = ["--framework", "tf", "--workers", "2", "--ps", "1", "--cpu-bind", "cores"]
    flags += ["--env", "TF_NUM_INTEROP_THREADS=2"]
    seen, _ = _bound_run(tmp_path, "tf", flags, 4, env={"OMP_NUM_THREADS": "3"})
    order = ["chief-0", "worker-0", "worker-1", "ps-0"]
    assert [seen[k]["cpus"] for k in order] == [list(share) for share in cpus.share_cores(4, avail)]
    assert len({seen[k]["cpus"][0] for k in order}) == min(4, len(avail))  # every core in use
    for s in seen.values():
        assert s["env"] == {
            "OMP_NUM_THREADS": "3",  # the launcher's environment
            "MKL_NUM_THREADS": None,  # follows it
            "TF_NUM_INTRAOP_THREADS": "1",
            "TF_NUM_INTEROP_THREADS": "2",  # the job's
        }

    # the default leaves every process on every core and sets nothing
    seen, err = _bound_run(tmp_path, "none", ["--framework", "torch", "--workers", "2"], 2)
    assert all(s["cpus"] == avail and set(s["env"].values()) == {None} for s in seen.values())
    assert "cpu_bind=" not in err and "[launch] cpu_bind cores" not in err
