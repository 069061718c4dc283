"""Clients for the served pipelines over Triton's gRPC or HTTP protocol (tritonclient)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from tandem_serve.clients.shm import ShmPool
    from tandem_serve.vision.nms import Detections

DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}


def tritonclient_module(protocol: str) -> Any:
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
    module = tritonclient_module(protocol)
    url = url or DEFAULT_URLS[protocol]
    if protocol == "grpc":
        return module.InferenceServerClient(url)
    return module.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)


def shm_headers(protocol: str, key: str | None = None) -> dict[str, str] | None:
    """The headers that authorize shared-memory registration: `key`, else the one in the default keys file
    (`tandem serve triton` writes it; `$TANDEM_TRITON_KEYS` points elsewhere), else none."""
    from tandem_serve.triton.keys import SHM_HEADER, client_shm_key, header_for

    key = key if key is not None else client_shm_key()
    return header_for(protocol, SHM_HEADER, key) if key else None


def text_input(texts: Sequence[str | bytes], protocol: str, name: str = "text") -> Any:
    """An InferInput of shape [n, 1] holding UTF-8 bytes."""
    data = _text_array(texts)
    infer_input = tritonclient_module(protocol).InferInput(name, list(data.shape), "BYTES")
    infer_input.set_data_from_numpy(data)
    return infer_input


class TensorClient:
    """Owns a tritonclient client and, with `shm` "system" or "cuda", a shared-memory pool; closes both.

    Use one instance per thread: tritonclient's HTTP client is not thread-safe.
    """

    def __init__(self, url: str | None, protocol: str, model: str, timeout_s: float, shm: str = "none",
                 shm_slots: int = 4, shm_bytes: int = 1 << 20, shm_key: str | None = None):
        from tandem_serve.clients.shm import KINDS, ShmPool

        if shm not in KINDS:
            raise ValueError(f"shm must be one of {KINDS}, got {shm!r}")
        self.protocol, self.model, self.timeout_s = protocol, model, timeout_s
        self.shm_headers = shm_headers(protocol, shm_key) if shm != "none" else None
        self.client = triton_client(url, protocol, timeout_s)
        try:
            self.pool = None if shm == "none" else ShmPool(self.client, shm, shm_slots, shm_bytes, shm_bytes,
                                                           headers=self.shm_headers)
        except BaseException:
            self.client.close()
            raise

    def close(self) -> None:
        try:
            if self.pool is not None:
                self.pool.close()
        finally:
            self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def infer_tensors(self, inputs: Sequence[tuple[str, Any]], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """One request to this client's model: (name, numpy array or torch tensor) inputs over the wire or through
        the pool's slot (a CUDA tensor into a CUDA pool is copied device to device); outputs as numpy arrays."""
        from tandem_serve.clients.shm import ShmPool, numpy_datatype

        module = tritonclient_module(self.protocol)
        tensors = [module.InferInput(name, list(array.shape), numpy_datatype(array)) for name, array in inputs]
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        if self.pool is None:
            for tensor, (_, array) in zip(tensors, inputs):
                tensor.set_data_from_numpy(array if isinstance(array, np.ndarray) else array.detach().cpu().numpy())
            result = self.client.infer(self.model, tensors, outputs=[module.InferRequestedOutput(n) for n in outputs], **kwargs)
            return {name: result.as_numpy(name) for name in outputs}
        needed = ShmPool.input_size([array for _, array in inputs])
        if needed <= self.pool.input_bytes:
            return self._infer_in(self.pool, tensors, inputs, outputs, kwargs)
        # Larger than a slot: a one-off region pair for this request, removed right after.
        with ShmPool(self.client, self.pool.kind, 1, needed, self.pool.output_bytes, self.pool.device_id,
                     headers=self.shm_headers) as once:
            return self._infer_in(once, tensors, inputs, outputs, kwargs)

    def _infer_in(self, pool: "ShmPool", tensors: list, inputs: Sequence[tuple[str, Any]], outputs: Sequence[str],
                  kwargs: dict) -> dict[str, np.ndarray]:
        with pool.slot() as slot:
            requested, areas = bind_slot(self.protocol, pool, slot, tensors, [array for _, array in inputs], outputs)
            result = self.client.infer(self.model, tensors, outputs=requested, **kwargs)
            return read_slot_outputs(self.protocol, pool, result, outputs, areas)


def bind_slot(protocol: str, pool: "ShmPool", slot: int, tensors: list, arrays: Sequence[Any],
              outputs: Sequence[str]) -> tuple[list, list]:
    """Write a request's inputs into a pool slot and point its InferInputs and requested outputs at the slot.

    Returns the requested outputs and the slot areas the server writes them to."""
    for tensor, placed in zip(tensors, pool.write_inputs(slot, arrays)):
        tensor.set_shared_memory(pool.input_name, placed.byte_size, placed.offset)
    areas = pool.output_areas(slot, len(outputs))
    requested = []
    for name, area in zip(outputs, areas):
        output = tritonclient_module(protocol).InferRequestedOutput(name)
        output.set_shared_memory(pool.output_name, area.byte_size, area.offset)
        requested.append(output)
    return requested, areas


