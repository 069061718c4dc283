"""The LitServe peer (bench/peers/litserve_text.py) as a child server on a free loopback port."""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path

from tandem_serve.servers.processes import free_ports, kill_process_group, log_tail, process_group_members, stop_process
from tandem_serve.servers.server_process import ServerProcess

logger = logging.getLogger("bench.peers")
SERVER = Path(__file__).with_name("litserve_text.py")


def litserve_missing() -> str | None:
    """Why the LitServe peer cannot run here (its packages missing), or None."""
    missing = [name for name in ("litserve", "sentence_transformers") if importlib.util.find_spec(name) is None]
    return f"{', '.join(missing)} not importable" if missing else None


class LitServePeer(ServerProcess):
    """`with LitServePeer(model) as peer:` POST `peer.url` {"text": ...}; ready once GET /health answers 200."""

    name = "LitServe peer"

    def __init__(self, model: Path, device: str = "cuda", extra_args: list[str] | None = None,
                 startup_timeout_s: float = 300.0):
        super().__init__(None, "tandem-litserve-")
        self.model, self.device, self.extra_args = Path(model), device, list(extra_args or [])
        self.startup_timeout_s = startup_timeout_s
        self.port = free_ports(1)[0]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/predict"

    def _healthy(self) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
            return response.status == 200

    def start(self) -> "LitServePeer":
        command = [sys.executable, str(SERVER), "--model", str(self.model), "--port", str(self.port),
                   "--device", self.device, *self.extra_args]
        self._spawn(command, dict(os.environ), self.workspace / "litserve.log")
        try:
            self._wait_until(self._healthy, self.startup_timeout_s, (OSError,))
        except BaseException:
            self.stop()
            raise
        logger.info("%s ready on port %d (%s)", self.name, self.port, " ".join(self.extra_args) or "defaults")
        return self

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGTERM)  # the server, its API servers and inference workers
            stop_process(self.process, self.name, 30.0, signal.SIGTERM)
            deadline = time.monotonic() + 15.0
            while process_group_members(self.process.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            kill_process_group(self.process.pid, self.name)  # what did not stop within that
        self._drop_workspace()

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.workspace / "litserve.log", lines)
