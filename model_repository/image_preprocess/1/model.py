"""Triton Python-backend model 'image_preprocess': a thin adapter over tandem_serve (see vision_models.py)."""

from tandem_serve.triton.vision_models import ImagePreprocessModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
