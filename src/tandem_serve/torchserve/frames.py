"""TorchServe's worker protocol read ahead: one `recv` per socket read instead of one per frame field.

TorchServe 0.12's worker reads each request of a batch field by field (`otf_message_handler._retrieve_buffer`:
the request id, every header's name and value, every parameter with their 4-byte lengths), one blocking `recv` each:
about 46 system calls for a one-text JSON request with a client's usual headers: 38-48 µs per request in the H200
machine's gVisor sandbox, 15-22 µs read ahead (bench/torchserve_frames.py). `ReadAhead.read` returns the same bytes,
in the same order, from a buffer refilled by one large `recv`; `install` puts it in place of the module's reader.
Nothing else reads the worker's socket, so the bytes read ahead are the next frames' and are served to them.
"""

from __future__ import annotations

import logging
import struct
import sys
import weakref
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)
CHUNK = 1 << 16  # bytes asked of the socket per refill (more when one field needs more)
READER = "_retrieve_buffer"  # the protocol module's function that every field read goes through
TESTED = ("0.12.",)  # TorchServe releases whose worker reads its socket only through READER (checked in their source)


class ReadAhead:
    """Exact-length reads from sockets, served from a per-socket buffer that one `recv` refills."""

    def __init__(self, chunk: int = CHUNK):
        self.chunk = chunk
        self.buffers: weakref.WeakKeyDictionary[Any, bytearray] = weakref.WeakKeyDictionary()
        self.last: tuple[Any, bytearray] | None = None  # a worker reads one socket: its buffer without a lookup

    def read(self, conn: Any, length: int) -> bytearray:
        """The next `length` bytes of `conn`, as the replaced reader returns them; the process exits when the frontend
        closes the socket (what TorchServe's own reader does)."""
        if self.last is not None and self.last[0] is conn:
            buffer = self.last[1]
        else:
            buffer = self.buffers.setdefault(conn, bytearray())
            self.last = (conn, buffer)
        while len(buffer) < length:
            packet = conn.recv(max(self.chunk, length - len(buffer)))
            if not packet:
                logger.info("frontend disconnected")
                sys.exit(0)
            buffer += packet
        data = buffer[:length]
        del buffer[:length]  # CPython drops a bytearray's head without moving the rest
        return data


def install(protocol: ModuleType, version: str, reader: ReadAhead | None = None) -> bool:
    """Replace `protocol`'s field reader (ts.protocol.otf_message_handler of TorchServe `version`) by a ReadAhead;
    False, with a warning, for a release not in TESTED or a module without that reader, leaving it as it is."""
    if not version.startswith(TESTED):
        logger.warning("TorchServe %s is not one whose frame reading was checked (%s); its frames stay read field by "
                       "field", version, ", ".join(f"{v}x" for v in TESTED))
        return False
    original = getattr(protocol, READER, None)
    if original is None or not callable(original):
        logger.warning("TorchServe's %s has no %s(); its frames stay read field by field", protocol.__name__, READER)
        return False
    if isinstance(getattr(original, "__self__", None), ReadAhead):
        return True  # already in place (a second model in the same worker process)
    setattr(protocol, READER, (reader or ReadAhead()).read)
    logger.info("TorchServe's worker frames read ahead (%s.%s replaced)", protocol.__name__, READER)
    return True


def inference_frame(requests: list[tuple[str, list[tuple[bytes, bytes]], list[tuple[str, str, bytes]]]]) -> bytes:
    """One batch as TorchServe's frontend writes it to a worker: b"I", then per request its id, headers (name, value)
    and parameters (name, content type, value), each list closed by -1, the batch closed by -1 (for tests and
    bench/torchserve_frames.py)."""
    def sized(data: bytes) -> bytes:
        return struct.pack("!i", len(data)) + data

    end = struct.pack("!i", -1)
    parts = [b"I"]
    for request_id, headers, parameters in requests:
        parts.append(sized(request_id.encode()))
        parts += [sized(name) + sized(value) for name, value in headers] + [end]
        parts += [sized(name.encode()) + sized(content_type.encode()) + sized(value)
                  for name, content_type, value in parameters] + [end]
    parts.append(end)
    return b"".join(parts)
