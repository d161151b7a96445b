"""TF Serving model config rendering: how a server on an object store never sees a partial
version.

TF Serving pointed at ``<root>/<name>`` loads every integer-named directory it lists. On a local
path, NFS or a PVC the repository renames a complete staging directory into place, so that is
safe. On an object store a "directory" is a key prefix that appears with the first uploaded
object, so a server polling the prefix could load a version mid-upload. The repository therefore
maintains ``<root>/<name>/.kubeai/models.config`` (protobuf text, one PUT per change) whose
``model_version_policy { specific { versions: ... } }`` lists only committed versions (the newest
``serve_latest`` plus every aliased one) and whose ``version_labels`` mirror the aliases. Start
TF Serving with ``--model_config_file=<that URL> --model_config_file_poll_wait_seconds=30`` and
it loads exactly the committed versions.

:func:`render_model_config` is a pure function of the versions and aliases, so the file's
content is a function of the repository's state and concurrent writers converge.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["MODEL_CONFIG_FILE", "render_model_config", "served_versions"]

MODEL_CONFIG_FILE = "models.config"

_PLATFORMS = {"tensorflow": "tensorflow", "tf": "tensorflow", "keras": "tensorflow"}


def served_versions(committed: Sequence[int], aliases: Mapping[str, int], serve_latest: int) -> list[int]:
    """The versions a server should load: the newest ``serve_latest`` committed ones plus every
    aliased one that is committed, ascending."""
    done = set(committed)
    newest = sorted(done)[-serve_latest:] if serve_latest > 0 else []
    return sorted(set(newest) | {v for v in aliases.values() if v in done})


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_model_config(
    name: str,
    base_path: str,
    versions: Sequence[int],
    aliases: Mapping[str, int] | None = None,
    framework: str | None = None,
) -> str:
    """TF Serving ``ModelServerConfig`` text proto for one model.

    Args:
        name: model name, as clients address it.
        base_path: the model directory ``<root>/<name>`` (a path or URL the server can read).
        versions: versions to load (only committed ones).
        aliases: alias -> version; labels pointing outside ``versions`` are left out (TF Serving
            rejects labels of versions it does not load).
        framework: the model's framework; anything TF Serving does not know maps to
            ``tensorflow`` (the only platform it serves from a base path).
    """
    platform = _PLATFORMS.get((framework or "tensorflow").lower(), "tensorflow")
    lines = [
        "# Maintained by kubeai_train.repository: lists only committed versions. Do not edit.",
        "model_config_list {",
        "  config {",
        f"    name: {_quote(name)}",
        f"    base_path: {_quote(base_path)}",
        f"    model_platform: {_quote(platform)}",
        "    model_version_policy {",
        "      specific {",
    ]
    lines += [f"        versions: {v}" for v in sorted(set(versions))]
    lines += ["      }", "    }"]
    for alias, v in sorted((aliases or {}).items()):
        if v in versions:
            lines += ["    version_labels {", f"      key: {_quote(alias)}", f"      value: {v}", "    }"]
    lines += ["  }", "}", ""]
    return "\n".join(lines)
