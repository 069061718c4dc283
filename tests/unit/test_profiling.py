"""The opt-in profiler: off without TANDEM_STUB_PROFILE; with it, dumps that pstats reads and that name the work done."""

from __future__ import annotations

import pstats
import time

from tandem_serve import profiling


def _busy_work(n: int) -> int:
    return sum(i * i for i in range(n))


def _functions(path) -> set[str]:
    return {name for (_, _, name) in pstats.Stats(str(path)).stats}  # type: ignore[attr-defined]


def test_off_without_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv(profiling.ENV, raising=False)
    assert profiling.run_profiled("stage", lambda: 7) == 7
    profiling.profile_thread("worker").tick()
    assert not list(tmp_path.iterdir())


def test_run_profiled_dumps_the_batches(monkeypatch, tmp_path):
    monkeypatch.setenv(profiling.ENV, str(tmp_path / "prof"))
    monkeypatch.setattr(profiling, "_profiles", {})
    assert profiling.run_profiled("tokenizer", lambda: _busy_work(1000)) == _busy_work(1000)
    profiling._profiles["tokenizer"].dump()
    (dump,) = (tmp_path / "prof").glob("tokenizer-*.prof")
    assert "_busy_work" in _functions(dump)
    assert (tmp_path / "prof").stat().st_mode & 0o077 == 0  # request-shaped data: this user's only


def test_profile_thread_covers_the_thread_between_ticks(monkeypatch, tmp_path):
    monkeypatch.setenv(profiling.ENV, str(tmp_path))
    monkeypatch.setattr(profiling, "THREAD_DUMP_EVERY_S", 0.0)
    profile = profiling.profile_thread("text_embedding")
    try:
        _busy_work(1000)  # outside any handler call: TorchServe's own loop runs here in a worker
        time.sleep(0.01)
        profile.tick()
    finally:
        profile.stop()  # on after tick, as in a worker
    (dump,) = tmp_path.glob("text_embedding-*.prof")
    assert "_busy_work" in _functions(dump)
