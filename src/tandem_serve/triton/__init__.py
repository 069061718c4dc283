"""Triton Inference Server integration: the embedded launcher and the Python-backend adapters."""
