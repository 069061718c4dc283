"""A stand-in for `triton_python_backend_utils`, enough to drive the adapters in-process."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
from google.protobuf import json_format, text_format
from torch.utils.dlpack import from_dlpack, to_dlpack
from tritonclient.grpc import model_config_pb2


class Tensor:
    def __init__(self, name: str, value):
        self._name, self._value = name, value

    @classmethod
    def from_dlpack(cls, name: str, capsule) -> "Tensor":
        return cls(name, from_dlpack(capsule))

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._value.numpy() if isinstance(self._value, torch.Tensor) else np.asarray(self._value)

    def to_dlpack(self):
        value = self._value if isinstance(self._value, torch.Tensor) else torch.from_numpy(self._value)
        return to_dlpack(value)


class TritonError:
    INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

    def __init__(self, message: str, code: str = "INTERNAL"):
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> str:
        return self._code


class InferenceResponse:
    def __init__(self, output_tensors, error=None):
        self.output_tensors, self.error = output_tensors, error

    def output(self, name: str) -> torch.Tensor:
        return next(t._value for t in self.output_tensors if t.name() == name)


class Request:
    def __init__(self, **inputs):
        self.inputs = [Tensor(k, v) for k, v in inputs.items()]


def get_input_tensor_by_name(request: Request, name: str):
    return next((t for t in request.inputs if t.name() == name), None)


class Logger:
    messages: list[str] = []
    log_info = log_warn = log_error = log_verbose = staticmethod(lambda message: Logger.messages.append(message))


def install() -> types.ModuleType:
    """Register this module as `triton_python_backend_utils`."""
    module = sys.modules[__name__]
    sys.modules["triton_python_backend_utils"] = module
    return module


def initialize_args(config_path: Path, kind: str = "CPU", mutate=None, **overrides: str) -> dict[str, str]:
    """`initialize` args as Triton builds them, from a real config.pbtxt with parameter overrides."""
    config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    if mutate:
        mutate(config)
    for key, value in overrides.items():
        config.parameters[key].string_value = value
    as_json = json_format.MessageToJson(config, preserving_proto_field_name=True)
    return {"model_config": as_json, "model_instance_kind": kind, "model_instance_device_id": "0",
            "model_instance_name": f"{config.name}_0_0", "model_name": config.name}


__all__ = ["install", "initialize_args", "Request", "json"]
