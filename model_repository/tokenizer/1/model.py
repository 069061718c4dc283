"""Triton Python-backend model 'tokenizer': a thin adapter over tandem_serve (see text_models.py)."""

from tandem_serve.triton.text_models import TokenizerModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
