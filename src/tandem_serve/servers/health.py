"""A health endpoint the launcher owns, for orchestrators: GET /live, /ready and /status, no token needed.

The servers' own probes do not tell the whole truth (Triton 2.51 stays ready with a dead Python
stub; TorchServe's /ping needs the inference token). The launcher's supervisor knows more and
answers here: 200 or 503 on /live and /ready, and a JSON body naming each model's state.
Nothing here needs a key: it says only whether models serve, never serves or changes them.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealthStatus:
    """What the endpoint reports: live (the server process runs), ready (every model serves), per-model detail."""

    live: bool
    ready: bool
    server: str
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    reason: str = ""  # why not ready, in one line
    detail: dict[str, Any] = field(default_factory=dict)  # what the watcher did (e.g. reclaimed registrations)


class HealthServer:
    """Serves `status()` on host:port (0: a free port) from a daemon thread; use as a context manager."""

    def __init__(self, status: Callable[[], HealthStatus], host: str = "127.0.0.1", port: int = 0):
        handler = type("HealthHandler", (_Handler,), {"status": staticmethod(status)})
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="tandem-health", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> "HealthServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "HealthServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    status: Callable[[], HealthStatus]
    server_version = "tandem-health"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0].rstrip("/")
        if path not in ("/live", "/ready", "/status"):
            self._send(404, {"error": f"unknown path {path!r}; use /live, /ready or /status"})
            return
        try:
            status = self.status()
        except Exception as exc:  # noqa: BLE001 - a failing check is a not-ready answer, never a crash
            logger.exception("health check failed")
            status = HealthStatus(live=False, ready=False, server="unknown", reason=f"health check failed: {exc}")
        ok = {"/live": status.live, "/ready": status.ready, "/status": True}[path]
        self._send(200 if ok else 503, asdict(status))

    def _send(self, code: int, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        logger.debug("health %s", format % args)
