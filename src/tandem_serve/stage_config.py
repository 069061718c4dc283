"""Per-stage settings, parsed once from a model's string parameters into dataclasses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, TypeVar

from tandem_serve.errors import ConfigError

_T = TypeVar("_T")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(name: str, raw: object, kind: type) -> object:
    raw = raw if isinstance(raw, str) else str(raw)  # YAML gives typed values, Triton strings
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in _TRUE | _FALSE:
            return lowered in _TRUE
        raise ConfigError(f"parameter {name!r} must be true or false, got {raw!r}")
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"parameter {name!r} must be {kind.__name__}, got {raw!r}") from None


PATH_PARAMETERS = ("model_dir", "weights")  # file-system paths among the stages' parameters


def resolve_paths(values: dict[str, str], model_directory: str) -> dict[str, str]:
    """Path parameters given relative (`weights: "my.safetensors"`) read from the model's own directory, so that
    an exported repository can move; absolute ones and empty defaults stay as they are."""
    resolved = dict(values)
    for key in PATH_PARAMETERS:
        value = resolved.get(key, "")
        if value and model_directory and not Path(value).expanduser().is_absolute():
            resolved[key] = str(Path(model_directory) / value)
    return resolved


def parse_stage_config(cls: type[_T], parameters: Mapping[str, object]) -> _T:
    """Build `cls` from string (or YAML scalar) parameters; unknown keys and bad values raise ConfigError."""
    combined = getattr(cls, "from_parameters", None)
    if combined is not None:  # a stage made of others (Utf8EncoderConfig): its parts take their own keys
        return combined(parameters)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {}
    for name, raw in parameters.items():
        if name.isupper():  # framework settings such as FORCE_CPU_ONLY_INPUT_TENSORS
            continue
        if name not in fields:
            raise ConfigError(f"unknown parameter {name!r}; known: {sorted(fields)}")
        values[name] = _convert(name, raw, type(fields[name].default))
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate:
        validate()
    return config


@dataclass(frozen=True)
class TokenizerConfig:
    """Settings of the `tokenizer` stage."""

    model_dir: str = ""  # empty: the packaged all-MiniLM-L6-v2
    pad_multiple: int = 8
    parallel: bool = True  # encode a batch on all cores; false: on one (for several instances side by side)
    # Larger inputs get a per-request INVALID_ARG / 400: texts are tokenized in full before truncation
    # (64 KiB took ~19 ms on one core, 1 MiB ~0.5 s), so a few huge texts would stall every client.
    max_text_bytes: int = 65_536  # UTF-8 bytes per text
    max_request_bytes: int = 524_288  # UTF-8 bytes of all texts of one request

    def validate(self) -> None:
        if self.pad_multiple < 1:
            raise ConfigError("parameter 'pad_multiple' must be >= 1")
        if self.max_text_bytes < 1 or self.max_request_bytes < self.max_text_bytes:
            raise ConfigError("parameters 'max_text_bytes' >= 1 and 'max_request_bytes' >= 'max_text_bytes' required")


@dataclass(frozen=True)
class TokenEmbeddingConfig:
    """Settings of the `token_embedding` stage."""

    model_dir: str = ""
    output_dtype: str = "fp16"  # HIDDEN crosses to the encoder: fp16 halves the bytes
    cpu_threads: int = 1

    def validate(self) -> None:
        if self.output_dtype not in ("fp16", "fp32"):
            raise ConfigError("parameter 'output_dtype' must be fp16 or fp32")
        if self.cpu_threads < 1:
            raise ConfigError("parameter 'cpu_threads' must be >= 1")


@dataclass(frozen=True)
class EncoderConfig:
    """Settings of the `encoder` stage."""

    model_dir: str = ""
    fuse_token_embedding: bool = False  # true: takes INPUT_IDS and embeds on its own device
    precision: str = "fp32"  # fp32 | fp16 | bf16 (half precisions only on a GPU)
    cpu_threads: int = 0  # torch threads; 0: the cores shared among its CPU instances, 1 on a GPU instance (threads.py)
    # On a GPU, batches up to this many texts replay CUDA graphs captured at load (text/graphs.py); 0: eager
    cuda_graph_max_batch: int = 64
    # Rows of a batch run in groups of similar length of at most this many tokens (rows x padded length), so that
    # long texts do not pad short ones (text/token_budget.py); 0: the whole batch in one call, as it came
    max_batch_tokens: int = 0

    def validate(self) -> None:
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise ConfigError("parameter 'precision' must be fp32, fp16 or bf16")
        if self.cpu_threads < 0:
            raise ConfigError("parameter 'cpu_threads' must be >= 0")
        if self.cuda_graph_max_batch < 0:
            raise ConfigError("parameter 'cuda_graph_max_batch' must be >= 0 (0: no CUDA graphs)")
        if self.max_batch_tokens < 0:
            raise ConfigError("parameter 'max_batch_tokens' must be >= 0 (0: no token budget)")


@dataclass(frozen=True)
class Utf8EncoderConfig:
    """Settings of the `encoder_utf8` stage, which tokenizes and encodes in one step: the tokenizer's and the fused
    encoder's parameters side by side in one model (`model_dir` serves both)."""

    tokenizer: TokenizerConfig
    encoder: EncoderConfig
    PARTS = (TokenizerConfig, EncoderConfig)  # the settings classes its parameters go to (not a field)

    @property
    def cpu_threads(self) -> int:
        return self.encoder.cpu_threads

    def with_cpu_threads(self, threads: int) -> "Utf8EncoderConfig":
        return dataclasses.replace(self, encoder=dataclasses.replace(self.encoder, cpu_threads=threads))

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, object]) -> "Utf8EncoderConfig":
        """Each parameter to the part that knows it; one neither knows raises ConfigError naming all known."""
        parts = cls.PARTS
        known = [{f.name for f in dataclasses.fields(part)} for part in parts]
        for name in parameters:
            if not name.isupper() and not any(name in k for k in known):
                raise ConfigError(f"unknown parameter {name!r}; known: {sorted(set().union(*known))}")
        if str(parameters.get("fuse_token_embedding", "true")).strip().lower() in _FALSE:
            raise ConfigError("encoder_utf8 embeds the token ids itself: parameter 'fuse_token_embedding' must be true")
        tokenizer, encoder = (parse_stage_config(part, {k: v for k, v in parameters.items() if k in names})
                              for part, names in zip(parts, known))
        return cls(tokenizer, dataclasses.replace(encoder, fuse_token_embedding=True))


