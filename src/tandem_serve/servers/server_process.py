"""The part both embedded-server launchers share: a child in its own session, a workspace, a readiness wait."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

from tandem_serve.servers.processes import die_with_parent, private_child

logger = logging.getLogger(__name__)


class ServerProcess:
    """A server process with its workspace (temporary unless given); use as a context manager."""

    name = "server"
    start_error: type[Exception] = RuntimeError

    def __init__(self, workspace: Path | None, prefix: str):
        self.process: subprocess.Popen[bytes] | None = None
        self._own_workspace = workspace is None
        self.workspace = Path(workspace or tempfile.mkdtemp(prefix=prefix)).resolve()

    def _spawn(self, command: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None,
               private: bool = True) -> None:
        """Start `command` in a new session (its group id is its pid), output to `log_path` (mode 0600), dying
        with us; `private`: with umask 077, so that what it and its children create is theirs alone."""
        logger.info("starting %s (log: %s)", self.name, log_path)
        logger.debug("command: %s", " ".join(command))
        descriptor = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.chmod(log_path, 0o600)
        with os.fdopen(descriptor, "ab") as log:
            self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=private_child if private else die_with_parent)

    def _wait_until(self, ready: Callable[[], bool], timeout_s: float, transient: tuple[type[BaseException], ...]) -> None:
        """Poll `ready` until true while the child lives; raise `start_error` with the log tail otherwise."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise self.start_error(f"{self.name} exited with code {code} during start-up\n{self.log_tail()}")
            try:
                if ready():
                    return
            except transient:
                pass
            time.sleep(0.5)
        raise self.start_error(f"{self.name} not ready after {timeout_s:.0f} s\n{self.log_tail()}")

    def _drop_workspace(self, keep: bool = False) -> None:
        if self._own_workspace and not keep:
            shutil.rmtree(self.workspace, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        raise NotImplementedError

    def start(self) -> "ServerProcess":
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
