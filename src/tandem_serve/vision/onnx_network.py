"""A detector exported to ONNX, run by onnxruntime on the stage's device and called like the torch networks.

Images stay where they are: on a GPU the batch is bound to the CUDA execution provider in place (IO binding)
and the output is written into a torch tensor on the same device, so nothing crosses PCIe. The network's first
input takes the images - uint8 as served, or float32 / float16 scaled to [0, 1] (what exporters of YOLO models
write) - and its first output is the head's (the detector's `head_format` says which layout). A fixed batch
dimension (an export with batch 1, say) is served in chunks of that size.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from tandem_serve.errors import ConfigError, ModelFilesError

logger = logging.getLogger(__name__)

_TYPES = {"tensor(uint8)": torch.uint8, "tensor(float)": torch.float32, "tensor(float16)": torch.float16}
_NUMPY = {torch.uint8: np.uint8, torch.float32: np.float32, torch.float16: np.float16}


def _onnxruntime():
    """The onnxruntime module, or an error saying which package provides it."""
    try:
        import onnxruntime
    except ImportError:
        raise ModelFilesError("an .onnx detector needs onnxruntime: pip install 'tandem-serve[onnx]' (CPU) or "
                              "onnxruntime-gpu (CUDA)") from None
    return onnxruntime


class OnnxNetwork:
    """`network(images [B, 3, S, S]) -> the first output, a torch tensor on the images' device`."""

    def __init__(self, path: Path, device: torch.device, threads: int = 0):
        ort = _onnxruntime()
        self.path, self.device = path, torch.device(device)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ModelFilesError(f"{path}: the detector runs on {self.device} but this onnxruntime has no CUDA "
                                      f"provider (it has {ort.get_available_providers()}): install onnxruntime-gpu")
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0})]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ModelFilesError(f"{path} is not an ONNX model onnxruntime can run: {str(exc)[:300]}") from None
        if self.device.type == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            # onnxruntime falls back to its CPU provider where the CUDA one cannot load its libraries
            raise ModelFilesError(f"{path}: onnxruntime could not start its CUDA provider on {self.device} (its log "
                                  f"above names the CUDA or cuDNN library it missed); it runs "
                                  f"{self.session.get_providers()}")
        first, output = self.session.get_inputs()[0], self.session.get_outputs()[0]
        if first.type not in _TYPES:
            raise ModelFilesError(f"{path}: input {first.name!r} is {first.type}; expected uint8, float or float16 images")
        if len(first.shape) != 4:
            raise ModelFilesError(f"{path}: input {first.name!r} has shape {first.shape}; expected [batch, 3, S, S]")
        if output.type not in ("tensor(float)", "tensor(float16)"):
            raise ModelFilesError(f"{path}: output {output.name!r} is {output.type}; expected float or float16")
        self.input_name, self.output_name = first.name, output.name
        self.input_dtype = _TYPES[first.type]
        self.output_dtype = _TYPES[output.type]
        self.fixed_batch = first.shape[0] if isinstance(first.shape[0], int) else None
        self.fixed_size = tuple(first.shape[2:]) if all(isinstance(d, int) for d in first.shape[2:]) else None
        self._out_shapes: dict[int, tuple[int, ...]] = {}  # per image size: one image's output shape
        logger.info("ONNX detector %s on %s: input %s %s, output %s, batch %s", path.name,
                    self.session.get_providers()[0], first.name, first.shape, output.name, self.fixed_batch or "dynamic")

    def check_size(self, size: int) -> None:
        """Raise ConfigError where the model was exported for another image size."""
        if self.fixed_size is not None and self.fixed_size != (size, size):
            raise ConfigError(f"{self.path}: exported for images of {list(self.fixed_size)}, the pipeline sends "
                              f"{size}x{size} (image_size)")

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        """The batch as the model's input type (floats scaled to [0, 1]), contiguous."""
        if self.input_dtype == torch.uint8:
            return images.to(torch.uint8).contiguous()
        scaled = images.to(torch.float32) / 255.0 if images.dtype == torch.uint8 else images.to(torch.float32)
        return scaled.to(self.input_dtype).contiguous()

    def _run_host(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.session.run([self.output_name], {self.input_name: inputs.numpy()})[0]
        return torch.from_numpy(np.ascontiguousarray(out))

    def _run_device(self, inputs: torch.Tensor) -> torch.Tensor:
        size = inputs.shape[-1]
        if size not in self._out_shapes:  # one image through the host path once, for the output's shape
            self._out_shapes[size] = tuple(self._run_host(inputs[:1].cpu()).shape[1:])
        out = torch.empty((inputs.shape[0], *self._out_shapes[size]), dtype=self.output_dtype, device=self.device)
        binding = self.session.io_binding()
        index = self.device.index or 0
        binding.bind_input(self.input_name, "cuda", index, _NUMPY[self.input_dtype], tuple(inputs.shape),
                           inputs.data_ptr())
        binding.bind_output(self.output_name, "cuda", index, _NUMPY[self.output_dtype], tuple(out.shape),
                            out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # the inputs are written before onnxruntime reads
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return out

    def _run(self, inputs: torch.Tensor) -> torch.Tensor:
        return self._run_device(inputs) if self.device.type == "cuda" else self._run_host(inputs)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        inputs = self._inputs(images)
        chunk = self.fixed_batch
        if chunk is None or chunk == len(inputs):
            return self._run(inputs)
        outputs = []
        for start in range(0, len(inputs), chunk):
            part = inputs[start : start + chunk]
            short = chunk - len(part)
            if short:  # the last chunk padded with zero images, their outputs dropped
                part = torch.cat((part, part.new_zeros((short, *part.shape[1:]))))
            outputs.append(self._run(part)[: chunk - short])
        return torch.cat(outputs)