def with_cpu_threads(settings: _T, threads: int) -> _T:
    """`settings` with torch's thread count `threads` (a combined stage's own `with_cpu_threads` where it has one)."""
    own = getattr(settings, "with_cpu_threads", None)
    return own(threads) if own else dataclasses.replace(settings, cpu_threads=threads)  # type: ignore[type-var]


@dataclass(frozen=True)
class ImagePreprocessConfig:
    """Settings of the `image_preprocess` stage."""

    image_size: int = 640
    max_pixels: int = 50_000_000  # larger images are rejected per request (INVALID_ARG)

    def validate(self) -> None:
        if self.image_size < 32 or self.image_size % 32:
            raise ConfigError("parameter 'image_size' must be a positive multiple of 32")
        if self.max_pixels < 4:
            raise ConfigError("parameter 'max_pixels' must be >= 4")


HEAD_FORMATS = ("yolov5", "yolov8", "boxes-scores-classes")  # what a detector outputs (vision/nms.batched_candidates)


@dataclass(frozen=True)
class DetectorConfig:
    """Settings of the `detector` stage."""

    # empty: the shipped shapes detector; else .safetensors, a state-dict .pt, a torch.export program (.pt2) or
    # TorchScript
    weights: str = ""
    head_format: str = "yolov5"  # what the network outputs: one of HEAD_FORMATS
    size: str = ""  # n/s/m/l/x for a state dict without metadata
    num_classes: int = 0  # for a state dict without metadata
    precision: str = "fp32"  # fp32 | fp16 | bf16 (half precisions only on a GPU)
    prefilter_conf: float = 0.01  # candidates below this score never leave the GPU
    max_candidates: int = 2000  # per image, highest scores first
    # Triton: true leaves CANDIDATES on the GPU for the next step (CUDA IPC); false copies the batch's rows to the host
    # here, once. On the H200 the IPC path cost nms 1.38 ms per request (the copy, CUDA in its stub) against a host
    # step's 0.17 ms, and nms then held the pipeline back.
    output_on_device: bool = False
    cpu_threads: int = 0  # torch threads; 0: the cores shared among its CPU instances, 1 on a GPU instance (threads.py)
    # On a GPU, batches up to this many images (capped by the model's max_batch_size in Triton) replay CUDA graphs
    # of the network and the candidate filter (vision/detector.py GraphedFilter); 0: eager
    cuda_graph_max_batch: int = 64

    def validate(self) -> None:
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise ConfigError("parameter 'precision' must be fp32, fp16 or bf16")
        if self.cpu_threads < 0:
            raise ConfigError("parameter 'cpu_threads' must be >= 0")
        if self.cuda_graph_max_batch < 0:
            raise ConfigError("parameter 'cuda_graph_max_batch' must be >= 0 (0: no CUDA graphs)")
        if not 0 <= self.prefilter_conf < 1:
            raise ConfigError("parameter 'prefilter_conf' must lie in [0, 1)")
        if self.max_candidates < 1:
            raise ConfigError("parameter 'max_candidates' must be >= 1")
        if self.head_format not in HEAD_FORMATS:
            raise ConfigError(f"parameter 'head_format' must be one of {', '.join(HEAD_FORMATS)}")


@dataclass(frozen=True)
class NmsConfig:
    """Settings of the `nms` stage (per-request inputs may override the thresholds)."""

    conf_threshold: float = 0.25
    iou_threshold: float = 0.45
    max_det: int = 300

    def validate(self) -> None:
        if not 0 <= self.conf_threshold < 1 or not 0 < self.iou_threshold <= 1 or self.max_det < 1:
            raise ConfigError("nms parameters: conf_threshold in [0, 1), iou_threshold in (0, 1], max_det >= 1")


# The settings class of each shipped Triton model (its config.pbtxt `parameters`), by model name.
MODEL_SETTINGS: dict[str, type] = {
    "tokenizer": TokenizerConfig, "token_embedding": TokenEmbeddingConfig, "encoder": EncoderConfig,
    "encoder_fused": EncoderConfig, "encoder_utf8": Utf8EncoderConfig, "image_preprocess": ImagePreprocessConfig,
    "detector": DetectorConfig, "nms": NmsConfig,
}


def setting_names(model: str) -> frozenset[str] | None:
    """The parameter names a shipped model's settings take (a combined stage: all its parts'); None for another."""
    cls = MODEL_SETTINGS.get(model)
    if cls is None:
        return None
    return frozenset(f.name for part in getattr(cls, "PARTS", (cls,)) for f in dataclasses.fields(part))
