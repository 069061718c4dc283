"""Turn TorchServe request dicts (one per request in a batch) into pipeline items.

TorchServe hands a handler, per request, a dict of the body ("body" or "data") or of the
multipart form fields; a JSON body arrives parsed, a text/plain body as str, anything else as
bytes. Every function raises InvalidInputError with a message meant for the client.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from tandem_serve.errors import InvalidInputError

BODY_KEYS = ("body", "data")
IMAGE_KEYS = ("data", "body", "image", "file")


def _body(request: Mapping[str, Any]) -> Any:
    for key in BODY_KEYS:
        if request.get(key) is not None:
            return request[key]
    raise InvalidInputError("empty request: send the input as the request body")


def _as_text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInputError(f"{where} is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
    raise InvalidInputError(f"{where} must be a string, got {type(value).__name__}")


def parse_texts(request: Mapping[str, Any], max_texts: int) -> list[str]:
    """Texts of one request: JSON {"text": str | [str, ...]}, a JSON list or string, or a plain-text body."""
    body = {"text": request["text"]} if request.get("text") is not None else _body(request)  # multipart field
    if isinstance(body, (bytes, bytearray)):
        body = _as_text(body, "the body")
    if isinstance(body, dict):
        if "text" not in body:
            raise InvalidInputError(f'JSON body needs a "text" field, got keys {sorted(body)[:5]}')
        body = body["text"]
    texts = body if isinstance(body, list) else [body]
    if not texts:
        raise InvalidInputError("no text given: the list is empty")
    if len(texts) > max_texts:
        raise InvalidInputError(f"too many texts in one request: {len(texts)} > {max_texts}")
    return [_as_text(t, f"text[{i}]") for i, t in enumerate(texts)]


def _number(request: Mapping[str, Any], name: str, kind: type) -> float | int | None:
    value = request.get(name)
    if value is None:
        return None
    try:
        return kind(_as_text(value, name).strip())
    except ValueError:
        raise InvalidInputError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r:.40}") from None


def parse_image(request: Mapping[str, Any]) -> tuple[bytes, float | None, float | None, int | None]:
    """Encoded image bytes (raw body or a multipart field) and optional conf_threshold / iou_threshold / max_det fields."""
    data = next((request[k] for k in IMAGE_KEYS if isinstance(request.get(k), (bytes, bytearray))), None)
    if data is None:
        present = next((request[k] for k in IMAGE_KEYS if request.get(k) is not None), None)
        if present is None:
            raise InvalidInputError("no image: send the encoded image as the body or as a multipart field 'data'")
        kind = "JSON" if isinstance(present, (dict, list)) else type(present).__name__
        raise InvalidInputError(f"the image must be sent as raw bytes (application/octet-stream or multipart), got {kind}")
    if not data:
        raise InvalidInputError("the image is empty (0 bytes)")
    return (bytes(data), _number(request, "conf_threshold", float), _number(request, "iou_threshold", float),
            _number(request, "max_det", int))


def json_bytes(value: Any) -> bytes:
    """Compact UTF-8 JSON."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
