"""Where the project's model repositories, handlers and shipped weights live.

An installed package carries them as package data under `tandem_serve/assets/` (setup.py's build_py
copies model_repository/, ensembles/, handlers/ and models/ in); an editable install reads them from the
checkout. `tandem repository export DIR` writes a self-contained copy for a server image or a volume.
"""

from __future__ import annotations

from pathlib import Path

from tandem_serve.errors import ConfigError

REPOSITORY_DIRS = ("model_repository", "ensembles")
PACKAGED_ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED_WEIGHTS = "models/detector/shapes-yolov5n.safetensors"


def project_root() -> Path | None:
    """The checkout holding `model_repository/` and `ensembles/` (editable installs), if any."""
    for parent in Path(__file__).resolve().parents:
        if all((parent / name).is_dir() for name in REPOSITORY_DIRS):
            return parent
    return None


def assets_root() -> Path:
    """The directory holding model_repository/, ensembles/, handlers/ and models/: the installed package's
    assets, else the checkout (an editable install)."""
    if all((PACKAGED_ASSETS / name).is_dir() for name in REPOSITORY_DIRS):
        return PACKAGED_ASSETS
    root = project_root()
    if root is None:
        raise ConfigError("the tandem_serve package has no assets/ (model repositories, handlers, weights) and is "
                          "not in a checkout; reinstall it from a wheel or sdist (pip install tandem-serve), "
                          "or pass each path explicitly")
    return root


def default_repositories() -> list[Path]:
    """The project's two Triton model repositories: the stage models and the ensembles."""
    root = assets_root()
    return [root / name for name in REPOSITORY_DIRS]


def handlers_dir() -> Path:
    """The TorchServe handlers and their model-config.yaml files."""
    return assets_root() / "handlers"


def shipped_weights() -> Path:
    """The shapes detector trained by tandem_serve.vision.train (the detector's default weights)."""
    return assets_root() / SHIPPED_WEIGHTS
