"""Parsing Triton's statistics JSON (HTTP ints, gRPC-as-JSON strings)."""

from tandem_serve.triton.statistics import StageStats, format_statistics, parse_statistics, stats_delta


def test_parses_means_per_request_and_batch_size():
    raw = {"model_stats": [{
        "name": "encoder", "execution_count": "2", "inference_count": "8",
        "inference_stats": {
            "success": {"count": "4", "ns": "40000000"},
            "queue": {"count": "4", "ns": "4000000"},
            "compute_input": {"count": 4, "ns": 2000000},
            "compute_infer": {"count": 4, "ns": 20000000},
            "compute_output": {"count": 4, "ns": 2000000},
        },
    }, {"name": "idle", "inference_stats": {}}]}
    encoder, idle = parse_statistics(raw)
    assert (encoder.requests, encoder.executions, encoder.mean_batch) == (4, 2, 4.0)
    assert encoder.queue_ms == 1.0 and encoder.compute_ms == 6.0
    assert (encoder.input_ms, encoder.infer_ms, encoder.output_ms) == (0.5, 5.0, 0.5)
    assert idle.requests == 0 and idle.queue_ms == 0.0 and idle.mean_batch == 0.0
    assert "encoder" in format_statistics([encoder, idle]).splitlines()[1]


def test_delta_gives_the_means_of_the_interval_between_two_readings():
    before = StageStats("nms", requests=4, executions=2, inferences=4, queue_ms=1.0, compute_ms=2.0, infer_ms=1.5)
    now = StageStats("nms", requests=10, executions=5, inferences=12, queue_ms=2.0, compute_ms=3.0, infer_ms=2.0)
    delta = stats_delta(now, before)
    # 6 new requests carried 20 - 4 = 16 ms of queueing and 30 - 8 = 22 ms of compute
    assert (delta.requests, delta.executions, delta.inferences) == (6, 3, 8)
    assert abs(delta.queue_ms - 16 / 6) < 1e-12 and abs(delta.compute_ms - 22 / 6) < 1e-12
    assert abs(delta.infer_ms - (20 - 6) / 6) < 1e-12  # the parts the same way
    assert stats_delta(now, None) is now
    assert stats_delta(now, now).queue_ms == 0.0
