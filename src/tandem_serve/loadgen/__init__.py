"""Load generation: asyncio closed loop (fixed concurrency) and open loop (Poisson arrivals at a rate).

A target is any `async send(i)` that serves request i (a Triton model through `TritonSender`, or an
in-process handler). Closed loop: `concurrency` senders issue requests back to back. Open loop:
requests arrive at `rate` per second whatever the server does; each latency is counted from the
request's scheduled arrival (so a slow server is not hidden by a waiting client), and an arrival
finding `concurrency` requests already in flight is counted as dropped. GPU utilisation is
sampled during the timed window when NVML (or nvidia-smi) is there, the machine's busy cores are
read through psutil, and per-stage Triton statistics are read before and after.

One Python process sends a few thousand small requests per second at most (tritonclient spends
~0.2-0.3 ms of CPU on each): `measure(..., processes=N)` spreads every level over N spawned
processes (each with its share of the concurrency or rate, the windows started together) and
merges their latencies. `LoadPoint.client_cores` tells whether the load generator itself was busy.
"""

from tandem_serve.loadgen.loops import measure_async
from tandem_serve.loadgen.runner import measure, share
from tandem_serve.loadgen.samplers import GpuSampler, HostCpu, ProcessTreeCpu, host_busy_seconds
from tandem_serve.loadgen.senders import PostSender, TorchServeSender, TritonSender
from tandem_serve.loadgen.spec import MODES, LoadPoint, LoadSpec, Send, percentile_ms

__all__ = ["MODES", "GpuSampler", "HostCpu", "LoadPoint", "LoadSpec", "PostSender", "ProcessTreeCpu", "Send",
           "TorchServeSender", "TritonSender", "host_busy_seconds", "measure", "measure_async", "percentile_ms", "share"]
