"""Reclaim the system shared-memory registrations of clients that died without unregistering.

A client that is SIGKILLed leaves its regions registered: Triton keeps them mapped (memory held,
"deleted" mappings once the file is gone) and the names stay taken. A registration is stale when no
process other than the server maps its /dev/shm file or holds it open. That can only be judged for
processes this user may inspect in this PID namespace: where clients run in another container that
shares /dev/shm (a sidecar without a shared process namespace), turn reclaiming off.
CUDA shared-memory registrations carry an IPC handle, not a file: they cannot be judged and are kept.
"""

from __future__ import annotations

import logging
import os

import psutil

from tandem_serve.triton.stubs import SHM_DIR, shm_file

logger = logging.getLogger(__name__)


def shm_files_in_use(exclude: set[int]) -> set[str]:
    """The /dev/shm files that processes (other than `exclude`) map or hold open."""
    used: set[str] = set()
    prefix = str(SHM_DIR) + "/"
    for process in psutil.process_iter(["pid"]):
        pid = process.info["pid"]
        if pid in exclude:
            continue
        try:
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    at = line.find(prefix)
                    if at >= 0:
                        used.add(line[at:].rstrip("\n").removesuffix(" (deleted)"))
            for fd in os.scandir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(fd.path)
                except OSError:
                    continue
                if target.startswith(prefix):
                    used.add(target.removesuffix(" (deleted)"))
        except (OSError, ValueError):
            continue  # gone, or another user's process
    return used


class StaleRegions:
    """Tracks registrations seen unused: a registration must be unused at two checks in a row to be stale."""

    def __init__(self) -> None:
        self._unused_once: set[tuple[str, str]] = set()

    def check(self, registered: list[dict], server_pid: int) -> list[dict]:
        """The registrations (Triton's status entries: name, key, ...) stale at this check and the last."""
        used = shm_files_in_use({server_pid})
        unused = {(r["name"], r["key"]) for r in registered if str(shm_file(r["key"])) not in used}
        stale = [r for r in registered if (r["name"], r["key"]) in unused & self._unused_once]
        self._unused_once = unused
        return stale
