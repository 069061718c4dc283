"""Opt-in cProfile of the server-side Python (Triton's Python-backend stubs, TorchServe's workers), for finding
per-request host work.

Set `TANDEM_STUB_PROFILE=DIR` in the server's environment (`tandem serve triton` passes it to the stubs; TorchServe's
frontend passes its environment to the workers): each stub then profiles every batch it runs (`run_profiled`, wall
time), each TorchServe worker its main thread from the handler's start (`profile_thread`, wall time: TorchServe's own
reading and writing of frames shows beside the handler, its wait for the next batch as `recv`), and rewrites
`DIR/<stage>-<pid>.prof` at most every few seconds (every second for a worker, which TorchServe stops without running
atexit) and at exit. Read them with `python bench/stub_profile.py DIR`. Off (no cost) when the variable
is unset. GPU work is asynchronous: its time shows where the host waits for it
(`.cpu()`, `.item()`, `len()` of a masked tensor), which is what a profile of host work should show.
"""

from __future__ import annotations

import atexit
import cProfile
import os
import time
from pathlib import Path
from typing import Callable, TypeVar

ENV = "TANDEM_STUB_PROFILE"
DUMP_EVERY_S = 5.0
THREAD_DUMP_EVERY_S = 1.0
_T = TypeVar("_T")


class _StubProfile:
    """One profiler per stage in this process, dumped to DIR/<stage>-<pid>.prof."""

    def __init__(self, directory: Path, stage: str):
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = directory / f"{stage}-{os.getpid()}.prof"
        self.profile = cProfile.Profile()
        self.last_dump = time.monotonic()
        atexit.register(self.dump)

    def dump(self) -> None:
        self.profile.dump_stats(str(self.path))
        self.last_dump = time.monotonic()


_profiles: dict[str, _StubProfile] = {}


def run_profiled(stage: str, batch: Callable[[], _T]) -> _T:
    """`batch()`, under this process's profiler for `stage` when TANDEM_STUB_PROFILE is set (its call count is
    the batch count); else plainly."""
    directory = os.environ.get(ENV)
    if not directory:
        return batch()
    entry = _profiles.get(stage)
    if entry is None:
        entry = _profiles[stage] = _StubProfile(Path(directory), stage)
    try:
        return entry.profile.runcall(batch)
    finally:
        if time.monotonic() - entry.last_dump > DUMP_EVERY_S:
            entry.dump()


class ThreadProfile:
    """The profile of one thread from its start (None: profiling is off); `tick` on that thread now and then."""

    def __init__(self, entry: _StubProfile | None):
        self.entry = entry
        if entry is not None:
            entry.profile.enable()

    def tick(self) -> None:
        """Rewrite the dump when the last one is over THREAD_DUMP_EVERY_S old (dump_stats stops the profiler: restart)."""
        if self.entry is not None and time.monotonic() - self.entry.last_dump > THREAD_DUMP_EVERY_S:
            self.entry.dump()
            self.entry.profile.enable()

    def stop(self) -> None:
        if self.entry is not None:
            self.entry.profile.disable()


def profile_thread(stage: str) -> ThreadProfile:
    """When TANDEM_STUB_PROFILE is set, profile the calling thread from now on, dumped by `tick` at most every second
    (wall time: gVisor's per-thread CPU clock gave nonsense); else a profile that does nothing."""
    directory = os.environ.get(ENV)
    return ThreadProfile(_StubProfile(Path(directory), stage) if directory else None)
