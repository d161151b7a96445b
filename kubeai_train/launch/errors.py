"""Errors of the launcher: one base, ``LaunchError``, and a subclass per way a job goes wrong
(bad spec or job file, missing script, invalid manifest, refused submit, failed job)."""

from __future__ import annotations

__all__ = [
    "JobFailedError",
    "JobFileError",
    "LaunchError",
    "ManifestError",
    "ScriptNotFoundError",
    "SpecError",
    "SubmitError",
]


class LaunchError(Exception):
    """Base of every launcher error. Messages name the bad value and what to do."""


class SpecError(LaunchError, ValueError):
    """The job spec (flags or job file) is invalid."""


class JobFileError(SpecError):
    """A YAML job file is unreadable or not a valid job."""


class ScriptNotFoundError(LaunchError, FileNotFoundError):
    """The training script does not exist."""


class ManifestError(LaunchError, ValueError):
    """A rendered manifest breaks the CRD schema or the operator's admission rules."""


class SubmitError(LaunchError):
    """The Kubernetes API refused or could not take the job."""


class JobFailedError(LaunchError):
    """A job (or a process of it) ended with a non-zero exit code."""
