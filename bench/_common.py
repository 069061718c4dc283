"""Helpers shared by the benchmark scripts (run as `python bench/<script>.py`)."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import tempfile
import time
from dataclasses import dataclass


def machine() -> dict:
    """What the figures were measured on."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"host": platform.node(), "cpus": os.cpu_count(), "gpu": gpu, "torch": torch.__version__}


@dataclass(frozen=True)
class ChildRun:
    """A child process run to its end: wall and CPU seconds, its own peak RSS, its exit code and stdout."""

    seconds: float
    cpu_seconds: float
    peak_rss_mib: float
    returncode: int
    stdout: str


def run_child(command: list[str], poll_s: float = 0.02) -> ChildRun:
    """Run `command` to its end. The peak RSS is the child's VmHWM from /proc, read every `poll_s` while it runs:
    wait4's ru_maxrss of an exec'd child keeps the high-water mark of the process it was spawned from (this one)."""
    with tempfile.TemporaryFile() as out:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)  # children waited for so far
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=out)
        peak_kib = 0
        while child.poll() is None:
            peak_kib = max(peak_kib, _vm_hwm_kib(child.pid))
            time.sleep(poll_s)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # now with this one (poll() waited for it)
        out.seek(0)
        stdout = out.read().decode()
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return ChildRun(seconds, cpu, peak_kib / 1024, child.returncode, stdout)


def _vm_hwm_kib(pid: int) -> int:
    """A live process's peak resident set (VmHWM) in KiB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
