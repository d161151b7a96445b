"""Errors of the model repository: one base, :class:`RepositoryError`, and narrow subclasses.

Every error names the bad value and what exists or what to do. Instances pickle (publishers run
in other processes and pools), because the only positional argument is the message and the
keyword attributes travel in ``__dict__``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AliasNotFoundError",
    "ConcurrentPublishError",
    "IntegrityError",
    "InvalidArgumentError",
    "InvalidMetadataError",
    "InvalidNameError",
    "ModelNotFoundError",
    "RepositoryConfigError",
    "RepositoryError",
    "SourceNotFoundError",
    "VersionNotFoundError",
]


def _rebuild(cls: type[RepositoryError], args: tuple, attrs: dict) -> RepositoryError:
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(attrs)
    return err


class RepositoryError(Exception):
    """Base of every error the repository raises on purpose.

    Keyword attributes (``name``, ``version``, ``path``, ...) are kept on the instance for
    programs; the message already names them for people.
    """

    def __init__(self, message: str, **attrs: Any) -> None:
        super().__init__(message)
        self.__dict__.update(attrs)

    def __str__(self) -> str:  # LookupError subclasses must not repr() the message like KeyError
        return str(self.args[0]) if self.args else ""

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


class RepositoryConfigError(RepositoryError, ValueError):
    """The root URL, storage options or a repository setting is unusable."""


class InvalidArgumentError(RepositoryError, ValueError):
    """An argument other than a name is unusable (a version that is not an int >= 1, a download
    directory that is not empty, both ``version`` and ``alias`` given, ...)."""


class InvalidNameError(RepositoryError, ValueError):
    """A model, alias or service name is empty, has ``/`` or ``..``, or other unsafe characters."""


class InvalidMetadataError(RepositoryError, ValueError):
    """Metadata given to ``publish`` is not JSON-serialisable or has a field of the wrong type."""


class SourceNotFoundError(RepositoryError, FileNotFoundError):
    """The directory or file to publish does not exist or holds no files."""


class ModelNotFoundError(RepositoryError, LookupError):
    """No committed version of the model exists; the message lists the models that do."""


class VersionNotFoundError(RepositoryError, LookupError):
    """The version is not a committed, intact version; the message lists the versions that are."""


class AliasNotFoundError(RepositoryError, LookupError):
    """The alias is not set; the message lists the aliases that are."""


class IntegrityError(RepositoryError):
    """A file of a version is missing, has the wrong size or checksum, or is unexpected.

    Attributes:
        name, version: the version.
        path: the file (relative to the version directory) that failed.
    """

    name: str | None = None
    version: int | None = None
    path: str | None = None


class ConcurrentPublishError(RepositoryError):
    """A publisher could not allocate a version number after many attempts (heavy contention)."""
