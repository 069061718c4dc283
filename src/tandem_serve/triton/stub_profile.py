"""Opt-in cProfile of a Python-backend stub's `execute` calls, for finding per-request host work.

Set `TANDEM_STUB_PROFILE=DIR` in the server's environment (`tandem serve triton` passes it to the
stubs): each stub then profiles every batch it runs and rewrites `DIR/<stage>-<pid>.prof` at most
every few seconds and at exit. Read them with `python bench/stub_profile.py DIR`. Off (no cost)
when the variable is unset. GPU work is asynchronous: its time shows where the host waits for it
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
