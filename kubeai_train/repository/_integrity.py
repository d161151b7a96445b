"""Reading a version's bytes against its manifest: :func:`verify` in place, :func:`download`
into a local directory that ends up holding a complete, verified copy or is left as it was."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import fsspec

from kubeai_train.repository._storage import Store
from kubeai_train.repository._tree import Tree, fmt_list
from kubeai_train.repository.errors import (
    IntegrityError,
    InvalidArgumentError,
    InvalidMetadataError,
    VersionNotFoundError,
)
from kubeai_train.repository.metadata import METADATA_FILE
from kubeai_train.repository.types import ModelVersion

__all__ = ["download", "verify"]


def verify(tree: Tree, name: str, v: int) -> ModelVersion:
    """Read every file of ``name``/``v`` and check its size and sha256 against the manifest.

    Raises:
        VersionNotFoundError: no metadata for that version (not committed).
        IntegrityError: a file is missing, has another size or sha256, or is not in the
            manifest; the message and ``.path`` name the file.
    """
    vdir = tree.vdir(name, v)
    files = tree.store.tree(vdir)
    if METADATA_FILE not in files:
        committed = sorted(tree.scan(name).committed)
        raise VersionNotFoundError(
            f"model {name!r} has no committed version {v}; versions: {fmt_list(committed)}",
            name=name,
            version=v,
        )
    try:
        mv = tree.load(name, v, files[METADATA_FILE])
    except InvalidMetadataError as e:
        raise IntegrityError(
            f"{name}/{v}: {METADATA_FILE} is corrupt: {e}", name=name, version=v, path=METADATA_FILE
        ) from e
    for f in mv.manifest:
        if f.path not in files:
            raise IntegrityError(f"{name}/{v}: file {f.path} is missing", name=name, version=v, path=f.path)
        size, sha = tree.store.sha256(Store.join(vdir, f.path))
        if size != f.size:
            problem = f"has {size} bytes, the manifest says {f.size}"
        elif sha != f.sha256:
            problem = f"has sha256 {sha}, the manifest says {f.sha256}"
        else:
            continue
        raise IntegrityError(f"{name}/{v}: file {f.path} {problem}", name=name, version=v, path=f.path)
    expected = {f.path for f in mv.manifest} | {METADATA_FILE}
    extra = sorted(set(files) - expected)
    if extra:
        raise IntegrityError(
            f"{name}/{v}: file {extra[0]} is not in the manifest"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""),
            name=name,
            version=v,
            path=extra[0],
        )
    return mv


def download(tree: Tree, mv: ModelVersion, local_dir: str | os.PathLike[str], overwrite: bool) -> Path:
    """Copy the committed version ``mv`` into ``local_dir`` with its metadata file, checking
    every file's sha256 on the way; returns the absolute target.

    The copy lands in a temporary sibling directory renamed to ``local_dir`` at the end.

    Raises:
        InvalidArgumentError: ``local_dir`` is a file, or exists, is not empty and ``overwrite``
            is false.
        IntegrityError: a file does not match the manifest (names the file).
    """
    name = mv.name
    dest = Path(local_dir).expanduser().absolute()
    if dest.exists() and not dest.is_dir():
        raise InvalidArgumentError(f"download target {dest} is a file; give a directory")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise InvalidArgumentError(
            f"download target {dest} is not empty; choose an empty directory or pass overwrite=True"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.download-{uuid.uuid4().hex[:8]}"
    local = Store(fsspec.filesystem("file"), True)
    vdir = tree.vdir(name, mv.version)
    try:
        for f in mv.manifest:
            src = Store.join(vdir, f.path)
            try:
                size, sha = local.copy_in(tree.store.fs, src, str(tmp / f.path))
            except FileNotFoundError as e:
                raise IntegrityError(
                    f"{name}/{mv.version}: file {f.path} is missing",
                    name=name,
                    version=mv.version,
                    path=f.path,
                ) from e
            if (size, sha) != (f.size, f.sha256):
                raise IntegrityError(
                    f"{name}/{mv.version}: file {f.path} has sha256 {sha} ({size} bytes), "
                    f"the manifest says {f.sha256} ({f.size} bytes)",
                    name=name,
                    version=mv.version,
                    path=f.path,
                )
        meta = tree.store.read(Store.join(vdir, METADATA_FILE))
        (tmp / METADATA_FILE).write_bytes(meta or b"")
        if dest.exists():
            local.rm_tree(str(dest))
        os.rename(tmp, dest)
    except BaseException:
        local.rm_tree(str(tmp))
        raise
    return dest
