"""Fixtures of the repository suite: the same tests run on every storage backend.

``repo_root`` is parametrized over :data:`BACKENDS`. A backend is a generator function
``(request, tmp_path) -> yields RepoRoot`` that sets a fresh, empty root up and tears it down.
Adding one (e.g. the local OSS server) is one function and one entry in ``BACKENDS``::

    def _oss(request, tmp_path):
        server = request.getfixturevalue("oss_server")           # session fixture of the OSS suite
        yield RepoRoot(f"oss://{server.bucket}/repo-{uuid.uuid4().hex}", server.storage_options,
                       "oss", cross_process=True)
    BACKENDS["oss"] = _oss
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pytest

from kubeai_train.repository import ModelRepository


@dataclass(frozen=True)
class RepoRoot:
    """A fresh repository root on one backend.

    Attributes:
        url: the root to give ``ModelRepository``.
        storage_options: fsspec options for it (credentials of the local test server, if any).
        backend: the backend's name.
        cross_process: True when other processes see the same storage (local disk, a server);
            False for ``memory://``, which lives inside one process.
    """

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    backend: str = "local"
    cross_process: bool = True

    @property
    def remote(self) -> bool:
        """True for backends behind a network protocol (each listing is a request): the
        concurrency tests scale their counts down there to keep the suite fast."""
        return self.backend not in ("local", "memory")

    def repo(self, **kwargs: Any) -> ModelRepository:
        return ModelRepository(self.url, self.storage_options, **kwargs)


def _local(request, tmp_path: Path) -> Iterator[RepoRoot]:
    yield RepoRoot(str(tmp_path / "repo"), {}, "local", cross_process=True)


def _memory(request, tmp_path: Path) -> Iterator[RepoRoot]:
    prefix = f"/kubeai-test-{uuid.uuid4().hex}"
    yield RepoRoot(f"memory://{prefix}/repo", {}, "memory", cross_process=False)
    with contextlib.suppress(FileNotFoundError):
        fsspec.filesystem("memory").rm(prefix, recursive=True)


@pytest.fixture(scope="module")
def oss_server(tmp_path_factory):
    """One local OSS server (kubeai_train.testing.oss_server) per test module, bucket "repo"."""
    from kubeai_train.testing.oss_server import OSSServer

    with OSSServer(tmp_path_factory.mktemp("oss-repo"), buckets=["repo"]) as server:
        yield server


def _oss(request, tmp_path: Path) -> Iterator[RepoRoot]:
    # fsspec's "oss" protocol as kubeai_train sets it up (kubeai_train.data.oss: ossfs with exact
    # ranges, retries and its append-position fix), so the result does not depend on test order.
    from kubeai_train.data.oss import install

    install()
    server = request.getfixturevalue("oss_server")
    mp = request.getfixturevalue("monkeypatch")
    # Publisher processes build ModelRepository(root) without storage options: they find the
    # server through the environment, in DESIGN.md's names and in fsspec's own (FSSPEC_OSS_*),
    # which plain ossfs reads.
    for name, value in server.env().items():
        mp.setenv(name, value)
    for name, value in server.storage_options().items():
        mp.setenv(f"FSSPEC_OSS_{name.upper()}", value)
    yield RepoRoot(f"oss://repo/r-{uuid.uuid4().hex}", server.storage_options(), "oss", cross_process=True)


BACKENDS: dict[str, Callable[..., Iterator[RepoRoot]]] = {"local": _local, "memory": _memory, "oss": _oss}


def pytest_generate_tests(metafunc):
    """Run every test taking ``repo_root`` on each backend. Tests that also take ``commit`` run
    once per backend with ``commit="auto"`` and, on local disk, also with ``commit="marker"``
    (the object-store protocol, there driven by real processes); elsewhere "auto" already is
    the marker protocol."""
    if "repo_root" not in metafunc.fixturenames:
        return
    if "commit" in metafunc.fixturenames:
        combos = [(b, "auto") for b in BACKENDS] + [("local", "marker")]
        metafunc.parametrize(
            ("repo_root", "commit"), combos, indirect=["repo_root"], ids=[f"{b}-{c}" for b, c in combos]
        )
    else:
        metafunc.parametrize("repo_root", list(BACKENDS), indirect=True)


@pytest.fixture
def repo_root(request, tmp_path: Path) -> Iterator[RepoRoot]:
    """A fresh, empty repository root on each backend in turn (see pytest_generate_tests)."""
    yield from BACKENDS[request.param](request, tmp_path)


@pytest.fixture
def repo(repo_root: RepoRoot) -> ModelRepository:
    """A repository on a fresh root (each backend in turn)."""
    return repo_root.repo()


def make_export(path: Path, seed: int = 0, size: int = 4096) -> Path:
    """A small SavedModel-shaped directory whose content depends on ``seed``."""
    (path / "variables").mkdir(parents=True, exist_ok=True)
    (path / "saved_model.pb").write_bytes(b"graph-" + str(seed).encode())
    (path / "variables" / "variables.index").write_bytes(bytes([seed % 256]) * 16)
    (path / "variables" / "variables.data-00000-of-00001").write_bytes(
        (str(seed).encode() * (size // max(1, len(str(seed))) + 1))[:size]
    )
    return path


@pytest.fixture
def export_dir(tmp_path: Path) -> Path:
    """A small exported model directory."""
    return make_export(tmp_path / "export")
