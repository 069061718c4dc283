"""JPEG decoding on the GPU (nvJPEG through torchvision.io.decode_jpeg) with the letterbox done there too.

Only the compressed bytes cross PCIe; the decoded image never exists in host memory. A batch of JPEGs is
decoded in one call; PNGs and the other formats, and any file nvJPEG refuses (CMYK, corrupt data), go
through the CPU path (`letterbox.preprocess`) one image at a time, with the same per-image errors. The
headers are read on the CPU first (Pillow, no decode) so that empty, undecodable and oversized images are
refused before the GPU sees them (`letterbox.read_header`, shared with the CPU path).

torchvision is optional: it is on the GPU machine but does not import beside the CPU torch build used for
development. `GpuDecoder` raises a ConfigError naming it where it is missing.
"""

from __future__ import annotations

import io
import logging
import threading
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from tandem_serve.errors import ConfigError, InvalidInputError
from tandem_serve.runtime.per_request import Failure
from tandem_serve.vision.letterbox import (
    DEFAULT_MAX_PIXELS,
    PAD_VALUE,
    Header,
    Letterbox,
    geometry,
    placement,
    preprocess,
    read_header,
)

logger = logging.getLogger(__name__)


def _decode_jpeg() -> Callable:
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except (ImportError, RuntimeError) as exc:  # RuntimeError: torchvision built for another torch
        raise ConfigError(f"GPU image decoding needs torchvision matching this torch ({torch.__version__}): "
                          f"pip install torchvision ({type(exc).__name__}: {exc})") from None
    return lambda data, device: decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def letterbox_on_device(image: torch.Tensor, size: int) -> tuple[torch.Tensor, Letterbox]:
    """A decoded uint8 [3, H, W] tensor -> uint8 [3, size, size] on its device, antialiased bilinear resize, grey
    padding: the geometry of `letterbox.letterbox`."""
    height, width = int(image.shape[1]), int(image.shape[2])
    box = geometry(width, height, size)
    new_w, new_h, pad_x, pad_y = placement(box)
    canvas = torch.full((3, size, size), PAD_VALUE, dtype=torch.uint8, device=image.device)
    if (new_w, new_h) == (width, height):
        resized = image
    else:
        resized = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear", antialias=True,
                                align_corners=False)[0].round_().clamp_(0, 255).to(torch.uint8)
    canvas[:, pad_y:pad_y + new_h, pad_x:pad_x + new_w] = resized
    return canvas, box


class GpuDecoder:
    """Encoded images -> letterboxed uint8 [3, S, S] tensors on `device`, JPEGs by nvJPEG, the rest on the CPU."""

    def __init__(self, size: int, device: str | torch.device, max_pixels: int = DEFAULT_MAX_PIXELS,
                 stage: str = "image_preprocess"):
        if not str(device).startswith("cuda"):
            raise ConfigError(f"GPU image decoding needs a CUDA device, got {device}")
        self.size, self.device, self.max_pixels, self.stage = size, torch.device(device), max_pixels, stage
        self._decode = _decode_jpeg()
        # the letterbox kernels on a stream of each calling thread's own: on the default stream they would wait for
        # (and hold up) the detector's work on other streams of the same process, and on one shared stream each
        # thread would wait for the others' batches
        self._streams = threading.local()
        self.fallbacks = 0  # images that went through the CPU path (other formats, refused by nvJPEG)
        self._logged_first = False
        self._warm_up()

    @property
    def stream(self) -> torch.cuda.Stream:
        """The calling thread's stream on the device."""
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = torch.cuda.Stream(self.device)
        return stream

    def _warm_up(self) -> None:
        """Decode and letterbox a small JPEG now: nvJPEG's first call initialises it (hundreds of ms), which the
        first requests would otherwise wait for."""
        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (90, 120, 150)).save(buffer, format="JPEG")
        stream = self.stream
        with torch.cuda.stream(stream):
            for image in self._decode_batch([buffer.getvalue()] * 2):
                letterbox_on_device(image, self.size)
        stream.synchronize()

    def check(self, data: bytes) -> tuple[bytes, Header]:
        """Per request, before the batch: the header, or InvalidInputError for that request alone."""
        return data, read_header(data, self.max_pixels)

    def __call__(self, items: Sequence[tuple[bytes, Header]]) -> list[tuple[torch.Tensor, Letterbox] | Failure]:
        """Decode a batch: the JPEGs in one nvJPEG call (one by one when the batch call fails), others on the CPU.
        The tensors are complete when this returns (they may leave through DLPack to other processes)."""
        stream = self.stream
        with torch.cuda.stream(stream):
            out = self._letterboxed(items)
        stream.synchronize()
        return out

    def stacked(self, items: Sequence[tuple[bytes, Header]]) -> tuple[torch.Tensor, list[Letterbox | Failure]]:
        """A batch as one uint8 [n, 3, S, S] tensor on the device (grey where an image failed) and, per image, its
        Letterbox or Failure; complete when this returns."""
        stream = self.stream
        with torch.cuda.stream(stream):
            out = self._letterboxed(items)
            grey = None
            tensors = []
            for result in out:
                if isinstance(result, Failure):
                    if grey is None:
                        grey = torch.full((3, self.size, self.size), PAD_VALUE, dtype=torch.uint8, device=self.device)
                    tensors.append(grey)
                else:
                    tensors.append(result[0])
            batch = torch.stack(tensors)
        stream.synchronize()
        return batch, [r if isinstance(r, Failure) else r[1] for r in out]

    def _letterboxed(self, items: Sequence[tuple[bytes, Header]]) -> list[tuple[torch.Tensor, Letterbox] | Failure]:
        out: list[tuple[torch.Tensor, Letterbox] | Failure | None] = [None] * len(items)
        jpegs = [i for i, (_, header) in enumerate(items) if header.jpeg]
        decoded = self._decode_batch([items[i][0] for i in jpegs])
        for index, image in zip(jpegs, decoded):
            if image is not None:
                out[index] = letterbox_on_device(image, self.size)
        for index, result in enumerate(out):
            if result is None:
                out[index] = self._on_cpu(items[index])
        if not self._logged_first:
            self._logged_first = True
            logger.info("nvJPEG decoded its first batch (%d JPEGs of %d images) on %s", len(jpegs), len(items), self.device)
        return out  # type: ignore[return-value]

    def _decode_batch(self, datas: list[bytes]) -> list[torch.Tensor | None]:
        if not datas:
            return []
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        try:
            return list(self._decode(tensors, self.device))
        except RuntimeError as exc:  # one bad file fails the batched call: find it
            logger.info("nvJPEG refused a batch of %d (%s); decoding them one by one", len(datas), exc)
        decoded: list[torch.Tensor | None] = []
        for tensor in tensors:
            try:
                decoded.append(self._decode(tensor, self.device))
            except RuntimeError:
                decoded.append(None)  # the CPU path decodes it or says why it cannot
        return decoded

    def _on_cpu(self, item: tuple[bytes, Header]) -> tuple[torch.Tensor, Letterbox] | Failure:
        self.fallbacks += 1
        try:
            pixels, box = preprocess(item[0], self.size, self.max_pixels, item[1])
        except InvalidInputError as exc:
            return Failure.of_input(self.stage, exc)
        return torch.from_numpy(pixels).to(self.device, non_blocking=True), box
