"""The job's model directory: a path TensorFlow writes itself, or any fsspec URL.

TensorFlow's own file layer opens local paths, ``file://``, ``ram://`` and ``gs://`` here
(``tf.io.gfile.get_registered_schemes()``); ``oss://``, ``s3://`` through s3fs, ``memory://``
and every other fsspec URL it cannot. :class:`ModelDir` gives the trainers one way to keep
their files in either kind of place:

* TF-native: TensorFlow writes checkpoints, summaries and markers there itself.
* fsspec-only: TensorFlow writes into a local staging directory of this process and the files
  are uploaded through fsspec (checkpoints: :mod:`kubeai_train.tf.checkpoint_store`).

Small files (JSON markers, audit chunks, the eval sample) are written atomically in both: a
temporary name renamed into place on TF-native paths, one PUT on object stores. Credentials come
from the scheme's storage-options provider (``OSS_*`` for oss://, see
:func:`kubeai_train.data.registry.storage_options_for`) under explicit ``storage_options``; they
never appear in messages (URLs are shown with any ``user:password@`` part masked).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import fsspec
import psutil
import tensorflow as tf

from kubeai_train.data.registry import storage_options_for
from kubeai_train.tf.types import TrainError

__all__ = [
    "ModelDir",
    "check_url",
    "is_local",
    "local_path",
    "redact",
    "tf_writes",
    "upload_tree",
    "write_export",
]

log = logging.getLogger("kubeai_train.tf")


def redact(url: str) -> str:
    """``url`` without any ``user:password@`` part (for messages and logs)."""
    return re.sub(r"//[^/@]*@", "//***@", url)


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def tf_writes(url: str) -> bool:
    """Whether TensorFlow's own file system layer opens ``url`` (local paths, file://, gs://, ...)."""
    return _scheme(url) in set(tf.io.gfile.get_registered_schemes())


def is_local(url: str) -> bool:
    """A path on this machine's file system (plain or ``file://``)."""
    return _scheme(url) in ("", "file")


def local_path(url: str) -> str:
    """A local path or ``file://`` URL as a path ``os`` functions take."""
    return url[len("file://") :] if url.startswith("file://") else url


