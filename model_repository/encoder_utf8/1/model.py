"""Triton Python-backend model 'encoder_utf8': a thin adapter over tandem_serve (see text_models.py)."""

from tandem_serve.triton.text_models import Utf8EncoderModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
