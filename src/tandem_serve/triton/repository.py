"""Write the project's Triton models and ensembles as one self-contained model repository.

For a server image, a mounted volume or KServe's /mnt/models: Triton (and KServe's runtime) take
one repository there, so the stage models and the ensembles go into the same directory. Each
model's `model.py` imports the installed tandem_serve package; its configs can be pointed at
other model files (a sentence-transformers directory, detector weights), and detector weights are
copied in so that the repository can move (a relative `weights` parameter is read from the
model's own directory).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from tandem_serve.errors import ConfigError
from tandem_serve.stage_config import HEAD_FORMATS
from tandem_serve.paths import default_repositories
from tandem_serve.triton.model_config import read_config, write_config
from tandem_serve.tuning.render import apply_model_files, text_sizes_of

logger = logging.getLogger(__name__)
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc")


def export_repository(target: Path, model_dir: Path | None = None, weights: Path | None = None,
                      overwrite: bool = False, head_format: str | None = None) -> list[str]:
    """Copy every stage model and ensemble into `target`, pointed at `model_dir` / `weights` (and the detector's
    `head_format`) when given; returns the model names written."""
    target = Path(target)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ConfigError(f"{target} is not empty; pass --overwrite to write the models into it anyway")
    if weights is not None and not Path(weights).is_file():
        raise ConfigError(f"detector weights {weights} do not exist")
    if head_format is not None and head_format not in HEAD_FORMATS:
        raise ConfigError(f"head_format {head_format!r} is not one of {', '.join(HEAD_FORMATS)}")
    models = {"model_dir": str(Path(model_dir).expanduser().resolve())} if model_dir else {}
    sizes = text_sizes_of(models)
    written = []
    for source in default_repositories():
        for model in sorted(p for p in source.iterdir() if (p / "config.pbtxt").is_file()):
            destination = target / model.name
            shutil.copytree(model, destination, dirs_exist_ok=True, ignore=IGNORED)
            config = read_config(destination / "config.pbtxt")
            if weights is not None and "weights" in config.parameters:
                shutil.copy2(weights, destination / Path(weights).name)
                config.parameters["weights"].string_value = Path(weights).name  # read from the model's directory
            if head_format is not None and config.name == "detector":
                config.parameters["head_format"].string_value = head_format
            apply_model_files(config, models, sizes)
            write_config(config, destination / "config.pbtxt")
            written.append(model.name)
    target.chmod(0o755)  # the server in an image may run as another user than the one exporting
    logger.info("wrote %d models to %s", len(written), target)
    return written
