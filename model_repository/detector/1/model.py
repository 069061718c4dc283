"""Triton Python-backend model 'detector': a thin adapter over tandem_serve (see vision_models.py)."""

from tandem_serve.triton.vision_models import DetectorModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
