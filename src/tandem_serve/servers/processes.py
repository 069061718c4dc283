"""Process and port helpers shared by the embedded-server launchers (Linux)."""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Sequence

import psutil

logger = logging.getLogger(__name__)


def free_ports(count: int, host: str = "127.0.0.1", taken: Sequence[int] = ()) -> list[int]:
    """`count` distinct TCP ports free on `host` right now, none of them in `taken`: all bound at once (ports taken
    one after another can repeat: CI saw tritonserver refuse the same port for HTTP and gRPC)."""
    sockets: list[socket.socket] = []
    try:
        while len(sockets) < count:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            sock.bind((host, 0))
            if sock.getsockname()[1] in taken:
                sock.close()
                continue
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def client_host(host: str) -> str:
    """The address a local client uses to reach a server bound to `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


def private_child() -> None:
    """In the child before exec: die with the parent, and create files readable by this user only (umask 077)."""
    die_with_parent()
    os.umask(0o077)


def process_group_members(pgid: int) -> list[int]:
    """Pids of live (not zombie) processes in process group `pgid`."""
    members = []
    for process in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(process.info["pid"]) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process.info["pid"])
        except (ProcessLookupError, PermissionError):
            continue
    return members


def scrub_arguments(pid: int, secrets: list[str]) -> bool:
    """Overwrite `secrets` in a child's command line (what /proc/<pid>/cmdline shows other users) with 'x'.

    For values the program copied while parsing its options (tritonserver's restricted-API keys): it no
    longer reads them there. Needs ptrace access to the child (same user; the parent under Yama's default).
    Returns False, changing nothing, when the process cannot be written.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (proc(5), fields 48 and 49)
        with open(f"/proc/{pid}/mem", "r+b", buffering=0) as memory:
            memory.seek(start)
            arguments = memory.read(end - start)
            for secret in secrets:
                needle = secret.encode()
                offset = arguments.find(needle)
                while offset >= 0:
                    memory.seek(start + offset)
                    memory.write(b"x" * len(needle))
                    offset = arguments.find(needle, offset + len(needle))
        return all(secret.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes() for secret in secrets)
    except (OSError, IndexError, ValueError):
        return False


def kill_process_group(pgid: int, what: str, wait_s: float = 5.0) -> None:
    """SIGKILL every process left in group `pgid` and wait until they are gone."""
    if not process_group_members(pgid):
        return
    logger.warning("killing %d leftover process(es) of %s's group %d", len(process_group_members(pgid)), what, pgid)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait_s
    while process_group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


def stop_process(process: subprocess.Popen, what: str, timeout_s: float, signum: int = signal.SIGINT) -> None:
    """Send `signum`, wait up to `timeout_s`, then SIGKILL; the group (start_new_session) is reaped by the caller."""
    if process.poll() is None:
        process.send_signal(signum)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.0f s; killing it", what, timeout_s)
            process.kill()
            process.wait()


def log_tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file, for error messages; where the log is longer, its first lines and its lines
    naming an error come first (tritonserver prints an option's error above a usage text longer than the tail)."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    tail = f"--- last {lines} lines of {path} ---\n" + "\n".join(text[-lines:])
    earlier = text[:-lines]
    if not earlier:
        return tail
    errors = [line for line in earlier[3:] if "error" in line.lower()][:5]
    return "\n".join(["--- first lines ---", *earlier[:3], *(["--- lines naming an error ---", *errors] if errors else []),
                      tail])
