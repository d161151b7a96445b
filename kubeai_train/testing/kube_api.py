"""A local stand-in for the Kubernetes API server's custom-object endpoints.

It speaks the REST paths the official client uses for custom resources
(``/apis/<group>/<version>/namespaces/<ns>/<plural>[/<name>]``): create (``POST``, with
``?dryRun=All`` validating without storing, as the real server does), get, list and delete,
answering with the API server's ``Status`` objects (``409 AlreadyExists``, ``404 NotFound``,
``422 Invalid`` with ``details.causes``, ``401 Unauthorized``). What the cluster would refuse is
decided by ``admit``, a function ``(object) -> [problems]`` standing for the CRD's schema and the
admission webhooks installed in that cluster; a job's status conditions are set with
``set_conditions`` so that ``--wait`` can be driven. Every request is recorded (method, path,
query, headers, body) so tests can assert what a client sent.

    with KubeApiServer(token="t") as api:
        api.kubeconfig(tmp_path / "kubeconfig")   # for kubernetes.config / --kubeconfig
        ...
        api.objects("tfjobs")                      # what was really created

Used by the launcher's tests (TFJob / PyTorchJob submission) and by anything else that creates
custom objects (e.g. Argo workflows).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

__all__ = ["KubeApiServer"]

Admit = Callable[[Mapping[str, Any]], Iterable[str]]


def _status(code: int, reason: str, message: str, causes: Iterable[str] = ()) -> dict[str, Any]:
    status: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    causes = list(causes)
    if causes:
        status["details"] = {
            "causes": [
                {"reason": "FieldValueInvalid", "message": c, "field": c.split(":", 1)[0]} for c in causes
            ]
        }
    return status


class KubeApiServer:
    """A threaded HTTP server on 127.0.0.1 holding custom objects in memory.

    Args:
        admit: what the cluster refuses; returns the problems of an object (empty: accepted).
        token: when given, requests must carry ``Authorization: Bearer <token>`` (else 401).
    """

    def __init__(self, admit: Admit | None = None, token: str | None = None) -> None:
        self.admit = admit
        self.token = token
        self.requests: list[dict[str, Any]] = []
        self._objects: dict[tuple[str, str, str, str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._uid = 0
        self._scripts: dict[tuple[str, str, str], list[list[tuple[str, str]]]] = {}
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="kube-api", daemon=True)

    # -- life cycle -----------------------------------------------------------------------------

    def __enter__(self) -> KubeApiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def kubeconfig(self, path: str | Path, token: str | None = None) -> Path:
        """Write a kubeconfig pointing at this server (with ``token``, default the server's)."""
        path = Path(path)
        user: dict[str, Any] = {"token": token or self.token or "unused"}
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "local", "cluster": {"server": self.url}}],
                    "users": [{"name": "me", "user": user}],
                    "contexts": [{"name": "local", "context": {"cluster": "local", "user": "me"}}],
                    "current-context": "local",
                }
            ),
            encoding="utf-8",
        )
        return path

    # -- state ----------------------------------------------------------------------------------

    def objects(self, plural: str | None = None) -> list[dict[str, Any]]:
        """The stored objects (optionally of one plural), in creation order."""
        with self._lock:
            return [json.loads(json.dumps(o)) for k, o in self._objects.items() if plural in (None, k[2])]

    def set_conditions(
        self, plural: str, namespace: str, name: str, conditions: Iterable[tuple[str, str]]
    ) -> None:
        """Set an object's ``status.conditions`` to ``[(type, message), ...]`` (status "True")."""
        with self._lock:
            for key, obj in self._objects.items():
                if key[2:] == (plural, namespace, name):
                    obj["status"] = {
                        "conditions": [{"type": t, "status": "True", "message": m} for t, m in conditions]
                    }
                    return
        raise KeyError(f"no {plural} {namespace}/{name}")

    def script_conditions(
        self, plural: str, namespace: str, name: str, states: Iterable[Iterable[tuple[str, str]]]
    ) -> None:
        """Successive GETs of that object see successive ``states`` (each a list of conditions as
        for ``set_conditions``; the last one stays), as a job moving Created -> Running -> ..."""
        self._scripts[(plural, namespace, name)] = [list(s) for s in states]

    # -- HTTP -----------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, code: int, body: Mapping[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self, method: str) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                server.requests.append(
                    {
                        "method": method,
                        "path": url.path,
                        "query": {k: v[-1] for k, v in parse_qs(url.query).items()},
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body,
                    }
                )
                if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
                    self._reply(401, _status(401, "Unauthorized", "Unauthorized"))
                    return
                code, reply = server._serve(method, url.path, parse_qs(url.query), body)
                self._reply(code, reply)

            def do_GET(self) -> None:
                self._route("GET")

            def do_POST(self) -> None:
                self._route("POST")

            def do_DELETE(self) -> None:
                self._route("DELETE")

        return Handler

    def _serve(
        self, method: str, path: str, query: Mapping[str, list[str]], body: Any
    ) -> tuple[int, dict[str, Any]]:
        parts = path.strip("/").split("/")
        # apis/<group>/<version>/namespaces/<ns>/<plural>[/<name>]
        if len(parts) not in (6, 7) or parts[0] != "apis" or parts[3] != "namespaces":
            return 404, _status(404, "NotFound", f"the server could not find the requested resource ({path})")
        group, version, namespace, plural = parts[1], parts[2], parts[4], parts[5]
        name = parts[6] if len(parts) == 7 else None
        with self._lock:
            if method == "POST" and name is None:
                return self._create(group, version, namespace, plural, body, "All" in query.get("dryRun", []))
            if method == "GET" and name is None:
                items = [o for k, o in self._objects.items() if k[:4] == (group, version, plural, namespace)]
                return 200, {"kind": "List", "apiVersion": f"{group}/{version}", "items": items}
            key = (group, version, plural, namespace, name or "")
            if key not in self._objects:
                return 404, _status(404, "NotFound", f'{plural}.{group} "{name}" not found')
            if method == "GET":
                script = self._scripts.get((plural, namespace, name or ""))
                if script:
                    state = script.pop(0) if len(script) > 1 else script[0]
                    self._objects[key]["status"] = {
                        "conditions": [{"type": t, "status": "True", "message": m} for t, m in state]
                    }
                return 200, self._objects[key]
            if method == "DELETE":
                del self._objects[key]
                return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
        return 405, _status(405, "MethodNotAllowed", f"{method} is not supported on {path}")

    def _create(
        self, group: str, version: str, namespace: str, plural: str, body: Any, dry_run: bool
    ) -> tuple[int, dict[str, Any]]:
        if not isinstance(body, dict):
            return 400, _status(400, "BadRequest", "the body of the request was not a JSON object")
        raw_meta = body.get("metadata")
        meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
        name = str(meta.get("name") or "")
        kind = str(body.get("kind") or plural)
        problems = list(self.admit(body)) if self.admit is not None else []
        if not name:
            problems.insert(0, "metadata.name: Required value: name or generateName is required")
        if problems:
            message = f'{kind}.{group} "{name}" is invalid: ' + ", ".join(problems)
            return 422, _status(422, "Invalid", message, problems)
        key = (group, version, plural, namespace, name)
        if key in self._objects:
            return 409, _status(409, "AlreadyExists", f'{plural}.{group} "{name}" already exists')
        created = json.loads(json.dumps(body))
        self._uid += 1
        created["metadata"] = {
            **meta,
            "namespace": namespace,
            "uid": f"00000000-0000-0000-0000-{self._uid:012d}",
            "resourceVersion": str(self._uid),
        }
        if not dry_run:
            self._objects[key] = created
        return 201, created
