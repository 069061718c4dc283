"""Triton Python-backend model 'nms': a thin adapter over tandem_serve (see vision_models.py)."""

from tandem_serve.triton.vision_models import NmsModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