class ModelDir:
    """One model directory (``url``), TF-native or fsspec-only (see the module docstring).

    Args:
        url: a local path, a URL TensorFlow writes (gs://), or any fsspec URL (oss://bucket/dir).
        storage_options: fsspec options for an fsspec-only ``url`` (default: from the environment).
        staging_dir: local scratch space for files TensorFlow writes before they are uploaded
            (default: a fresh directory under ``tempfile.gettempdir()``, removed at exit).

    Raises:
        TrainError: ``url`` is empty, or neither TensorFlow nor an installed fsspec
            implementation can write its scheme.
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        staging_dir: str | None = None,
    ) -> None:
        if not url:
            raise TrainError("model_dir must be set: checkpoints and the export go there")
        self.url = url.rstrip("/") or url
        self.native = tf_writes(self.url)
        self.storage_options = dict(storage_options or {})
        self._staging_arg = staging_dir
        self._staging: str | None = None
        self._fs: Any = None
        self._root = ""
        if not self.native:
            self._fs, self._root = _open_fs(self.url, self.storage_options, "model_dir")

    def __repr__(self) -> str:
        return f"ModelDir({redact(self.url)!r}, native={self.native})"

    @property
    def display(self) -> str:
        """The URL with credentials masked."""
        return redact(self.url)

    # ------------------------------------------------------------------ paths
    def join(self, *parts: str) -> str:
        """The URL of ``parts`` under this directory."""
        return "/".join([self.url, *(p.strip("/") for p in parts if p)])

    def _path(self, rel: str) -> str:
        return "/".join([self._root, rel.strip("/")]) if rel else self._root

    # ------------------------------------------------------------------ files
    def makedirs(self, rel: str = "") -> None:
        """Create ``rel`` (and parents); a no-op on object stores, which have no directories."""
        if self.native:
            tf.io.gfile.makedirs(self.join(rel))
        else:
            self._fs.makedirs(self._path(rel), exist_ok=True)

    def exists(self, rel: str) -> bool:
        if self.native:
            return bool(tf.io.gfile.exists(self.join(rel)))
        return bool(self._fs.exists(self._path(rel)))

    def read_bytes(self, rel: str) -> bytes | None:
        """The contents of ``rel``, or None when it does not exist."""
        if self.native:
            try:
                with tf.io.gfile.GFile(self.join(rel), "rb") as f:
                    return bytes(f.read())
            except tf.errors.NotFoundError:
                return None
        try:
            return bytes(self._fs.cat_file(self._path(rel)))
        except FileNotFoundError:
            return None

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``rel`` atomically: readers see the old contents or the new, never a part."""
        if self.native:
            path = self.join(rel)
            parent = path.rsplit("/", 1)[0]
            if parent and parent != path:
                tf.io.gfile.makedirs(parent)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with tf.io.gfile.GFile(tmp, "wb") as f:
                f.write(data)
            tf.io.gfile.rename(tmp, path, overwrite=True)
        else:
            self._fs.pipe_file(self._path(rel), bytes(data))  # one PUT: all or nothing

    def read_json(self, rel: str) -> Any:
        """The JSON value in ``rel``, or None when it does not exist."""
        raw = self.read_bytes(rel)
        return None if raw is None else json.loads(raw)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def listdir(self, rel: str = "") -> list[str]:
        """Names of the entries directly under ``rel`` (empty when it does not exist)."""
        if self.native:
            try:
                return sorted(n.rstrip("/") for n in tf.io.gfile.listdir(self.join(rel)))
            except tf.errors.NotFoundError:
                return []
        try:
            entries = self._fs.ls(self._path(rel), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        except TypeError:  # an implementation without ``refresh``
            entries = self._fs.ls(self._path(rel), detail=False)
        return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def remove(self, rel: str) -> None:
        """Delete the file ``rel``; a missing file is not an error."""
        try:
            if self.native:
                tf.io.gfile.remove(self.join(rel))
            else:
                self._fs.rm_file(self._path(rel))
        except (FileNotFoundError, tf.errors.NotFoundError):
            pass

    def upload(self, local: str, rel: str) -> None:
        """Copy the local file ``local`` to ``rel`` (not atomic: callers commit by a later write)."""
        if self.native:
            tf.io.gfile.copy(local, self.join(rel), overwrite=True)
        else:
            self._fs.put_file(local, self._path(rel))

    def download(self, rel: str, local: str) -> None:
        """Copy ``rel`` to the local file ``local``; FileNotFoundError when ``rel`` is missing."""
        if self.native:
            try:
                tf.io.gfile.copy(self.join(rel), local, overwrite=True)
            except tf.errors.NotFoundError as e:
                raise FileNotFoundError(f"{redact(self.join(rel))} does not exist") from e
        else:
            self._fs.get_file(self._path(rel), local)

    # ------------------------------------------------------------------ staging
    @property
    def staging(self) -> str:
        """This process's local scratch directory (created on first use)."""
        if self._staging is None:
            parent = self._staging_arg or tempfile.gettempdir()
            os.makedirs(parent, exist_ok=True)
            _sweep_staging(parent)
            self._staging = tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{os.getpid()}-", dir=parent)
            atexit.register(shutil.rmtree, self._staging, True)
        return self._staging

    def writable(self, rel: str = "") -> str:
        """A directory TensorFlow can write for ``rel``: the directory itself when TF-native, else
        its local mirror in staging (upload it with :meth:`sync`)."""
        if self.native:
            return self.join(rel)
        path = os.path.join(self.staging, "files", rel)
        os.makedirs(path, exist_ok=True)
        return path

    def sync(self, rel: str = "") -> None:
        """Upload every file of the local mirror of ``rel`` (no-op when TF-native). Files TF keeps
        appending to (event files) are uploaded whole each time."""
        if self.native:
            return
        base = os.path.join(self.staging, "files", rel)
        for dirpath, _, files in os.walk(base):
            for name in files:
                local = os.path.join(dirpath, name)
                self.upload(local, "/".join(filter(None, [rel, os.path.relpath(local, base)])))


_STAGING_PREFIX = "kubeai-model-dir-"


def _sweep_staging(parent: str) -> None:
    """Delete staging directories of processes that are gone: a trainer leaving with
    ``os._exit`` (exit 138 for a restart, TF's gRPC threads) skips its atexit clean-up, and each
    restart would otherwise leave a checkpoint part, a downloaded checkpoint and an export behind."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        m = re.fullmatch(rf"{_STAGING_PREFIX}(\d+)-\w+", name)
        if m and int(m.group(1)) != os.getpid() and not psutil.pid_exists(int(m.group(1))):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def check_url(
    url: str | None, storage_options: Mapping[str, Any] | None = None, what: str = "model_dir"
) -> None:
    """Fail now (not after training) when ``url`` is somewhere neither TensorFlow nor fsspec writes.

    Raises:
        TrainError: one line naming ``what``, the URL (credentials masked) and what to do.
    """
    if url and not tf_writes(url):
        _open_fs(url, storage_options or {}, what)


def _open_fs(url: str, storage_options: Mapping[str, Any], what: str) -> tuple[Any, str]:
    scheme = _scheme(url)
    try:
        fs, root = fsspec.core.url_to_fs(url, **storage_options_for(url, storage_options))
    except (ImportError, ValueError) as e:
        raise TrainError(
            f"{what} {redact(url)!r}: neither TensorFlow nor fsspec can write {scheme}:// ({type(e).__name__}: "
            f"{redact(str(e))}); use a local or shared path, gs://, or an fsspec URL whose package is "
            "installed (oss:// needs pip install 'kubeai_train[oss]')"
        ) from e
    return fs, str(root)


def upload_tree(local_dir: str, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Replace the directory ``url`` (TF-native or fsspec) with a copy of ``local_dir``.

    Not atomic on object stores (the model repository is where atomic publishes happen): the old
    tree is deleted first, then every file is uploaded.
    """
    if tf_writes(url):
        if tf.io.gfile.exists(url):
            tf.io.gfile.rmtree(url)
        for dirpath, _, files in os.walk(local_dir):
            rel = os.path.relpath(dirpath, local_dir)
            target = url if rel == "." else f"{url}/{rel}"
            tf.io.gfile.makedirs(target)
            for name in files:
                tf.io.gfile.copy(os.path.join(dirpath, name), f"{target}/{name}", overwrite=True)
        return
    fs, root = _open_fs(url, storage_options or {}, "export_dir")
    if fs.exists(root):
        fs.rm(root, recursive=True)
    for dirpath, _, files in os.walk(local_dir):
        for name in files:
            local = os.path.join(dirpath, name)
            fs.put_file(local, f"{root}/{os.path.relpath(local, local_dir)}")


def write_export(
    export_dir: str,
    model_dir: ModelDir,
    save: Callable[[str], Any],
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write a SavedModel to ``export_dir`` (local, TF-native or fsspec) and return a local copy.

    ``save(path)`` writes the SavedModel into a fresh local directory, which then replaces the
    local export by a rename (readers never see half a SavedModel) and, when ``export_dir`` is not
    local, is uploaded there with :func:`upload_tree`. The local copy (``export_dir`` itself, or
    ``<staging>/export``) is what a model repository publishes from.
    """
    local = local_path(export_dir) if is_local(export_dir) else os.path.join(model_dir.staging, "export")
    tmp = f"{local.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    shutil.rmtree(local, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    os.replace(tmp, local)
    if not is_local(export_dir):
        upload_tree(local, export_dir, storage_options)
    return local
