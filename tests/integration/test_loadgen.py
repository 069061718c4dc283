"""The load generator against the real Triton: every request counted by the server, answers right, no leaks."""

from __future__ import annotations

import functools
import os
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tandem_serve.loadgen import LoadSpec, TritonSender, measure
from tandem_serve.triton.statistics import read_statistics
from tandem_serve.workloads import OUTPUTS, mixed_length_texts, triton_requests
from tests.helpers import assert_cosines


def _ensemble_successes(client, expected: int | None = None) -> int:
    """The ensemble's success count; with `expected`, polled briefly (the server counts just after it replies)."""
    deadline = time.monotonic() + 3.0
    while True:
        count = next(s.requests for s in read_statistics(client, "grpc") if s.model == "text_embedding_fused")
        if expected is None or count == expected or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


@pytest.mark.parametrize("protocol, shm, processes", [("grpc", "none", 1), ("http", "none", 1), ("grpc", "system", 1),
                                                     ("http", "system", 1), ("grpc", "system", 2)])
def test_closed_loop_requests_match_the_servers_count(triton, protocol, shm, processes):
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    stats = grpcclient.InferenceServerClient(triton.grpc_url)
    requests = triton_requests("text", 16, seed=5)
    before_shm = {n for n in os.listdir("/dev/shm") if n.startswith("tandem")}
    before = _ensemble_successes(stats)
    spec = LoadSpec("closed", concurrency=3, seconds=1.5, warm_up=1)
    sender = functools.partial(TritonSender, url, protocol, "text_embedding_fused", requests, OUTPUTS["text"], shm=shm,
                               slots=3)
    (point,) = measure(sender, [spec], stats=(stats, "grpc"), processes=processes, server_pid=triton.process.pid)
    assert point.errors == 0 and point.completed > 0
    expected = before + point.completed + 3  # the server saw each timed and warm-up request
    # the server's own CPU time (tritonserver + stubs, psutil), bounded by what /proc/stat saw the whole host spend
    assert point.warm_up_requests == 3 and point.server_cpu_s > 0
    assert point.server_cpu_s <= point.host_cores_busy * (spec.seconds + 2.0), (point.server_cpu_s, point.host_cores_busy)
    assert 0.01 < point.server_cpu_ms_per_request < 1000
    assert _ensemble_successes(stats, expected) == expected
    assert {s.model for s in point.stages} >= {"text_embedding_fused", "tokenizer", "encoder_fused"}
    assert {n for n in os.listdir("/dev/shm") if n.startswith("tandem")} == before_shm
    assert not [r for r in stats.get_system_shared_memory_status(headers=triton.keys.shm_headers("grpc")).regions
                if r.startswith("tandem")]


def test_sender_returns_the_models_answers(triton, reference):
    import asyncio

    texts = mixed_length_texts(4, seed=5)

    async def ask():
        async with TritonSender(triton.grpc_url, "grpc", "text_embedding_fused", triton_requests("text", 4, seed=5),
                                OUTPUTS["text"], shm="system", slots=2) as send:
            return [(await send(i))["embedding"][0] for i in range(4)]

    assert_cosines(np.stack(asyncio.run(ask())), reference(texts))


def test_requests_of_several_texts_get_one_embedding_per_text(triton, reference):
    import asyncio

    texts = mixed_length_texts(12, seed=6)

    async def ask():
        async with TritonSender(triton.grpc_url, "grpc", "text_embedding_fused", triton_requests("text", 3, seed=6, items=4),
                                OUTPUTS["text"]) as send:
            return [(await send(i))["embedding"] for i in range(3)]

    answers = asyncio.run(ask())
    assert [a.shape[0] for a in answers] == [4, 4, 4]
    assert_cosines(np.concatenate(answers), reference(texts))


def test_open_loop_and_a_failing_target_are_reported_not_raised(triton):
    requests = triton_requests("text", 8, seed=1)
    good, missing = measure(lambda: TritonSender(triton.grpc_url, "grpc", "text_embedding_fused", requests, OUTPUTS["text"]),
                            [LoadSpec("open", concurrency=16, rate=20, seconds=1.5, warm_up=1)])[0], \
        measure(lambda: TritonSender(triton.grpc_url, "grpc", "no_such_model", requests, OUTPUTS["text"]),
                [LoadSpec("closed", concurrency=2, seconds=0.3, warm_up=0)])[0]
    assert good.errors == 0 and good.dropped == 0 and 10 <= good.completed <= 60  # Poisson(30) +- 4 sd
    assert missing.completed == 0 and missing.errors > 0 and "no_such_model" in missing.first_error
