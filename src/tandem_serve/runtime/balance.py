"""Routing micro-batches between lanes (GPU and CPU copies of a stage; nvJPEG and CPU decoding) by queue and speed.

Each lane (one device running the stage) keeps the rows routed to it and not yet finished, and a
moving average of the seconds it took per row. A micro-batch goes to the lane expected to finish
it first: (rows queued there / the lane's servers + its rows) x that lane's seconds per row, where a
lane's servers are the micro-batches it runs at once (pool threads decoding on the CPU). A lane not yet measured
counts as free while it is idle, so each lane is tried once; after that the measurements decide.
The rule is the one a join-the-shortest-expected-delay queue uses; with a GPU many times faster
than the CPU the CPU lane gets work only while the GPU's backlog is long.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class Lane:
    """One device that can run the stage, and what has been observed of it."""

    name: str
    servers: int = 1  # micro-batches the lane runs at once
    rows_in_flight: int = 0
    seconds_per_row: float | None = None  # moving average; None until the first micro-batch finished
    rows_routed: int = 0
    batches_routed: int = 0

    def expected_finish(self, rows: int) -> float:
        """Seconds until a micro-batch of `rows` routed here now would be done."""
        if self.seconds_per_row is None:
            return 0.0 if self.rows_in_flight == 0 else float("inf")
        return (self.rows_in_flight / self.servers + rows) * self.seconds_per_row


class LaneBalancer:
    """Thread-safe choice of a lane per micro-batch; the first lane wins ties (put the GPU first)."""

    def __init__(self, names: list[str], smoothing: float = 0.2, servers: list[int] | None = None):
        if not names:
            raise ValueError("a balancer needs at least one lane")
        if not 0.0 < smoothing <= 1.0:
            raise ValueError("smoothing must be in (0, 1]")
        servers = servers or [1] * len(names)
        if len(servers) != len(names) or min(servers) < 1:
            raise ValueError("one server count >= 1 per lane")
        self.lanes = [Lane(name, count) for name, count in zip(names, servers)]
        self.smoothing = smoothing
        self._lock = threading.Lock()

    def choose(self, rows: int) -> Lane:
        """The lane a micro-batch of `rows` goes to; counts the rows as in flight there."""
        with self._lock:
            lane = min(self.lanes, key=lambda candidate: candidate.expected_finish(rows))
            lane.rows_in_flight += rows
            lane.rows_routed += rows
            lane.batches_routed += 1
            return lane

    def done(self, lane: Lane, rows: int, seconds: float) -> None:
        """A micro-batch of `rows` routed to `lane` finished after `seconds` of service on the device."""
        with self._lock:
            lane.rows_in_flight = max(0, lane.rows_in_flight - rows)
            if rows <= 0 or seconds <= 0:
                return
            sample = seconds / rows
            if lane.seconds_per_row is None:
                lane.seconds_per_row = sample
            else:
                lane.seconds_per_row += self.smoothing * (sample - lane.seconds_per_row)

    def failed(self, lane: Lane, rows: int) -> None:
        """A micro-batch routed to `lane` failed: release its rows without a measurement."""
        with self._lock:
            lane.rows_in_flight = max(0, lane.rows_in_flight - rows)

    def snapshot(self) -> dict[str, dict[str, float | int | None]]:
        """Per lane: rows and micro-batches routed so far, and the current ms per row."""
        with self._lock:
            return {lane.name: {"rows": lane.rows_routed, "batches": lane.batches_routed,
                                "ms_per_row": None if lane.seconds_per_row is None else lane.seconds_per_row * 1e3}
                    for lane in self.lanes}
