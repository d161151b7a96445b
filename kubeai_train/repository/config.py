"""Configuration of the model repository: settings, names, and the one place that reads the
environment.

Precedence for storage credentials: explicit ``storage_options`` win over the environment. For
``oss://`` roots the environment gives ``OSS_ENDPOINT``, ``OSS_ACCESS_KEY_ID``,
``OSS_ACCESS_KEY_SECRET`` and ``OSS_SESSION_TOKEN`` (the names oss2 and ossfs use) as ossfs's
``endpoint``, ``key``, ``secret`` and ``token``. Other protocols read their own environment
through their fsspec implementation. ``KUBEAI_CODE_VERSION`` (or ``GIT_COMMIT`` /
``GITHUB_SHA``) overrides the git sha recorded as a version's code version.

Nothing here ever logs or formats a secret: :func:`redact_url` strips user info from URLs and
:func:`describe_options` shows only option names.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from kubeai_train.repository.errors import InvalidNameError, RepositoryConfigError

__all__ = [
    "COMMIT_MODES",
    "RepositoryConfig",
    "check_alias",
    "check_model_name",
    "check_service",
    "code_version_from_env",
    "describe_options",
    "redact_url",
    "resolve_storage_options",
]

COMMIT_MODES = ("auto", "rename", "marker")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SERVICE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,252}$")
_OSS_ENV = {
    "endpoint": "OSS_ENDPOINT",
    "key": "OSS_ACCESS_KEY_ID",
    "secret": "OSS_ACCESS_KEY_SECRET",
    "token": "OSS_SESSION_TOKEN",
}
_SECRET_OPTION = re.compile(r"secret|password|passwd|token|credential|key", re.IGNORECASE)


def _check(kind: str, value: object, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str):
        raise InvalidNameError(f"{kind} must be a string, got {type(value).__name__} {value!r}", value=value)
    if not value:
        raise InvalidNameError(f"{kind} must not be empty; use {what}", value=value)
    if "/" in value or "\\" in value:
        raise InvalidNameError(f"{kind} {value!r} must not contain '/' or '\\'; use {what}", value=value)
    if ".." in value:
        raise InvalidNameError(f"{kind} {value!r} must not contain '..'; use {what}", value=value)
    if not pattern.fullmatch(value):
        raise InvalidNameError(f"{kind} {value!r} is unsafe; use {what}", value=value)
    return value


def check_model_name(name: object) -> str:
    """Return ``name`` if it is a safe model name, else raise :class:`InvalidNameError`.

    A safe name is 1-128 characters of letters, digits, ``.``, ``_`` and ``-``, starting with a
    letter or digit, without ``..``: it becomes one directory level under the root.
    """
    return _check(
        "model name", name, _NAME, "1-128 letters, digits, '.', '_', '-' starting with a letter or digit"
    )


def check_alias(alias: object) -> str:
    """Return ``alias`` if it is a safe alias name (as a model name, but not all digits)."""
    _check("alias", alias, _NAME, "1-128 letters, digits, '.', '_', '-' starting with a letter or digit")
    if str(alias).isdigit():
        raise InvalidNameError(
            f"alias {alias!r} is all digits and would read as a version number; use a word like 'production'",
            value=alias,
        )
    return str(alias)


def check_service(service: object) -> str:
    """Return ``service`` if it is a usable service name (letters, digits, ``._:/@-``, no ``..``)."""
    if isinstance(service, str) and service and ".." not in service and _SERVICE.fullmatch(service):
        return service
    raise InvalidNameError(
        f"service {service!r} must be 1-253 letters, digits or '._:/@-' starting with a letter or digit",
        value=service,
    )


def redact_url(url: str) -> str:
    """``url`` without user info (``oss://AK:SK@bucket/x`` -> ``oss://bucket/x``) or query string."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if not parts.scheme or (parts.username is None and parts.password is None and not parts.query):
        return url
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", parts.fragment))


def describe_options(options: Mapping[str, Any]) -> str:
    """Option names with secret-looking values hidden, for logs."""
    shown = []
    for k in sorted(options):
        v = options[k]
        shown.append(f"{k}=<set>" if _SECRET_OPTION.search(k) else f"{k}={v!r}")
    return ", ".join(shown) or "none"


def resolve_storage_options(
    protocol: str, explicit: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """fsspec storage options for ``protocol``: explicit options over the environment.

    Args:
        protocol: the root's fsspec protocol (``"oss"``, ``"file"``, ``"memory"``, ...).
        explicit: options the caller passed; each key given here wins.
        environ: the environment (``os.environ`` when None).
    """
    env = os.environ if environ is None else environ
    opts = dict(explicit or {})
    if protocol == "oss":
        for opt, var in _OSS_ENV.items():
            if opt not in opts and env.get(var):
                opts[opt] = env[var]
    return opts


def code_version_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """``KUBEAI_CODE_VERSION``, else ``GIT_COMMIT``, else ``GITHUB_SHA``, else None."""
    env = os.environ if environ is None else environ
    for var in ("KUBEAI_CODE_VERSION", "GIT_COMMIT", "GITHUB_SHA"):
        if env.get(var):
            return env[var]
    return None


@dataclass(frozen=True)
class RepositoryConfig:
    """Settings of a :class:`~kubeai_train.repository.ModelRepository`.

    Attributes:
        root: local path or fsspec URL of the repository root.
        storage_options: fsspec options (already merged with the environment).
        commit: how a publish becomes visible. ``"rename"``: files go to a staging directory
            that is renamed into ``<root>/<name>/<version>`` (local, NFS, PVC: directory rename
            is atomic). ``"marker"``: files go straight under the version prefix and the
            metadata file, written last in one PUT, commits the version (object stores).
            ``"auto"``: rename for local paths, marker otherwise.
        grace_seconds: debris (staging directories, uncommitted versions, claims) younger than
            this is presumed to belong to a live publisher and gc leaves it alone.
        serve_latest: how many newest versions the maintained TF Serving ``models.config``
            lists (besides aliased ones); 0 disables writing it.
        verify_on_read: check every listed version's files exist with their manifest sizes
            before returning it (one listing per model; never reads content).
    """

    root: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)  # may hold secrets
    commit: str = "auto"
    grace_seconds: float = 3600.0
    serve_latest: int = 1
    verify_on_read: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.root, str) or not self.root.strip():
            raise RepositoryConfigError(f"repository root must be a non-empty path or URL, got {self.root!r}")
        if self.commit not in COMMIT_MODES:
            raise RepositoryConfigError(
                f"commit must be one of {', '.join(COMMIT_MODES)}; got {self.commit!r}"
            )
        if not isinstance(self.grace_seconds, (int, float)) or self.grace_seconds < 0:
            raise RepositoryConfigError(f"grace_seconds must be >= 0, got {self.grace_seconds!r}")
        if not isinstance(self.serve_latest, int) or self.serve_latest < 0:
            raise RepositoryConfigError(f"serve_latest must be an int >= 0, got {self.serve_latest!r}")
