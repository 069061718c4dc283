"""A client for the two pipelines served by TorchServe's REST inference API (token auth from the key file)."""

from __future__ import annotations

import io
import json
import secrets
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from tandem_serve.torchserve.launcher import read_key
from tandem_serve.torchserve.replies import NPY

if TYPE_CHECKING:  # imported where used: it needs torch, which a command-line client does not load
    from tandem_serve.vision.nms import Detections

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_WORKSPACE = Path("~/.cache/tandem-serve/torchserve").expanduser()


class TorchServeError(RuntimeError):
    """An error answer from TorchServe: HTTP status and its message."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def multipart(fields: dict[str, bytes]) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type."""
    boundary = secrets.token_hex(16)
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + value + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class TorchServeClient:
    """`embed(texts)` and `detect(image_bytes)` against a TorchServe running the tandem archives."""

    def __init__(self, url: str | None = None, key_file: Path | None = None, token: str | None = None,
                 timeout_s: float = 120.0):
        url = url or DEFAULT_URL
        self.url = (url if "://" in url else f"http://{url}").rstrip("/")
        self.key_file = Path(key_file) if key_file else DEFAULT_WORKSPACE / "key_file.json"
        self.token = token
        self.timeout_s = timeout_s

    def _post(self, model: str, body: bytes, content_type: str, accept: str = "application/json") -> tuple[bytes, str]:
        token = self.token or read_key(self.key_file, "inference")
        request = urllib.request.Request(f"{self.url}/predictions/{model}", data=body, method="POST", headers={
            "Authorization": f"Bearer {token}", "Content-Type": content_type, "Accept": accept})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                message = json.loads(raw).get("message", raw.decode(errors="replace"))
            except ValueError:
                message = raw.decode(errors="replace")
            raise TorchServeError(exc.code, message) from None

    def embed(self, texts: Sequence[str], model: str = "text_embedding", binary: bool = True,
              prompt_name: str | None = None) -> np.ndarray:
        """Embeddings float32 [len(texts), embedding size]; binary uses the .npy reply format; `prompt_name`: one of
        the model's prompts (default: its default prompt)."""
        request = {"text": list(texts)} if prompt_name is None else {"text": list(texts), "prompt_name": prompt_name}
        body = json.dumps(request).encode()
        raw, content_type = self._post(model, body, "application/json", NPY if binary else "application/json")
        if content_type.startswith(NPY):
            return np.load(io.BytesIO(raw), allow_pickle=False)
        return np.asarray(json.loads(raw)["embeddings"], np.float32)

    def detect(self, data: bytes, conf_threshold: float | None = None, iou_threshold: float | None = None,
               max_det: int | None = None, model: str = "object_detection") -> "Detections":
        """Detections in original pixels; thresholds travel as multipart fields when given."""
        overrides = {k: str(v).encode() for k, v in (("conf_threshold", conf_threshold), ("iou_threshold", iou_threshold),
                                                      ("max_det", max_det)) if v is not None}
        if overrides:
            body, content_type = multipart({"data": data, **overrides})
        else:
            body, content_type = data, "application/octet-stream"
        reply = json.loads(self._post(model, body, content_type)[0])
        from tandem_serve.vision.nms import Detections

        return Detections(np.asarray(reply["boxes"], np.float32).reshape(-1, 4), np.asarray(reply["scores"], np.float32),
                          np.asarray(reply["classes"], np.int32))
