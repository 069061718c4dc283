"""The object-detection pipeline for one worker: decode + letterbox on the CPU or the GPU, detector on the device,
NMS on the CPU.

Decoding (`decode`): "cpu" decodes each image on the pipeline's pool threads (OpenCV / Pillow); "gpu" decodes each
micro-batch's JPEGs in one nvJPEG call on the detector's GPU and letterboxes them there, so that only the compressed
bytes cross PCIe (other formats, and files nvJPEG refuses, on the CPU per image); "tandem" routes each micro-batch to
nvJPEG or to the pool thread that collates it, whichever `LaneBalancer` expects to finish it first from the rows
queued at each and the seconds per image measured there. With nvJPEG the requests' headers are read first (per
request, on the pool), so bad images fail alone before a batch is decoded; an image the decoders refuse later
fails alone too (its slot in the batch is grey).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from tandem_serve.errors import ConfigError, InvalidInputError
from tandem_serve.runtime.balance import LaneBalancer
from tandem_serve.runtime.per_request import Failure
from tandem_serve.runtime.transfer import stack_into_host
from tandem_serve.stage_config import DetectorConfig, ImagePreprocessConfig, NmsConfig
from tandem_serve.vision.detector import DetectStage
from tandem_serve.vision.letterbox import PAD_VALUE, Header, Letterbox, preprocess, read_header
from tandem_serve.vision.nms import Detections, postprocess
from tandem_serve.vision.stages import NmsStage

DECODE_MODES = ("cpu", "gpu", "tandem")
STAGE = "object_detection"  # how failures name the pipeline, as the pipeline's own do


@dataclass(frozen=True)
class VisionStageConfigs:
    """The stage settings a detection pipeline is built from (the same schemas as the Triton models)."""

    preprocess: ImagePreprocessConfig
    detector: DetectorConfig
    nms: NmsConfig


@dataclass(frozen=True)
class ImageRequest:
    """One encoded image and its effective NMS thresholds (validated by `DetectionStages.request`)."""

    data: bytes
    conf: float
    iou: float
    max_det: int


@dataclass
class PreparedImage:
    """A request on its way to the detector: letterboxed on the CPU at once, or only its header read (nvJPEG and
    the tandem decode the micro-batch in `collate`, which fills in the letterbox or the failure)."""

    request: ImageRequest
    pixels: np.ndarray | None = None  # uint8 [3, S, S] when decoded on the CPU in `prepare`
    letterbox: Letterbox | None = None
    header: Header | None = None
    failure: Failure | None = None  # the image failed in `collate`; its slot in the batch is grey


class DetectionStages:
    """PipelineStages for encoded images -> Detections (boxes in original pixels) per request."""

    def __init__(self, configs: VisionStageConfigs, device: torch.device, decode: str = "cpu", cpu_threads: int = 1,
                 gpu_decode_threads: int = 1):
        if decode not in DECODE_MODES:
            raise ConfigError(f"decode must be one of {list(DECODE_MODES)}, got {decode!r}")
        self.configs = configs
        self.detector = DetectStage(configs.detector, device)
        self.nms = NmsStage(configs.nms)
        self.decoder = None
        self.balancer: LaneBalancer | None = None
        if decode != "cpu":
            if self.detector.device.type != "cuda":
                raise ConfigError(f"decode: {decode} needs the detector on a GPU, it is on {self.detector.device}")
            from tandem_serve.vision.gpu_decode import GpuDecoder

            self.decoder = GpuDecoder(configs.preprocess.image_size, self.detector.device, configs.preprocess.max_pixels,
                                      stage=STAGE)
            # micro-batches in nvJPEG at once (torchvision decodes one at a time; the letterboxes of others overlap)
            gpu_decode_threads = max(1, gpu_decode_threads)
            self._nvjpeg = threading.Semaphore(gpu_decode_threads)
            if decode == "tandem":
                self.balancer = LaneBalancer(["nvjpeg", "cpu"], servers=[gpu_decode_threads, max(1, cpu_threads)])
        self.decode = decode

    def request(self, data: bytes, conf: float | None = None, iou: float | None = None,
                max_det: int | None = None) -> ImageRequest:
        """A request with thresholds filled from the config; bad overrides raise InvalidInputError."""
        return ImageRequest(data, *self.nms.thresholds(conf, iou, max_det))

    @staticmethod
    def rows(item: ImageRequest) -> int:
        return 1

    def prepare(self, item: ImageRequest) -> PreparedImage:
        """Decoded and letterboxed on the CPU, or (with nvJPEG) its header checked; bad images raise InvalidInputError."""
        config = self.configs.preprocess
        if self.decoder is not None:
            return PreparedImage(item, header=read_header(item.data, config.max_pixels))
        pixels, box = preprocess(item.data, config.image_size, config.max_pixels)
        return PreparedImage(item, pixels, box)

    def collate(self, prepared: list[PreparedImage]) -> list[torch.Tensor]:
        """The batch: decoded by nvJPEG onto the GPU, or stacked straight into pinned memory when the detector is on
        a GPU (decoded here first where `prepare` only read the headers)."""
        pending = [p for p in prepared if p.pixels is None]
        if not pending:
            return [self._stacked_on_host(prepared)]
        lane = self.balancer.choose(len(pending)) if self.balancer is not None else None
        on_gpu = self.decoder is not None and (lane is None or lane.name == "nvjpeg")
        decode = self._nvjpeg_batch if on_gpu else self._cpu_batch
        try:
            # the wait for an nvJPEG slot is queueing, which the balancer counts as rows in flight: not timed
            with self._nvjpeg if on_gpu else contextlib.nullcontext():
                started = time.perf_counter()
                batch = decode(prepared)
                seconds = time.perf_counter() - started
        except BaseException:
            if lane is not None:
                self.balancer.failed(lane, len(pending))
            raise
        if lane is not None:
            self.balancer.done(lane, len(pending), seconds)
        return [batch]

    def _nvjpeg_batch(self, prepared: list[PreparedImage]) -> torch.Tensor:
        batch, boxes = self.decoder.stacked([(p.request.data, p.header) for p in prepared])
        for p, box in zip(prepared, boxes):
            if isinstance(box, Failure):
                p.failure = box
            else:
                p.letterbox = box
        return batch

    def _cpu_batch(self, prepared: list[PreparedImage]) -> torch.Tensor:
        config = self.configs.preprocess
        for p in prepared:
            try:
                p.pixels, p.letterbox = preprocess(p.request.data, config.image_size, config.max_pixels, p.header)
            except InvalidInputError as exc:
                p.failure = Failure.of_input(STAGE, exc)
        return self._stacked_on_host(prepared)

    def _stacked_on_host(self, prepared: list[PreparedImage]) -> torch.Tensor:
        """np.stack of the pixels into (pinned, for a GPU) host memory; a failed image's slot grey."""
        size = self.configs.preprocess.image_size
        grey = None
        arrays = []
        for p in prepared:
            if p.pixels is None:
                grey = grey if grey is not None else np.full((3, size, size), PAD_VALUE, np.uint8)
                arrays.append(grey)
            else:
                arrays.append(p.pixels)
        return stack_into_host(arrays, pin=self.detector.device.type == "cuda")

    def infer(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Candidate rows and counts, enqueued: the pipeline copies both to the host and waits once."""
        return list(self.detector.enqueue(inputs[0]))

    @staticmethod
    def finish(outputs: list[torch.Tensor], prepared: list[PreparedImage]) -> list[Detections | Failure]:
        rows, counts = outputs[0].numpy(), outputs[1].tolist()
        return [p.failure if p.failure is not None else
                postprocess(r[:n], p.letterbox, p.request.conf, p.request.iou, p.request.max_det)
                for r, n, p in zip(rows, counts, prepared)]

    def lanes(self) -> dict[str, dict[str, float | int | None]]:
        """Per decode lane of the tandem: micro-batches and images routed, ms per image; empty otherwise."""
        return self.balancer.snapshot() if self.balancer is not None else {}
