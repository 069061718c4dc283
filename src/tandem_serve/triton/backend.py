"""Helpers for Python-backend adapters: parameters, tensors in and out, per-request errors, logging.

Imported only inside Triton's Python-backend stub, where `triton_python_backend_utils` exists.
Outputs always go through DLPack (`Tensor.from_dlpack`): with numpy 2 in the stub's environment,
`pb_utils.Tensor(name, ndarray)` has produced 0-byte outputs, DLPack works with numpy 1 and 2.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

from tandem_serve.errors import ConfigError, InvalidInputError
from tandem_serve.profiling import run_profiled
from tandem_serve.runtime.per_request import Failure, process_requests
from tandem_serve.runtime.threads import shared_cpu_threads
from tandem_serve.stage_config import parse_stage_config, resolve_paths, with_cpu_threads

_Settings = TypeVar("_Settings")


class _TritonLogHandler(logging.Handler):
    """Forwards `logging` records to Triton's log (pb_utils.Logger)."""

    def emit(self, record: logging.LogRecord) -> None:
        message = self.format(record)
        if record.levelno >= logging.ERROR:
            pb_utils.Logger.log_error(message)
        elif record.levelno >= logging.WARNING:
            pb_utils.Logger.log_warn(message)
        elif record.levelno >= logging.INFO:
            pb_utils.Logger.log_info(message)
        else:
            pb_utils.Logger.log_verbose(message)


def bridge_logging() -> None:
    """Route the `tandem_serve` loggers to Triton's log, once per stub process."""
    root = logging.getLogger("tandem_serve")
    if not any(isinstance(h, _TritonLogHandler) for h in root.handlers):
        root.addHandler(_TritonLogHandler())
        root.setLevel(logging.INFO)
        root.propagate = False


def check_bytes_tensors_readable() -> None:
    """Fail initialize, with the fix named, where this stub cannot read TYPE_STRING tensors.

    Stubs built against numpy 1.x (Triton 24.10, the nvidia-pytriton wheel) misread numpy 2's
    dtype layout: `as_numpy()` of a tensor in backend memory returns its first element repeated
    (seen on the H100), and for TYPE_STRING inputs the stub then crashes. Numeric inputs are read
    through DLPack and are unaffected; strings have no other accessor, so check once here.
    """
    expected = torch.arange(1, 17, dtype=torch.uint8)
    try:
        readable = pb_utils.Tensor.from_dlpack("PROBE", to_dlpack(expected)).as_numpy().tolist() == expected.tolist()
    except Exception:  # noqa: BLE001 - any failure means the same thing here
        readable = False
    if not readable:
        raise RuntimeError(
            f"this Triton Python-backend stub cannot read TYPE_STRING tensors with numpy {np.__version__} "
            "(it was built against numpy 1.x): give the stubs numpy<2 (the project's environment pins it; "
            "`tandem serve triton --stub-pythonpath DIR` puts a directory holding numpy<2 first for the "
            "stubs only), or use a Triton release whose Python backend supports numpy 2"
        )


def model_config(args: dict[str, str]) -> dict[str, Any]:
    """The model's config as a dict (Triton passes it as JSON in `initialize`)."""
    return json.loads(args["model_config"])


def stage_settings(args: dict[str, str], settings_cls: type[_Settings]) -> tuple[dict[str, Any], _Settings]:
    """For `initialize`: bridge logging, then the model config and its parameters parsed into `settings_cls`."""
    bridge_logging()
    config = model_config(args)
    settings = parse_stage_config(settings_cls, resolve_paths(parameters(config), args.get("model_repository", "")))
    sharing = cpu_instance_count(config)
    if getattr(settings, "cpu_threads", None) == 0 and instance_device(args) == "cpu" and sharing > 1:
        settings = with_cpu_threads(settings, shared_cpu_threads(sharing))
    return config, settings


def cpu_instance_count(config: dict[str, Any]) -> int:
    """How many CPU instances the model runs (KIND_AUTO groups count where Triton made them CPU instances)."""
    return sum(int(g.get("count", 1)) for g in config.get("instance_group", [])
               if g.get("kind", "KIND_AUTO") in ("KIND_CPU", "KIND_AUTO"))


def parameters(config: dict[str, Any]) -> dict[str, str]:
    """The config's `parameters` as a plain name -> string mapping."""
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def instance_device(args: dict[str, str]) -> str:
    """'cuda:N' for a KIND_GPU instance, else 'cpu'."""
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{args['model_instance_device_id']}"
    return "cpu"


def tensor_dims(config: dict[str, Any], section: str, name: str) -> list[int]:
    """The declared dims of input/output `name` in the model config."""
    for tensor in config.get(section, []):
        if tensor["name"] == name:
            return [int(d) for d in tensor["dims"]]
    raise KeyError(f"{section} {name!r} not declared in the model config")


