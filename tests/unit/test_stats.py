"""Parsing Triton's statistics JSON (HTTP ints, gRPC-as-JSON strings)."""

from tandem_serve.stats import format_statistics, parse_statistics


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
    assert idle.requests == 0 and idle.queue_ms == 0.0 and idle.mean_batch == 0.0
    assert "encoder" in format_statistics([encoder, idle]).splitlines()[1]
