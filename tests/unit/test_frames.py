"""The read-ahead frame reader against TorchServe's own: the same messages from the same bytes, however they arrive."""

from __future__ import annotations

import json
import socket
import threading

import pytest

otf = pytest.importorskip("ts.protocol.otf_message_handler")

from tandem_serve.torchserve import frames  # noqa: E402


def _batch(count: int, payload: bytes = b"") -> bytes:
    requests = []
    for i in range(count):
        headers = [(b"authorization", b"Bearer k%d" % i), (b"content-type", b"application/json"),
                   (b"user-agent", b"load"), (b"x-empty", b"")]
        body = json.dumps({"text": f"text {i} " * (i % 7)}).encode()
        parameters = [("body", "application/json", body)]
        if payload:
            parameters.append(("data", "application/octet-stream", payload + bytes([i])))
        requests.append((f"req-{i}", headers, parameters))
    return frames.inference_frame(requests)


def _read_all(stream: bytes, messages: int, step: int | None) -> list:
    """`messages` messages parsed by otf.retrieve_msg from `stream`, written `step` bytes at a time (None: at once)."""
    reader, writer = socket.socketpair()
    reader.settimeout(20)  # a reader that loses its place fails the test instead of hanging it

    def write() -> None:
        if step is None:
            writer.sendall(stream)
        else:
            for start in range(0, len(stream), step):
                writer.sendall(stream[start:start + step])
    thread = threading.Thread(target=write)
    thread.start()
    try:
        return [otf.retrieve_msg(reader) for _ in range(messages)]
    finally:
        thread.join()
        reader.close()
        writer.close()


@pytest.mark.parametrize("step", [None, 1, 4093])
def test_read_ahead_parses_what_torchserve_parses(monkeypatch, step):
    stream = _batch(3) + _batch(32) + _batch(2, payload=bytes(range(256)) * 1000) + _batch(1)  # one field > CHUNK
    expected = _read_all(stream, 4, None)
    assert [len(message) for _, message in expected] == [3, 32, 2, 1]
    monkeypatch.setattr(otf, frames.READER, otf._retrieve_buffer)  # restored after the test
    assert frames.install(otf, "0.12.0")
    assert frames.install(otf, "0.12.0")  # a second model in the same worker: left in place
    assert _read_all(stream, 4, step) == expected
    assert expected[2][1][1]["parameters"][1]["value"] == bytes(range(256)) * 1000 + b"\x01"


def test_read_ahead_exits_when_the_frontend_closes():
    reader, writer = socket.socketpair()
    writer.sendall(b"I\x00\x00")
    writer.close()
    with pytest.raises(SystemExit):
        frames.ReadAhead().read(reader, 4)
    reader.close()


def test_an_untested_release_or_a_module_without_the_reader_is_left_alone(caplog, monkeypatch):
    import types

    module = types.ModuleType("other_protocol")
    assert not frames.install(module, "0.12.0")
    assert not hasattr(module, frames.READER)
    monkeypatch.setattr(otf, frames.READER, otf._retrieve_buffer)
    original = otf._retrieve_buffer
    assert not frames.install(otf, "0.13.0")
    assert otf._retrieve_buffer is original
    assert caplog.text.count("read field by field") == 2
