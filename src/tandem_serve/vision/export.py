"""Export a detector network as a torch.export program (.pt2), an AOTInductor package (.pt2 compiled for one device)
or ONNX (.onnx) that the detector stage loads.

All keep the batch dimension dynamic (1 to `max_batch`) and the image size fixed (the pipeline's image_size):
the served shape is fixed by the configs, and a fixed size lets exporters fold the grid computations. An
AOTInductor package holds kernels compiled ahead of time (C++ and, on a GPU, Triton kernels) for the device it was
compiled on: compile it where it will serve (a C++ compiler is needed there, at compile time only).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tandem_serve.errors import ConfigError

logger = logging.getLogger(__name__)
FORMATS = (".pt2", ".onnx")


def export_network(network: torch.nn.Module, out: Path, image_size: int = 640, max_batch: int = 64,
                   opset: int = 18, compile_for: str | None = None) -> Path:
    """Write `network` (eval mode, taking uint8 [B, 3, S, S]) to `out`, its format chosen by the suffix; with
    `compile_for` (a device: "cpu", "cuda:0") a .pt2 is an AOTInductor package compiled for that device."""
    out = Path(out)
    if out.suffix not in FORMATS:
        raise ConfigError(f"{out}: the export format is chosen by the suffix, one of {', '.join(FORMATS)}")
    if image_size < 32 or image_size % 32:
        raise ConfigError("image_size must be a positive multiple of 32")
    if compile_for and out.suffix != ".pt2":
        raise ConfigError(f"{out}: an AOTInductor package is a .pt2")
    device = torch.device(compile_for or "cpu")
    network = network.eval().to(device)
    example = torch.zeros(2, 3, image_size, image_size, dtype=torch.uint8, device=device)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if out.suffix == ".pt2":
            program = torch.export.export(network, (example,), dynamic_shapes=({0: batch},))
            if compile_for:
                logger.info("compiling %s for %s with AOTInductor (a minute or more)", out.name, device)
                torch._inductor.aoti_compile_and_package(program, package_path=str(out))
            else:
                torch.export.save(program, str(out))
        else:
            try:
                import onnxscript  # noqa: F401 - torch's ONNX exporter needs it
            except ImportError:
                raise ConfigError("ONNX export needs onnx and onnxscript: pip install 'tandem-serve[onnx]'") from None
            torch.onnx.export(network, (example,), str(out), input_names=["images"], output_names=["output0"],
                              dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, external_data=False)
    logger.info("exported %s (%.1f MB), batch 1-%d, %d px", out, out.stat().st_size / 1e6, max_batch, image_size)
    return out
