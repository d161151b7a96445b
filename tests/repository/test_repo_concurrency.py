"""Concurrency and faults of ModelRepository: racing publishers, kill -9 mid-publish, a fast
poller during many publishes. Every backend of conftest.py runs them; where the storage is
shared between processes (local disk, a server) publishers are real processes, on
``memory://`` (one process's memory) they are threads. Both commit protocols run on local disk
(``commit="marker"`` is the object-store protocol), so the object-store protocol is exercised
by real processes too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kubeai_train.repository import ModelRepository, RepositoryError, VersionNotFoundError
from kubeai_train.repository._storage import Store
from kubeai_train.repository.repo import KDIR

from ._workers import stream
from .conftest import RepoRoot, make_export

REPO_DIR = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def spawn(*args: object) -> subprocess.Popen:
    """Start ``python -m tests.repository._workers ARGS`` from the repository checkout."""
    env = dict(os.environ, PYTHONPATH=str(REPO_DIR) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.repository._workers", *map(str, args)],
        cwd=REPO_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(procs: list[subprocess.Popen], timeout: float = 90.0) -> list[str]:
    """Wait for every process; fail (killing the rest) on a timeout or a non-zero exit code."""
    outs = []
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert p.returncode == 0, f"worker {p.args[3:]} exited {p.returncode}: {err[-2000:]}"
            outs.append(out.strip().splitlines()[-1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    return outs


def wait_until(cond, timeout: float, what: str, interval: float = 0.001) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def run_threads(targets: list, timeout: float = 90.0) -> list:
    """Run callables in threads; return their results, re-raising the first exception."""
    results: list = [None] * len(targets)
    errors: list[BaseException] = []

    def wrap(i, fn):
        try:
            results[i] = fn()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i, fn), daemon=True) for i, fn in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a publisher thread hung"
    if errors:
        raise errors[0]
    return results


# ------------------------------------------------------------------------------------ racing
def test_racing_publishers_get_distinct_versions(repo_root: RepoRoot, commit: str, tmp_path: Path):
    n_pub, per = (3, 2) if repo_root.remote else (4, 3)
    repo = repo_root.repo(commit=commit)
    go = tmp_path / "go"
    if repo_root.cross_process:
        procs = [
            spawn("race", repo_root.url, commit, go, per, 100 * i, tmp_path / f"w{i}") for i in range(n_pub)
        ]
        try:
            wait_until(
                lambda: len(list(tmp_path.glob("go.ready.*"))) == n_pub, 60, "publishers to be ready", 0.01
            )
        except AssertionError:
            finish(procs, timeout=1)
            raise
        go.touch()
        results = [json.loads(out) for out in finish(procs)]
    else:
        barrier = threading.Barrier(n_pub)

        def publisher(i: int):
            def run():
                r = ModelRepository(repo_root.url, commit=commit)
                exports = [
                    make_export(tmp_path / f"w{i}" / f"e{100 * i + k}", seed=100 * i + k) for k in range(per)
                ]
                barrier.wait(30)
                return [
                    [r.publish("ctr", ex, metadata={"params": {"seed": 100 * i + k}}).version, 100 * i + k]
                    for k, ex in enumerate(exports)
                ]

            return run

        results = run_threads([publisher(i) for i in range(n_pub)])
    pairs = [tuple(p) for r in results for p in r]
    versions = sorted(v for v, _ in pairs)
    assert len(set(versions)) == n_pub * per, f"two publishers shared a version: {versions}"
    for v, seed in pairs:
        mv = repo.verify("ctr", v)
        assert mv.metadata["params"]["seed"] == seed
        expected = hashlib.sha256(b"graph-" + str(seed).encode()).hexdigest()
        assert {f.path: f.sha256 for f in mv.manifest}["saved_model.pb"] == expected
    assert [mv.version for mv in repo.versions("ctr")] == versions
    if repo.mode == "rename":
        assert versions == list(range(1, n_pub * per + 1))  # the loser of a rename takes the next number
    assert repo.gc(grace_seconds=0).removed_debris == []  # racing left no claims or staging behind


# ------------------------------------------------------------------------------------ kill -9
def _debris(repo: ModelRepository, name: str) -> dict[str, int]:
    scan = repo._tree.scan(name)
    return {
        "staging": len(scan.staging),
        "uncommitted_files": sum(len(f) for f in scan.uncommitted.values()),
        "claims": len(scan.claims),
    }


def _has_partial_upload(repo: ModelRepository) -> bool:
    store, mdir = repo._tree.store, repo._tree.mdir("ctr")
    if repo.mode == "rename":
        return len(store.tree(Store.join(mdir, KDIR, "staging"))) >= 2
    return any(v for v in repo._tree.scan("ctr").uncommitted.values())


def test_publisher_killed_mid_upload_leaves_nothing_visible(
    repo_root: RepoRoot, commit: str, tmp_path: Path, monkeypatch
):
    repo = repo_root.repo(commit=commit)
    first = repo.publish("ctr", make_export(tmp_path / "small"))
    big = tmp_path / "big"
    big.mkdir()
    for i in range(16 if repo_root.remote else 48):
        (big / f"part-{i:03d}").write_bytes(os.urandom(512 * 1024))

    stalled = threading.Event()
    release = threading.Event()
    if repo_root.cross_process:
        proc = spawn("big", repo_root.url, commit, big)
        try:
            wait_until(
                lambda: _has_partial_upload(repo) or proc.poll() is not None, 60, "the upload to start"
            )
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == -signal.SIGKILL, "the publisher finished before it could be killed"
    else:
        # One process's memory cannot outlive a kill -9 of that process; a publisher thread
        # frozen mid-upload is what other readers of the same storage see in that case.
        real_copy = Store.copy_in
        calls = {"n": 0}

        def freezing_copy(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == 3:
                stalled.set()
                release.wait(60)
            return real_copy(self, *a, **k)

        monkeypatch.setattr(Store, "copy_in", freezing_copy)
        frozen: dict = {}

        def publish():
            try:
                ModelRepository(repo_root.url, commit=commit).publish("ctr", big)
            except BaseException as e:
                frozen["error"] = e

        t = threading.Thread(target=publish, daemon=True)
        t.start()
        assert stalled.wait(30)

    # Nothing of the dead publisher is visible.
    assert [mv.version for mv in repo.versions("ctr")] == [first.version]
    assert repo.get("ctr") == first
    with pytest.raises(VersionNotFoundError, match=r"versions: 1$"):
        repo.get("ctr", version=first.version + 1)
    debris = _debris(repo, "ctr")
    assert debris["staging"] + debris["uncommitted_files"] > 0, debris
    # Young debris may belong to a live publisher: the default grace period leaves it.
    assert repo.gc().removed_debris == []
    assert _debris(repo, "ctr") == debris
    report = repo.gc(grace_seconds=0)
    assert report.removed_debris, report
    assert _debris(repo, "ctr") == {"staging": 0, "uncommitted_files": 0, "claims": 0}

    if not repo_root.cross_process:
        release.set()
        t.join(60)
        assert not t.is_alive()
        # The frozen publisher wakes up fenced: gc took its claim, so it must not commit.
        assert isinstance(frozen.get("error"), RepositoryError), frozen
        assert "claim" in str(frozen["error"])
        assert _debris(repo, "ctr") == {"staging": 0, "uncommitted_files": 0, "claims": 0}
        monkeypatch.undo()

    again = repo.publish("ctr", make_export(tmp_path / "again", seed=7))
    assert again.version > first.version
    assert repo.verify("ctr", again.version) == again
    assert [mv.version for mv in repo.versions("ctr")] == [first.version, again.version]


# ------------------------------------------------------------------------------------ poller
def test_poller_never_sees_a_partial_version(repo_root: RepoRoot, commit: str, tmp_path: Path):
    count = 8 if repo_root.remote else 20
    repo = repo_root.repo(commit=commit)
    if repo_root.cross_process:
        proc = spawn("stream", repo_root.url, commit, count, tmp_path / "s")
        running = lambda: proc.poll() is None  # noqa: E731
    else:
        box: dict = {}

        def run():
            try:
                stream(repo_root.url, commit, count, str(tmp_path / "s"))
            except BaseException as e:
                box["error"] = e

        t = threading.Thread(target=run, daemon=True)
        t.start()
        running = t.is_alive

    seen: set[int] = set()
    served_checked: set[int] = set()
    polls = 0
    deadline = time.monotonic() + 90
    model_dir = repo._tree.mdir("ctr")
    while True:
        alive = running()
        polls += 1
        for mv in repo.versions("ctr"):
            if mv.version not in seen:
                repo.verify("ctr", mv.version)  # every byte of every version it sees
                seen.add(mv.version)
        if repo.mode == "rename":
            # TF Serving's view of a local base path: every integer directory is complete.
            for entry in os.listdir(model_dir) if os.path.isdir(model_dir) else []:
                if entry.isdigit() and int(entry) not in served_checked:
                    repo.verify("ctr", int(entry))
                    served_checked.add(int(entry))
        else:
            # TF Serving's view on an object store: the versions models.config lists.
            text = repo.model_config("ctr") or ""
            for v in map(int, re.findall(r"versions: (\d+)", text)):
                if v not in served_checked:
                    repo.verify("ctr", v)
                    served_checked.add(v)
        if not alive:
            break
        assert time.monotonic() < deadline, "publisher did not finish in 90s"
    if repo_root.cross_process:
        published = json.loads(finish([proc])[0])
    else:
        assert "error" not in box, box.get("error")
        published = list(range(1, count + 1))
    assert sorted(seen) == sorted(published)
    assert served_checked, "the TF Serving view never showed a version"
    assert polls >= count, f"only {polls} polls during {count} publishes; the test proves nothing"
