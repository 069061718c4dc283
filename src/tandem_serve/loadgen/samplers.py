"""What a load level costs the machine: busy cores, a process tree's CPU time, GPU utilisation."""

from __future__ import annotations

import shutil
import subprocess
import threading
from typing import Callable

import numpy as np
import psutil


def host_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, over all cores (psutil); idle and iowait not busy."""
    times = psutil.cpu_times()
    guest = getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)  # already counted in user and nice
    total = sum(times) - guest
    return total - times.idle - getattr(times, "iowait", 0.0), total


class HostCpu:
    """Cores of this machine busy while the block runs (all processes, psutil); None where no time passed."""

    def __enter__(self) -> "HostCpu":
        self.cores: float | None = None
        self._start = host_busy_seconds()
        return self

    def __exit__(self, *exc_info: object) -> None:
        end = host_busy_seconds()
        if end[1] > self._start[1]:
            self.cores = (end[0] - self._start[0]) / (end[1] - self._start[1]) * psutil.cpu_count()


def _part_of(process: psutil.Process, root_pid: int) -> str:
    """What a process of the server's tree is, for the CPU breakdown: the root's name, a Python-backend stub's model
    ("stub:<model>"), else the process name."""
    from tandem_serve.triton.stubs import parse_stub

    if process.pid == root_pid:
        return process.name()
    stub = parse_stub(process.pid, process.cmdline())
    return f"stub:{stub.model}" if stub is not None else process.name()


class ProcessTreeCpu:
    """CPU seconds (user + system) a process and its descendants spend while the block runs (psutil); None without
    a pid. A process that starts inside the block counts from zero; one that ends inside it is lost. `parts` splits
    the seconds by what each process is (the server itself, each model's stubs)."""

    def __init__(self, pid: int | None):
        self.pid = pid
        self.seconds: float | None = None
        self.parts: dict[str, float] = {}
        self._labels: dict[int, str] = {}

    def _sample(self) -> dict[int, float]:
        try:
            root = psutil.Process(self.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return {}
        times = {}
        for process in processes:
            try:
                cpu = process.cpu_times()
                times[process.pid] = cpu.user + cpu.system
                if process.pid not in self._labels:
                    self._labels[process.pid] = _part_of(process, root.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return times

    def __enter__(self) -> "ProcessTreeCpu":
        self._start = self._sample() if self.pid else {}
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.pid:
            end = self._sample()
            spent = {pid: max(0.0, seconds - self._start.get(pid, 0.0)) for pid, seconds in end.items()}
            self.seconds = sum(spent.values())
            for pid, seconds in spent.items():
                label = self._labels.get(pid, "?")
                self.parts[label] = self.parts.get(label, 0.0) + seconds


class GpuSampler:
    """Mean GPU utilisation (%) of device 0 while the block runs, from NVML or nvidia-smi; None without either."""

    def __init__(self, device: int = 0, interval_s: float = 0.1):
        self.device, self.interval_s = device, interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process: subprocess.Popen | None = None

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None

    def __enter__(self) -> "GpuSampler":
        reader = self._nvml_reader()
        if reader is not None:
            self._thread = threading.Thread(target=self._poll, args=(reader,), daemon=True, name="gpu-sampler")
        elif shutil.which("nvidia-smi"):
            self._process = subprocess.Popen(
                ["nvidia-smi", f"--id={self.device}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 f"-lms={int(self.interval_s * 1000)}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read_smi, daemon=True, name="gpu-sampler")
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _nvml_reader(self) -> Callable[[], float] | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.device)
            return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # noqa: BLE001 - no NVML here (CPU machine, or the package is missing)
            return None

    def _poll(self, read: Callable[[], float]) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append(read())

    def _read_smi(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            if self._stop.is_set():
                break
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                continue
