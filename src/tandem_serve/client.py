"""Clients for the served pipelines over Triton's gRPC or HTTP protocol (tritonclient)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from tandem_serve.vision.nms import Detections

DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}


def _module(protocol: str) -> Any:
    """tritonclient.grpc or tritonclient.http."""
    if protocol == "grpc":
        import tritonclient.grpc as module
    elif protocol == "http":
        import tritonclient.http as module
    else:
        raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    return module


def triton_client(url: str | None, protocol: str = "grpc", timeout_s: float = 60.0) -> Any:
    """A tritonclient InferenceServerClient for `protocol` ('grpc' or 'http')."""
    module = _module(protocol)
    url = url or DEFAULT_URLS[protocol]
    if protocol == "grpc":
        return module.InferenceServerClient(url)
    return module.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)


def text_input(texts: Sequence[str | bytes], protocol: str, name: str = "text") -> Any:
    """An InferInput of shape [n, 1] holding UTF-8 bytes."""
    data = np.array([[t.encode("utf-8") if isinstance(t, str) else bytes(t)] for t in texts], dtype=object)
    infer_input = _module(protocol).InferInput(name, list(data.shape), "BYTES")
    infer_input.set_data_from_numpy(data)
    return infer_input


class _PipelineClient:
    """Owns a tritonclient client; closes it on exit."""

    client: Any

    def close(self) -> None:
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class TextEmbeddingClient(_PipelineClient):
    """Embeds texts through a `text_embedding`-style ensemble; splits inputs into allowed batches.

    Use one instance per thread: tritonclient's HTTP client is not thread-safe.
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", model: str = "text_embedding", timeout_s: float = 60.0):
        self.protocol = protocol
        self.model = model
        self.timeout_s = timeout_s
        self.client = triton_client(url, protocol, timeout_s)
        self.max_batch_size = self._max_batch_size()

    def _max_batch_size(self) -> int:
        config = self.client.get_model_config(self.model)
        if self.protocol == "grpc":
            return int(config.config.max_batch_size) or 1
        return int(config.get("max_batch_size", 0)) or 1

    def embed(self, texts: Sequence[str | bytes]) -> np.ndarray:
        """Unit-norm embeddings, float32 [len(texts), hidden]."""
        chunks = []
        for start in range(0, len(texts), self.max_batch_size):
            chunk = texts[start : start + self.max_batch_size]
            kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
            result = self.client.infer(self.model, [text_input(chunk, self.protocol)], **kwargs)
            chunks.append(result.as_numpy("embedding"))
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


class ObjectDetectionClient(_PipelineClient):
    """Detects objects in encoded images through the `object_detection` ensemble.

    Use one instance per thread: tritonclient's HTTP client is not thread-safe.
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", model: str = "object_detection", timeout_s: float = 60.0):
        self.protocol, self.model, self.timeout_s = protocol, model, timeout_s
        self.client = triton_client(url, protocol, timeout_s)

    def detect(self, data: bytes, conf_threshold: float | None = None, iou_threshold: float | None = None,
               max_det: int | None = None) -> "Detections":
        """Boxes (original pixels), scores and classes for one encoded image."""
        from tandem_serve.vision.nms import Detections

        module = _module(self.protocol)
        image = np.frombuffer(data, np.uint8)[None]
        inputs = [module.InferInput("image", list(image.shape), "UINT8")]
        inputs[0].set_data_from_numpy(image)
        for name, value, dtype in (("conf_threshold", conf_threshold, np.float32),
                                   ("iou_threshold", iou_threshold, np.float32), ("max_det", max_det, np.int32)):
            if value is not None:
                tensor = module.InferInput(name, [1, 1], "FP32" if dtype == np.float32 else "INT32")
                tensor.set_data_from_numpy(np.array([[value]], dtype))
                inputs.append(tensor)
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        result = self.client.infer(self.model, inputs, **kwargs)
        return Detections(result.as_numpy("boxes")[0], result.as_numpy("scores")[0], result.as_numpy("classes")[0])
