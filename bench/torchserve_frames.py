"""What TorchServe's worker spends reading its frontend's batches: its own field-by-field reader against the read-ahead
one (`tandem_serve.torchserve.frames`), on the same bytes over a socket pair.

A batch is `--batch` one-text JSON requests with the headers aiohttp and the inference token give (8 per request, as
the frontend forwards them). A thread writes `--batches` batches; the main thread parses them with
`ts.protocol.otf_message_handler.retrieve_msg`. Prints a table; writes OUT.json.

    python bench/torchserve_frames.py --out OUT.json [--batch 32] [--batches 2000]
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import threading
import time
from pathlib import Path

from _common import machine
from tandem_serve.torchserve import frames

HEADERS = [(b"host", b"127.0.0.1:8080"), (b"authorization", b"Bearer 9aXf2kQ1"), (b"content-type", b"application/json"),
           (b"content-length", b"37"), (b"accept", b"*/*"), (b"accept-encoding", b"gzip, deflate"),
           (b"user-agent", b"Python/3.12 aiohttp/3.11"), (b"connection", b"keep-alive")]


def batch_frame(size: int) -> bytes:
    body = json.dumps({"text": "a sentence of about the suite's median length"}).encode()
    return frames.inference_frame([(f"{i:08x}-4a6b-11ef-9c1d-0242ac120002", HEADERS, [("body", "application/json", body)])
                                   for i in range(size)])


def parse_seconds(protocol, frame: bytes, batches: int) -> float:
    """Seconds the main thread takes to parse `batches` copies of `frame` written by another thread."""
    reader, writer = socket.socketpair()
    writer_thread = threading.Thread(target=lambda: [writer.sendall(frame) for _ in range(batches)], daemon=True)
    start = time.perf_counter()
    writer_thread.start()
    for _ in range(batches):
        protocol.retrieve_msg(reader)
    seconds = time.perf_counter() - start
    writer_thread.join()
    reader.close()
    writer.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=2000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)  # retrieve_msg logs every batch at INFO
    import ts.protocol.otf_message_handler as protocol
    from ts.version import __version__ as version

    frame = batch_frame(args.batch)
    original = protocol._retrieve_buffer
    results = {}
    for label in ("torchserve", "read-ahead", "torchserve again", "read-ahead again"):
        protocol._retrieve_buffer = original
        if label.startswith("read-ahead"):
            frames.install(protocol, version)
        seconds = parse_seconds(protocol, frame, args.batches)
        results[label] = seconds / (args.batches * args.batch) * 1e6
    protocol._retrieve_buffer = original
    report = {"machine": machine(), "batch": args.batch, "frame_bytes": len(frame), "us_per_request": results}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"| reader | µs per request (batches of {args.batch}, {len(frame)} bytes) |\n|---|---|")
    for label, us in results.items():
        print(f"| {label} | {us:.1f} |")


if __name__ == "__main__":
    main()
