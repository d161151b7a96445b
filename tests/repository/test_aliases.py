"""Aliases of ModelRepository on every backend: moved in one atomic write, resolved by get."""

from __future__ import annotations

import re
import threading
import time

import pytest

from kubeai_train.repository import AliasNotFoundError, ModelRepository

from .conftest import make_export


def test_aliases_move_atomically_and_resolve(repo: ModelRepository, tmp_path):
    for i in range(3):
        repo.publish("ctr", make_export(tmp_path / f"e{i}", seed=i))
    assert repo.aliases("ctr") == {}
    assert repo.set_alias("ctr", "production", 1).version == 1
    repo.set_alias("ctr", "staging", 3)
    assert repo.aliases("ctr") == {"production": 1, "staging": 3}
    assert repo.get("ctr", alias="production").version == 1
    repo.set_alias("ctr", "production", 2)  # move
    assert repo.get("ctr", alias="production").version == 2
    config = repo.model_config("ctr")
    assert re.findall(r"versions: (\d+)", config) == ["2", "3"]  # newest + aliased, only committed
    assert re.findall(r'key: "(\w+)"\s+value: (\d+)', config) == [("production", "2"), ("staging", "3")]
    repo.remove_alias("ctr", "staging")
    assert repo.aliases("ctr") == {"production": 2}
    with pytest.raises(AliasNotFoundError, match=r"no alias 'staging'; aliases: production=2"):
        repo.get("ctr", alias="staging")
    with pytest.raises(AliasNotFoundError):
        repo.remove_alias("ctr", "staging")


def test_alias_readers_see_old_or_new_never_neither(repo_root, repo: ModelRepository, tmp_path):
    for i in range(2):
        repo.publish("ctr", make_export(tmp_path / f"e{i}", seed=i))
    repo.set_alias("ctr", "production", 1)
    stop = threading.Event()
    seen: list = []
    errors: list = []

    def reader():
        try:
            r = ModelRepository(repo.config.root, dict(repo.config.storage_options), commit=repo.mode)
            while not stop.is_set():
                seen.append(r.get("ctr", alias="production").version)
        except BaseException as e:  # reported by the test, not lost in a thread
            errors.append(e)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    # Flip until the reader has read across several flips: a fixed number of flips can all
    # finish before a starved reader's first read (a 2-core machine under a full suite), and
    # then nothing overlapped. The deadline covers one stalled request and its retry.
    flips, reads_needed = (6, 3) if repo_root.remote else (20, 5)
    deadline = time.monotonic() + 120
    i = 0
    while (i < flips or len(seen) < reads_needed) and not errors and time.monotonic() < deadline:
        repo.set_alias("ctr", "production", 1 + (i % 2 == 0))
        i += 1
    stop.set()
    t.join(60)
    assert not t.is_alive(), f"the reader is stuck after {len(seen)} reads"
    assert not errors, f"the reader failed after {len(seen)} reads: {errors[0]!r}"
    assert len(seen) >= reads_needed and set(seen) <= {1, 2}, (len(seen), set(seen), i)