def expect_dims(config: dict[str, Any], section: str, name: str, expected: list[int], fix: str = "") -> None:
    """Fail initialize when the config's dims of a tensor disagree with what the stage produces or takes."""
    declared = tensor_dims(config, section, name)
    if declared != expected:
        raise ConfigError(f"{config['name']}: {section} {name} dims {declared} do not match the model ({expected}); "
                          + (fix or "edit config.pbtxt (and the ensembles) for this model directory"))


def input_tensor(request: Any, name: str) -> torch.Tensor:
    """A numeric input as a torch tensor on the device Triton left it on (no copy)."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise InvalidInputError(f"missing input {name}")
    return from_dlpack(tensor.to_dlpack())


def optional_input_tensor(request: Any, name: str) -> torch.Tensor | None:
    """An optional numeric input as a CPU torch tensor, or None when the request omits it."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else from_dlpack(tensor.to_dlpack()).cpu()


def input_bytes(request: Any, name: str) -> np.ndarray:
    """A TYPE_STRING input as a numpy object array of bytes."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise InvalidInputError(f"missing input {name}")
    return tensor.as_numpy()


def optional_input_bytes(request: Any, name: str) -> np.ndarray | None:
    """An optional TYPE_STRING input as a numpy object array of bytes, or None when the request omits it."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def output_tensor(name: str, tensor: torch.Tensor | np.ndarray) -> Any:
    """A pb_utils output tensor sharing memory with `tensor` through DLPack."""
    if isinstance(tensor, np.ndarray):
        tensor = torch.from_numpy(tensor)
    if tensor.numel() == 0:  # the stub refuses empty DLPack tensors; 0 bytes are right under any numpy
        return pb_utils.Tensor(name, tensor.cpu().numpy())
    return pb_utils.Tensor.from_dlpack(name, to_dlpack(tensor.contiguous()))


# The declared type of a float output may be any of these: the output is cast to it on the way out (EMBEDDING as
# TYPE_FP16 halves what a client receives). Every other output is sent as the stage produces it.
FLOAT_OUTPUT_TYPES = {"TYPE_FP16": torch.float16, "TYPE_FP32": torch.float32, "TYPE_FP64": torch.float64}
TORCH_TYPES = {**FLOAT_OUTPUT_TYPES, "TYPE_BF16": torch.bfloat16, "TYPE_UINT8": torch.uint8, "TYPE_INT8": torch.int8,
               "TYPE_INT16": torch.int16, "TYPE_INT32": torch.int32, "TYPE_INT64": torch.int64, "TYPE_BOOL": torch.bool}


class Outputs:
    """A model's outputs as its config declares them: `tensor(name, value)` sends a float output in its declared
    float type; a declared type the stage cannot produce fails initialize, naming it."""

    def __init__(self, config: dict[str, Any], produced: dict[str, torch.dtype]):
        declared = {t["name"]: t.get("data_type", "TYPE_FP32") for t in config.get("output", [])}
        self.types: dict[str, torch.dtype] = {}
        for name, dtype in produced.items():
            wanted = declared.get(name)
            if wanted is None:
                raise ConfigError(f"{config['name']}: output {name} is not declared in config.pbtxt")
            target = TORCH_TYPES.get(wanted)
            castable = dtype.is_floating_point and wanted in FLOAT_OUTPUT_TYPES
            if target != dtype and not castable:
                produced_name = next((k for k, v in TORCH_TYPES.items() if v == dtype), str(dtype))
                choices = ", ".join(FLOAT_OUTPUT_TYPES) if dtype.is_floating_point else produced_name
                raise ConfigError(f"{config['name']}: output {name} is declared {wanted}; the model produces "
                                  f"{produced_name}, so declare {choices} here (and in the ensembles)")
            self.types[name] = target

    def tensor(self, name: str, value: torch.Tensor | np.ndarray) -> Any:
        """`value` as output `name`, cast to the declared float type where it differs."""
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if value.dtype != self.types[name]:
            value = value.to(self.types[name])
        return output_tensor(name, value)


def error_response(failure: Failure) -> Any:
    """An InferenceResponse carrying `failure` (INVALID_ARG for bad input, else INTERNAL)."""
    code = pb_utils.TritonError.INVALID_ARG if failure.invalid else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(failure.message, code))


def respond(
    requests: Sequence[Any],
    decode: Callable[[Any], Any],
    compute: Callable[[list[Any]], Sequence[Any]],
    encode: Callable[[Any], list[Any]],
    stage: str,
) -> list[Any]:
    """One response per request: decode each, compute the valid ones as a batch, encode outputs."""

    def respond_batch() -> list[Any]:
        responses = []
        for result in process_requests(requests, decode, compute, stage):
            if isinstance(result, Failure):
                responses.append(error_response(result))
            else:
                responses.append(pb_utils.InferenceResponse(output_tensors=encode(result)))
        return responses

    return run_profiled(stage, respond_batch)
