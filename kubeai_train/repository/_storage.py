"""Filesystem primitives the repository builds its protocol on, with a local fast path.

Local paths (and NFS / PVC mounts) use ``os`` directly: ``os.rename`` of a directory and
``os.replace`` of a file are atomic, ``O_EXCL`` creation is exclusive, ``fsync`` makes a rename
durable. Everything else goes through fsspec, where one ``pipe_file`` is one PUT (atomic on
object stores) and listings are read fresh (caches invalidated) because other processes write.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import io
import os
import shutil
import threading
import uuid
from typing import Any

from fsspec import AbstractFileSystem

__all__ = ["CHUNK", "Store", "info_mtime"]

CHUNK = 4 << 20


def info_mtime(info: dict[str, Any]) -> float | None:
    """Modification time (unix seconds) from an fsspec info dict, whatever the backend calls it."""
    for key in ("mtime", "LastModified", "last_modified", "created", "updated", "time"):
        v = info.get(key)
        if v is None:
            continue
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, _dt.datetime):
            return v.timestamp()
        if isinstance(v, str):
            try:
                return _dt.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def _protocols(fs: AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


class _PutOnClose(io.BytesIO):
    """A binary writer that stores its whole content with one ``pipe_file`` when closed."""

    def __init__(self, fs: AbstractFileSystem, path: str) -> None:
        super().__init__()
        self._fs, self._path = fs, path

    def close(self) -> None:
        if not self.closed:
            data = self.getvalue()
            super().close()
            self._fs.pipe_file(self._path, data)

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is not None:  # a failed copy stores nothing
            super().close()
            return
        self.close()


class Store:
    """Path operations on one filesystem. Paths are the filesystem's own (protocol stripped)."""

    def __init__(self, fs: AbstractFileSystem, local: bool) -> None:
        self.fs = fs
        self.local = local
        self._list_lock = threading.Lock()

    def _fresh(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a listing with every cached listing forgotten first.

        Forgetting only ``path`` (fsspec's ``invalidate_cache(path)``) is not enough: ossfs walks
        sub-directories through cached listings that may predate another process's upload. A
        KeyError is ossfs's cache losing an entry to a concurrent invalidation: list again.
        """
        with self._list_lock:
            for attempt in range(3):
                self.fs.invalidate_cache()
                try:
                    return call(*args, **kwargs)
                except KeyError:
                    if attempt == 2:
                        raise
        return None

    # ---------------------------------------------------------------- naming
    @staticmethod
    def join(*parts: str) -> str:
        out = parts[0].rstrip("/") if parts[0] != "/" else ""
        for p in parts[1:]:
            out += "/" + p.strip("/")
        return out

    def uri(self, path: str) -> str:
        """What users see: the local path, or a URL with the protocol."""
        return path if self.local else self.fs.unstrip_protocol(path)

    def _rel(self, name: str, base: str) -> str | None:
        n, b = name.lstrip("/"), base.strip("/")
        if not b:
            return n
        if n.startswith(b + "/"):
            return n[len(b) + 1 :]
        return None

    # ---------------------------------------------------------------- reading
    def read(self, path: str) -> bytes | None:
        """File content, or None when it does not exist."""
        try:
            if self.local:
                with open(path, "rb") as f:
                    return f.read()
            return self.fs.cat_file(path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def open_read(self, path: str) -> Any:
        """A binary reader of ``path``."""
        if self.local:
            return open(path, "rb")
        return self.fs.open(path, "rb")

    def _open_write(self, path: str) -> Any:
        if self.local:
            return open(path, "wb")
        if "memory" in _protocols(self.fs):
            # fsspec's memory filesystem puts a file in its store when it is opened for writing, so
            # a concurrent reader can hold a view of the buffer the writer is growing (BufferError
            # in the writer). Object stores show an upload only when it completes; do the same.
            return _PutOnClose(self.fs, path)
        return self.fs.open(path, "wb")

    def listdir(self, path: str) -> dict[str, dict[str, Any]]:
        """Immediate children ``name -> info`` (``type``, ``size``, mtime); {} when missing."""
        out: dict[str, dict[str, Any]] = {}
        if self.local:
            try:
                with os.scandir(path) as it:
                    for e in it:
                        try:
                            st = e.stat()
                        except FileNotFoundError:
                            continue
                        out[e.name] = {
                            "type": "directory" if e.is_dir() else "file",
                            "size": st.st_size,
                            "mtime": st.st_mtime,
                        }
            except (FileNotFoundError, NotADirectoryError):
                pass
            return out
        try:
            entries = self._fresh(self.fs.ls, path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return out
        for info in entries:
            rel = self._rel(info["name"], path)
            if rel and "/" not in rel.rstrip("/"):
                out[rel.rstrip("/")] = info
        return out

    def tree(self, path: str) -> dict[str, dict[str, Any]]:
        """Every file under ``path`` as ``relative/posix/path -> info``; {} when missing."""
        out: dict[str, dict[str, Any]] = {}
        if self.local:
            for dirpath, _dirs, files in os.walk(path, onerror=lambda e: None):
                for fname in files:
                    full = os.path.join(dirpath, fname)
                    try:
                        st = os.stat(full)
                    except FileNotFoundError:
                        continue
                    rel = os.path.relpath(full, path).replace(os.sep, "/")
                    out[rel] = {"type": "file", "size": st.st_size, "mtime": st.st_mtime}
            return out
        try:
            found = self._fresh(self.fs.find, path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return out
        for full, info in found.items():
            if info.get("type") == "directory":
                continue
            key = self._rel(full, path)
            if key:
                out[key] = info
        return out

    # ---------------------------------------------------------------- writing
    def makedirs(self, path: str) -> None:
        if self.local:
            os.makedirs(path, exist_ok=True)
        else:
            self.fs.makedirs(path, exist_ok=True)

    def write_atomic(self, path: str, data: bytes) -> None:
        """Replace ``path`` with ``data`` so readers see the old or the new content, never a mix.

        Local: write a temporary sibling, fsync, ``os.replace``. Elsewhere: one ``pipe_file``
        (a single PUT on object stores).
        """
        if not self.local:
            self.fs.pipe_file(path, data)
            return
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def write_new(self, path: str, data: bytes) -> None:
        """Write a file whose name is unique to this writer (claims, deployment records)."""
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        else:
            self.fs.pipe_file(path, data)

    def copy_in(
        self, src_fs: AbstractFileSystem, src: str, dst: str, *, fsync: bool = False
    ) -> tuple[int, str]:
        """Stream ``src`` (on ``src_fs``) to ``dst``, hashing as it goes; returns (size, sha256)."""
        h = hashlib.sha256()
        size = 0
        if self.local:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
        with src_fs.open(src, "rb") as fin:
            with self._open_write(dst) as fout:
                while True:
                    chunk = fin.read(CHUNK)
                    if not chunk:
                        break
                    h.update(chunk)
                    size += len(chunk)
                    fout.write(chunk)
                if fsync and self.local:
                    fout.flush()
                    os.fsync(fout.fileno())
        return size, h.hexdigest()

    def sha256(self, path: str) -> tuple[int, str]:
        h = hashlib.sha256()
        size = 0
        with self.open_read(path) as f:
            while True:
                chunk = f.read(CHUNK)
                if not chunk:
                    break
                h.update(chunk)
                size += len(chunk)
        return size, h.hexdigest()

    def fsync_dir(self, path: str) -> None:
        if not self.local:
            return
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def rename_dir_noreplace(self, src: str, dst: str) -> bool:
        """Atomically rename directory ``src`` to ``dst``; False when ``dst`` already exists
        (non-empty), so racing publishers take different numbers. Local only."""
        try:
            os.rename(src, dst)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                return False
            raise
        return True

    # ---------------------------------------------------------------- deleting
    def rm_file(self, path: str) -> None:
        try:
            if self.local:
                os.unlink(path)
            else:
                self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def rm_tree(self, path: str) -> None:
        """Remove everything under ``path`` (missing is fine)."""
        if self.local:
            shutil.rmtree(path, ignore_errors=True)
            return
        for rel in self.tree(path):
            self.rm_file(self.join(path, rel))
        try:
            self.fs.rm(path, recursive=True)
        except (FileNotFoundError, OSError):
            pass
