"""Build the TorchServe archives (.mar) of both pipelines with torch-model-archiver.

Each archive holds the handler, this library's source (so the worker imports the same code),
the weights and the model-config.yaml. The worker's Python still needs the library's
dependencies (torch, numpy, tokenizers, safetensors, pillow).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from tandem_serve.errors import ConfigError
from tandem_serve.model_files import REQUIRED_FILES, SentenceModelFiles, module_dirs
from tandem_serve.paths import handlers_dir

logger = logging.getLogger(__name__)
# top-level files only: the module directories modules.json lists are copied whole (model_files.module_dirs)
OPTIONAL_MODEL_FILES = ("modules.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                        "config_sentence_transformers.json")
FORMATS = {"mar": "default", "dir": "no-archive"}


@dataclass(frozen=True)
class ArchiveSpec:
    """One archive: its name, handler file and model-config.yaml under handlers/."""

    name: str
    handler: str
    config: str


ARCHIVES = {
    "text_embedding": ArchiveSpec("text_embedding", "text_embedding_handler.py", "text_embedding/model-config.yaml"),
    "object_detection": ArchiveSpec("object_detection", "object_detection_handler.py", "object_detection/model-config.yaml"),
}


def _copy_library(staging: Path) -> None:
    package = Path(__file__).resolve().parents[1]
    shutil.copytree(package, staging / "tandem_serve", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "assets"))


def _stage_text(staging: Path, model_dir: Path | None) -> None:
    """The model's files under staging/model: the top-level ones and every module directory modules.json lists."""
    files = SentenceModelFiles.load(model_dir)
    for name in (*REQUIRED_FILES, *OPTIONAL_MODEL_FILES):
        source = files.root / name
        if source.is_file():
            target = staging / "model" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    for name in module_dirs(files.root):  # Pooling, Dense (with its weights), Normalize (often not on disk)
        if (files.root / name).is_dir():
            shutil.copytree(files.root / name, staging / "model" / name, dirs_exist_ok=True)


def _stage_detection(staging: Path, weights: Path | None, config: dict) -> None:
    from tandem_serve.vision.detector import default_weights

    source = Path(weights).expanduser() if weights else default_weights()
    if not source.is_file():
        raise ConfigError(f"detector weights {source} do not exist")
    name = "detector" + "".join(source.suffixes[-1:])
    shutil.copy2(source, staging / name)
    config.setdefault("handler", {}).setdefault("detector", {})["weights"] = name


def merge(base: dict, overrides: Mapping) -> dict:
    """`base` with `overrides` merged in, nested mappings key by key."""
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = merge(merged.get(key) or {}, value) if isinstance(value, Mapping) else value
    return merged


def build_archive(name: str, store: Path, model_dir: Path | None = None, weights: Path | None = None,
                  archive_format: str = "mar", overrides: Mapping | None = None) -> Path:
    """Build archive `name` into `store` (overwriting); `overrides` change its model-config.yaml; return its path."""
    import yaml

    if name not in ARCHIVES:
        raise ConfigError(f"unknown archive {name!r}; known: {sorted(ARCHIVES)}")
    if archive_format not in FORMATS:
        raise ConfigError(f"archive format must be one of {sorted(FORMATS)}")
    spec, handlers = ARCHIVES[name], handlers_dir()
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    config = merge(yaml.safe_load((handlers / spec.config).read_text()) or {}, overrides or {})
    with tempfile.TemporaryDirectory(prefix=f"tandem-archive-{name}-") as tmp:
        staging = Path(tmp) / "extra"
        staging.mkdir()
        _copy_library(staging)
        if name == "text_embedding":
            _stage_text(staging, model_dir)
        else:
            _stage_detection(staging, weights, config)
        config_file = Path(tmp) / "model-config.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        target = store / (name if archive_format == "dir" else f"{name}.mar")
        if target.is_dir():
            shutil.rmtree(target)
        command = [sys.executable, "-c", "from model_archiver.model_packaging import generate_model_archive as g; g()",
                   "--model-name", name, "--version", "1.0", "--handler", str(handlers / spec.handler),
                   "--extra-files", str(staging), "--config-file", str(config_file), "--export-path", str(store),
                   "--archive-format", FORMATS[archive_format], "--force"]
        logger.info("building %s with torch-model-archiver", target)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"torch-model-archiver failed for {name}:\n{result.stderr[-2000:]}")
    logger.info("archive ready: %s", target)
    return target
