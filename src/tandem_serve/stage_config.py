"""Per-stage settings, parsed once from a model's string parameters into dataclasses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, TypeVar

from tandem_serve.errors import ConfigError

_T = TypeVar("_T")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(name: str, raw: str, kind: type) -> object:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in _TRUE | _FALSE:
            return lowered in _TRUE
        raise ConfigError(f"parameter {name!r} must be true or false, got {raw!r}")
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"parameter {name!r} must be {kind.__name__}, got {raw!r}") from None


def parse_stage_config(cls: type[_T], parameters: Mapping[str, str]) -> _T:
    """Build `cls` from string parameters; unknown keys and bad values raise ConfigError naming them."""
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

    def validate(self) -> None:
        if self.pad_multiple < 1:
            raise ConfigError("parameter 'pad_multiple' must be >= 1")


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
    cpu_threads: int = 0  # 0: torch's default, used when the instance runs on the CPU

    def validate(self) -> None:
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise ConfigError("parameter 'precision' must be fp32, fp16 or bf16")
        if self.cpu_threads < 0:
            raise ConfigError("parameter 'cpu_threads' must be >= 0")
