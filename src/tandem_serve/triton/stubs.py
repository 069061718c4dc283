"""The Python-backend stub processes of a tritonserver: the model and instance each serves, its /dev/shm region.

A stub's command line is `<stub> <model.py> <shm region> <default size> <growth size> <server pid>
<backend dir> <ipc handle> <instance name> <model dir>` (Triton 24.10 through 26.x). The server creates
each stub's region with mode 0644 whatever the umask (Boost.Interprocess sets the permissions after
creating it), so the launcher narrows it to 0600; a SIGKILLed stub leaves its region behind.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil

logger = logging.getLogger(__name__)
STUB_NAME = "triton_python_backend_stub"
SHM_DIR = Path("/dev/shm")


def shm_file(name: str) -> Path:
    """The /dev/shm file of a POSIX shared-memory name (with or without its leading '/')."""
    return SHM_DIR / name.lstrip("/")


@dataclass(frozen=True)
class Stub:
    """One Python-backend stub process."""

    pid: int
    model: str  # the model directory's name (<repository>/<model>/<version>/model.py)
    instance: str  # e.g. tokenizer_0_1
    region: str  # its shared-memory region's name under /dev/shm
    server_pid: int  # the tritonserver that started it
    executable: Path

    @property
    def region_path(self) -> Path:
        return shm_file(self.region)


def parse_stub(pid: int, argv: list[str]) -> Stub | None:
    """A Stub from a process's argv, or None when it is not a Python-backend model-instance stub."""
    if len(argv) < 9 or not argv[0].endswith(STUB_NAME):
        return None
    try:
        server_pid = int(argv[5])
    except ValueError:
        return None
    return Stub(pid, Path(argv[1]).parent.parent.name, argv[8], argv[2], server_pid, Path(argv[0]))


def all_stubs() -> list[Stub]:
    """Every live (not zombie) Python-backend stub on this machine that this user may inspect."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline", "status"]):
        info = process.info
        if info["status"] == psutil.STATUS_ZOMBIE or not info["cmdline"]:
            continue
        stub = parse_stub(info["pid"], info["cmdline"])
        if stub is not None:
            found.append(stub)
    return found


def server_stubs(server_pid: int) -> list[Stub]:
    """The live stubs that the tritonserver `server_pid` started."""
    return [s for s in all_stubs() if s.server_pid == server_pid]


def unlink_region(region: str) -> bool:
    """Remove a stub's /dev/shm region; True when there was one to remove."""
    try:
        shm_file(region).unlink()
        return True
    except FileNotFoundError:
        return False


def protect_region(stub: Stub) -> bool:
    """Narrow a stub's region to owner read/write (0600); True when its mode was changed."""
    try:
        mode = stat.S_IMODE(stub.region_path.stat().st_mode)
        if mode & 0o077:
            os.chmod(stub.region_path, 0o600)
            return True
    except FileNotFoundError:
        pass
    return False


def orphaned_stubs(is_ours: Callable[[Stub], bool]) -> list[Stub]:
    """Stubs whose tritonserver is gone, among those `is_ours(stub)` accepts (started by this launcher).

    That happens when the process that launched the server is SIGKILLed: the server dies with it
    (PR_SET_PDEATHSIG) but its stubs are re-parented and live on, each holding a /dev/shm region.
    """
    found = []
    for stub in all_stubs():
        if not is_ours(stub):
            continue
        try:
            server = psutil.Process(stub.server_pid)
            if server.status() != psutil.STATUS_ZOMBIE and server.name().startswith("tritonserver"):
                continue  # its server still runs
        except psutil.NoSuchProcess:
            pass
        found.append(stub)
    return found


def kill_stubs(stubs: list[Stub]) -> None:
    """SIGKILL stubs and remove their regions."""
    for stub in stubs:
        try:
            psutil.Process(stub.pid).kill()
        except psutil.NoSuchProcess:
            pass
    for stub in stubs:
        unlink_region(stub.region)
