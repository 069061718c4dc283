"""What a service answers per request, and how it reaches TorchServe's context (duck-typed, no `ts` import)."""

from __future__ import annotations

import dataclasses
import io
from http import HTTPStatus
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from tandem_serve.torchserve.request_parsing import json_bytes

JSON = "application/json"
NPY = "application/x-npy"
_ERROR_TYPES = {400: "InvalidInput", 415: "UnsupportedMediaType", 500: "InternalServerError"}


@dataclass(frozen=True)
class Reply:
    """One request's response: body, HTTP status and content type."""

    body: bytes
    status: int = 200
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()

    def with_header(self, name: str, value: str) -> "Reply":
        return dataclasses.replace(self, headers=(*self.headers, (name, value)))

    @classmethod
    def json(cls, value: Any) -> "Reply":
        return cls(json_bytes(value))

    @classmethod
    def npy(cls, array: np.ndarray) -> "Reply":
        """The array in NumPy's .npy format (read back with numpy.load(io.BytesIO(body)))."""
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
        return cls(buffer.getvalue(), content_type=NPY)

    @classmethod
    def error(cls, message: str, status: int = 400) -> "Reply":
        """An error in TorchServe's own JSON shape: {"code", "type", "message"}."""
        return cls(json_bytes({"code": status, "type": _ERROR_TYPES.get(status, "Error"), "message": message}), status)


def lower_keys(headers: Mapping[str, Any] | None) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in (headers or {}).items()}


def accepts(headers: Mapping[str, str], content_type: str) -> bool:
    """True when the request's Accept header names `content_type`."""
    return content_type in lower_keys(headers).get("accept", "").lower()


def request_headers(context: Any, count: int) -> list[dict[str, str]]:
    """Each request's headers from a TorchServe Context."""
    return [lower_keys(context.get_all_request_header(i)) for i in range(count)]


def answer(context: Any, replies: Sequence[Reply]) -> list[bytes]:
    """Set each request's status and content type on the TorchServe Context; return the bodies."""
    for index, reply in enumerate(replies):
        context.set_response_content_type(index, reply.content_type)
        for name, value in reply.headers:
            context.set_response_header(index, name, value)
        if reply.status != 200:
            context.set_response_status(reply.status, HTTPStatus(reply.status).phrase, index)
    return [reply.body for reply in replies]
