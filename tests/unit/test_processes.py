"""Helpers for the server processes: the log excerpt an error message carries."""

from __future__ import annotations

from tandem_serve.servers.processes import log_tail


def test_a_long_log_keeps_its_first_lines_and_error_lines_before_the_tail(tmp_path):
    log = tmp_path / "server.log"
    lines = ["Error: --grpc-port option expects an integer", "Usage: tritonserver [options]", "  --model-repository"]
    lines += [f"  option {i}" for i in range(200)] + ["E1202 error: failed to load all models"] + ["last"] * 10
    log.write_text("\n".join(lines) + "\n")
    text = log_tail(log, 20)
    assert text.index("Error: --grpc-port option expects an integer") < text.index("--- last 20 lines")
    assert text.count("failed to load all models") == 1  # within the tail: not repeated
    assert "option 100" not in text and text.rstrip().endswith("last")
    short = tmp_path / "short.log"
    short.write_text("one\ntwo\n")
    assert log_tail(short, 20) == f"--- last 20 lines of {short} ---\none\ntwo"
    assert "no log at" in log_tail(tmp_path / "missing.log")


def test_free_ports_are_distinct_and_avoid_the_taken_ones():
    from tandem_serve.servers.processes import free_ports

    for _ in range(50):
        ports = free_ports(5)
        assert len(set(ports)) == 5 and all(1024 <= p <= 65535 for p in ports)
    taken = free_ports(3)
    assert not set(free_ports(20, taken=taken)) & set(taken)