def read_slot_outputs(protocol: str, pool: "ShmPool", result: Any, outputs: Sequence[str], areas: list) -> dict[str, np.ndarray]:
    """Host copies of the outputs the server wrote into a slot, shaped and typed as its reply says."""
    values = {}
    for name, area in zip(outputs, areas):
        output = result.get_output(name)
        if output is None:
            raise RuntimeError(f"the server returned no output {name!r}")
        meta = (output.datatype, list(output.shape)) if protocol == "grpc" else (output["datatype"], list(output["shape"]))
        values[name] = pool.read_output(area, *meta)
    return values


def _text_array(texts: Sequence[str | bytes]) -> np.ndarray:
    return np.array([[t.encode("utf-8") if isinstance(t, str) else bytes(t)] for t in texts], dtype=object)


def utf8_text_array(text: str | bytes) -> np.ndarray:
    """One text as the uint8 [1, bytes] tensor `text_embedding_utf8` takes."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8)[None]


class TextEmbeddingClient(TensorClient):
    """Embeds texts through a `text_embedding`-style ensemble; splits inputs into allowed batches.

    `shm="system"` or `"cuda"` sends texts and receives embeddings through shared memory. A model whose `text` is
    UINT8 (`text_embedding_utf8`) gets one request per text, its UTF-8 bytes.
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", model: str = "text_embedding", timeout_s: float = 60.0,
                 shm: str = "none", shm_slots: int = 4, shm_bytes: int = 1 << 20, shm_key: str | None = None):
        super().__init__(url, protocol, model, timeout_s, shm, shm_slots, shm_bytes, shm_key)
        self.max_batch_size, self.utf8 = self._read_config()

    def _read_config(self) -> tuple[int, bool]:
        """The model's max_batch_size (at least 1) and whether its `text` input is UTF-8 bytes (UINT8)."""
        config = self.client.get_model_config(self.model)
        if self.protocol == "grpc":
            from tritonclient.grpc import model_config_pb2 as mc

            batch = config.config.max_batch_size
            types = {t.name: mc.DataType.Name(t.data_type) for t in config.config.input}
        else:
            batch = config.get("max_batch_size", 0)
            types = {t["name"]: t["data_type"] for t in config.get("input", [])}
        return int(batch) or 1, types.get("text") == "TYPE_UINT8"

    def embed(self, texts: Sequence[str | bytes], prompt_name: str | None = None) -> np.ndarray:
        """Embeddings as the model's head computes them, [len(texts), embedding size] in the type the model declares
        (float32 as shipped); `prompt_name`: one of the model's prompts prepended to every text (default: the model's
        default prompt, if any)."""
        if self.utf8:
            if prompt_name is not None:
                raise ValueError(f"{self.model} takes no prompt name (it uses the model's default prompt); "
                                 "use text_embedding_fused for named prompts")
            rows = [self.infer_tensors([("text", utf8_text_array(t))], ["embedding"])["embedding"] for t in texts]
            return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
        chunks = []
        for start in range(0, len(texts), self.max_batch_size):
            chunk = texts[start : start + self.max_batch_size]
            inputs = [("text", _text_array(chunk))]
            if prompt_name is not None:
                inputs.append(("prompt_name", _text_array([prompt_name] * len(chunk))))
            chunks.append(self.infer_tensors(inputs, ["embedding"])["embedding"])
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


class ObjectDetectionClient(TensorClient):
    """Detects objects in encoded images through the `object_detection` ensemble.

    `shm="system"` or `"cuda"` sends the image and receives the boxes through shared memory.
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", model: str = "object_detection", timeout_s: float = 60.0,
                 shm: str = "none", shm_slots: int = 4, shm_bytes: int = 4 << 20, shm_key: str | None = None):
        super().__init__(url, protocol, model, timeout_s, shm, shm_slots, shm_bytes, shm_key)

    def detect(self, data: bytes, conf_threshold: float | None = None, iou_threshold: float | None = None,
               max_det: int | None = None) -> "Detections":
        """Boxes (original pixels), scores and classes for one encoded image."""
        from tandem_serve.vision.nms import Detections

        inputs = [("image", np.frombuffer(data, np.uint8)[None])]
        for name, value, dtype in (("conf_threshold", conf_threshold, np.float32),
                                   ("iou_threshold", iou_threshold, np.float32), ("max_det", max_det, np.int32)):
            if value is not None:
                inputs.append((name, np.array([[value]], dtype)))
        out = self.infer_tensors(inputs, ["boxes", "scores", "classes"])
        return Detections(out["boxes"][0], out["scores"][0], out["classes"][0])
