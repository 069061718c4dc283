"""Triton Python-backend model 'encoder_fused': a thin adapter over tandem_serve (see text_models.py)."""

from tandem_serve.triton.text_models import EncoderModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
