"""The two pipelines as TorchServe sees them: a batch of request dicts in, one Reply per request out.

Built from the archive's model-config.yaml `handler:` section, whose sub-sections use the same
schemas as the Triton models' parameters (see `tandem_serve.stage_config`) plus `pipeline:`
(`PipelineSettings`). Relative paths are resolved against the extracted archive.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Mapping, Sequence, TypeVar

import numpy as np
import torch

from tandem_serve.errors import ConfigError
from tandem_serve.runtime.per_request import Failure, process_requests
from tandem_serve.runtime.pipeline import MicroBatchPipeline, PipelineSettings
from tandem_serve.stage_config import (
    DetectorConfig,
    EncoderConfig,
    ImagePreprocessConfig,
    NmsConfig,
    TokenEmbeddingConfig,
    TokenizerConfig,
    parse_stage_config,
)
from tandem_serve.text.tokenize import check_text_sizes
from tandem_serve.torchserve.replies import NPY, Reply, accepts
from tandem_serve.torchserve.request_parsing import parse_image, parse_prompt_name, parse_texts

if TYPE_CHECKING:  # the pipelines import torch stages: loaded by the services that use them
    from tandem_serve.text.embedding_pipeline import TextRequest

logger = logging.getLogger(__name__)
_T = TypeVar("_T")
BATCH_HEADER = "X-Tandem-Batch-Size"
_Item = TypeVar("_Item")


@dataclass(frozen=True)
class TextHandlerConfig:
    """Top-level keys of the text handler's section."""

    model_dir: str = ""  # sentence-transformers directory (BERT, RoBERTa, XLM-R, DistilBERT or MPNet), relative to the archive; empty: the default model
    device: str = "auto"  # auto: the GPU TorchServe assigned, if any; cpu: always the CPU
    max_texts: int = 64  # per request
    read_ahead: bool = True  # TorchServe's frames read with one recv per socket read, not per field (torchserve/frames.py)

    def validate(self) -> None:
        if self.device not in ("auto", "cpu"):
            raise ConfigError("handler 'device' must be auto or cpu")
        if self.max_texts < 1:
            raise ConfigError("handler 'max_texts' must be >= 1")


DECODE_SETTINGS = ("auto", "cpu", "gpu", "tandem")


@dataclass(frozen=True)
class DetectionHandlerConfig:
    """Top-level keys of the detection handler's section."""

    device: str = "auto"
    # where JPEGs are decoded and letterboxed: cpu (the pool threads), gpu (nvJPEG on the detector's GPU), tandem (each
    # micro-batch to whichever of the two is expected to finish it first), auto (tandem on a GPU with torchvision,
    # else cpu)
    decode: str = "auto"
    gpu_decode_threads: int = 2  # pool threads in nvJPEG + the GPU letterbox at once (H200: 2 served 1.25x of 1)
    read_ahead: bool = True  # TorchServe's frames read with one recv per socket read, not per field (torchserve/frames.py)

    def validate(self) -> None:
        if self.device not in ("auto", "cpu"):
            raise ConfigError("handler 'device' must be auto or cpu")
        if self.gpu_decode_threads < 1:
            raise ConfigError("handler 'gpu_decode_threads' must be >= 1")
        if self.decode not in DECODE_SETTINGS:
            raise ConfigError(f"handler 'decode' must be one of {list(DECODE_SETTINGS)}, got {self.decode!r}")


def decode_mode(setting: str, device: torch.device) -> str:
    """The decode mode `setting` means on `device`: auto is tandem where nvJPEG can run (a GPU, torchvision that
    imports), else cpu; the others as they are (DetectionStages refuses gpu/tandem without a GPU)."""
    if setting != "auto":
        return setting
    if device.type != "cuda":
        return "cpu"
    try:
        import torchvision.io  # noqa: F401
    except (ImportError, RuntimeError) as exc:  # RuntimeError: torchvision built for another torch
        logger.warning("decode: auto decodes on the CPU: nvJPEG needs torchvision matching torch %s (%s: %s)",
                       torch.__version__, type(exc).__name__, exc)
        return "cpu"
    return "tandem"


