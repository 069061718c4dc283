"""Clients of a running server: the pipelines over Triton's gRPC / HTTP (triton.py), the shared-memory pool they
can send through (shm.py) and the bulk jobs over many requests (bulk.py)."""

from tandem_serve.clients.triton import ObjectDetectionClient, TensorClient, TextEmbeddingClient, utf8_text_array

__all__ = ["ObjectDetectionClient", "TensorClient", "TextEmbeddingClient", "utf8_text_array"]
