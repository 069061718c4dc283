"""Triton Python-backend model 'token_embedding': a thin adapter over tandem_serve (see text_models.py)."""

from tandem_serve.triton.text_models import TokenEmbeddingModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