def _parse(cls: type[_T], values: Any, where: str) -> _T:
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    try:
        return parse_stage_config(cls, values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def handler_sections(model_yaml_config: Mapping[str, Any] | None, known: Sequence[str]) -> tuple[dict, dict]:
    """Split the `handler:` section into top-level scalars and known sub-sections."""
    section = (model_yaml_config or {}).get("handler") or {}
    if not isinstance(section, Mapping):
        raise ConfigError("model-config.yaml: 'handler' must be a mapping")
    scalars = {k: v for k, v in section.items() if not isinstance(v, Mapping)}
    subsections = {k: v for k, v in section.items() if isinstance(v, Mapping)}
    unknown = sorted(set(subsections) - set(known))
    if unknown:
        raise ConfigError(f"model-config.yaml: unknown handler section(s) {unknown}; known: {list(known)}")
    return scalars, subsections


def resolve(path: str, base: Path) -> str:
    """A path from the config, relative ones taken from the archive's directory; empty stays empty."""
    if not path:
        return path
    candidate = Path(path).expanduser()
    return str(candidate if candidate.is_absolute() else base / candidate)


def select_device(setting: str, gpu_id: Any) -> torch.device:
    """The GPU TorchServe assigned (gpu_id) when there is one and `setting` allows it, else the CPU."""
    if setting == "cpu" or gpu_id is None or gpu_id == "" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{int(gpu_id)}")


def wants_cpu_lane(settings: PipelineSettings, device: torch.device) -> bool:
    """Whether to load a CPU copy of the device stage: asked for, pipelined, and the main device is a GPU."""
    if settings.cpu_lane_threads <= 0:
        return False
    if device.type != "cuda" or not settings.pipelined:
        logger.warning("pipeline.cpu_lane_threads ignored: a CPU lane needs a GPU device and pipelined: true")
        return False
    return True


class PipelineService(Generic[_Item]):
    """Parses each request, runs the valid ones through the pipeline, encodes one Reply per request."""

    pipeline: MicroBatchPipeline

    def parse(self, request: Mapping[str, Any], headers: Mapping[str, str]) -> _Item:
        raise NotImplementedError

    def encode(self, result: Any, headers: Mapping[str, str]) -> Reply:
        raise NotImplementedError

    def handle(self, requests: Sequence[Mapping[str, Any]], headers: Sequence[Mapping[str, str]] | None = None) -> list[Reply]:
        """One Reply per request, in order; a bad request gets a 400 and never fails its batch-mates."""
        headers = headers or [{}] * len(requests)
        replies: list[Reply | None] = [None] * len(requests)
        results = process_requests(list(zip(requests, headers)), lambda pair: self.parse(pair[0] or {}, pair[1]),
                                   self.pipeline.run, self.pipeline.name)
        for index, result in enumerate(results):
            if isinstance(result, Failure):
                replies[index] = Reply.error(result.message, result.status)
            else:
                try:
                    replies[index] = self.encode(result, headers[index])
                except Exception as exc:  # noqa: BLE001 - one request's encoding failed
                    logger.exception("encoding a reply failed")
                    replies[index] = Reply.error(f"internal error ({type(exc).__name__})", 500)
        batch = str(len(requests))  # how many requests TorchServe's batcher handed over together
        return [reply.with_header(BATCH_HEADER, batch) for reply in replies]  # type: ignore[union-attr]

    def close(self) -> None:
        self.pipeline.close()


class TextEmbeddingService(PipelineService["TextRequest"]):
    """Texts -> embeddings: JSON {"embeddings": [[...], ...]} or .npy float32 [n, embedding size]."""

    SECTIONS = ("pipeline", "tokenizer", "encoder", "token_embedding")

    def __init__(self, model_dir: Path, model_yaml_config: Mapping[str, Any] | None, gpu_id: Any = None):
        from tandem_serve.text.embedding_pipeline import TextEmbeddingStages, TextStageConfigs

        scalars, sections = handler_sections(model_yaml_config, self.SECTIONS)
        self.config = _parse(TextHandlerConfig, scalars, "handler")
        weights = resolve(self.config.model_dir, model_dir)
        configs = TextStageConfigs(
            tokenizer=_with_model_dir(_parse(TokenizerConfig, sections.get("tokenizer"), "handler.tokenizer"), weights, model_dir),
            encoder=_with_model_dir(_parse(EncoderConfig, sections.get("encoder"), "handler.encoder"), weights, model_dir),
            token_embedding=_with_model_dir(
                _parse(TokenEmbeddingConfig, sections.get("token_embedding"), "handler.token_embedding"), weights, model_dir),
        )
        self.limits = configs.tokenizer
        self.device = select_device(self.config.device, gpu_id)
        self.stages = TextEmbeddingStages(configs, self.device)
        settings = _parse(PipelineSettings, sections.get("pipeline"), "handler.pipeline")
        cpu_stages = TextEmbeddingStages(configs, torch.device("cpu")) if wants_cpu_lane(settings, self.device) else None
        self.pipeline = MicroBatchPipeline(self.stages, self.device, settings, name="text_embedding", cpu_stages=cpu_stages)
        logger.info("text embedding handler on %s, %s", self.device, settings)

    def parse(self, request: Mapping[str, Any], headers: Mapping[str, str]) -> TextRequest:
        texts = parse_texts(request, self.config.max_texts, headers)
        check_text_sizes(texts, self.limits.max_text_bytes, self.limits.max_request_bytes)
        return self.stages.request(texts, parse_prompt_name(request, headers))

    def encode(self, result: np.ndarray, headers: Mapping[str, str]) -> Reply:
        if accepts(headers, NPY):
            return Reply.npy(result.astype(np.float32, copy=False))
        return Reply.json({"embeddings": np.ascontiguousarray(result, dtype=np.float32)})


class ObjectDetectionService(PipelineService[Any]):
    """Encoded images -> JSON {"boxes": [[x1, y1, x2, y2], ...], "scores": [...], "classes": [...]} (original pixels)."""

    SECTIONS = ("pipeline", "preprocess", "detector", "nms")

    def __init__(self, model_dir: Path, model_yaml_config: Mapping[str, Any] | None, gpu_id: Any = None):
        from tandem_serve.vision.detection_pipeline import DetectionStages, VisionStageConfigs

        scalars, sections = handler_sections(model_yaml_config, self.SECTIONS)
        self.config = _parse(DetectionHandlerConfig, scalars, "handler")
        detector = _parse(DetectorConfig, sections.get("detector"), "handler.detector")
        configs = VisionStageConfigs(
            preprocess=_parse(ImagePreprocessConfig, sections.get("preprocess"), "handler.preprocess"),
            detector=dataclasses.replace(detector, weights=resolve(detector.weights, model_dir)),
            nms=_parse(NmsConfig, sections.get("nms"), "handler.nms"),
        )
        self.device = select_device(self.config.device, gpu_id)
        settings = _parse(PipelineSettings, sections.get("pipeline"), "handler.pipeline")
        decode = decode_mode(self.config.decode, self.device)
        self.stages = DetectionStages(configs, self.device, decode, settings.cpu_threads, self.config.gpu_decode_threads)
        cpu_stages = DetectionStages(configs, torch.device("cpu")) if wants_cpu_lane(settings, self.device) else None
        self.pipeline = MicroBatchPipeline(self.stages, self.device, settings, name="object_detection", cpu_stages=cpu_stages)
        logger.info("object detection handler on %s, decoding on %s, %s", self.device,
                    {"cpu": "the CPU", "gpu": "the GPU (nvJPEG)", "tandem": "nvJPEG and the CPU (tandem)"}[decode], settings)

    def close(self) -> None:
        super().close()
        if self.stages.balancer is not None:
            logger.info("object_detection: micro-batches per decode lane %s", self.stages.lanes())

    def parse(self, request: Mapping[str, Any], headers: Mapping[str, str]):
        return self.stages.request(*parse_image(request, headers))

    def encode(self, result: Any, headers: Mapping[str, str]) -> Reply:
        return Reply.json({"boxes": np.ascontiguousarray(result.boxes), "scores": np.ascontiguousarray(result.scores),
                           "classes": np.ascontiguousarray(result.classes)})


def _with_model_dir(config: _T, weights: str, base: Path) -> _T:
    """A stage config whose model_dir is its own (resolved) or else the handler's."""
    own = getattr(config, "model_dir")
    return dataclasses.replace(config, model_dir=resolve(own, base) if own else weights)
