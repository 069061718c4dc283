"""Where the project's model repositories live."""

from __future__ import annotations

from pathlib import Path

from tandem_serve.errors import ConfigError

REPOSITORY_DIRS = ("model_repository", "ensembles")


def project_root() -> Path | None:
    """The checkout holding `model_repository/` and `ensembles/` (editable installs), if any."""
    for parent in Path(__file__).resolve().parents:
        if all((parent / name).is_dir() for name in REPOSITORY_DIRS):
            return parent
    return None


def default_repositories() -> list[Path]:
    """The project's two Triton model repositories: the stage models and the ensembles."""
    root = project_root()
    if root is None:
        raise ConfigError(
            "cannot find model_repository/ and ensembles/ next to the tandem_serve package; "
            "pass --model-repository for each repository"
        )
    return [root / name for name in REPOSITORY_DIRS]
