"""Copies the model repositories, handlers and shipped weights into the package (tandem_serve/assets/).

Everything else lives in pyproject.toml. The directories stay at the top of the checkout, where
Triton and TorchServe users expect them; an installed package finds its copy through
`tandem_serve.paths`.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ASSET_DIRS = ("model_repository", "ensembles", "handlers", "models")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.train.log")


class BuildWithAssets(build_py):
    """build_py that also copies the asset directories into tandem_serve/assets/."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the checkout itself
            return
        target = Path(self.build_lib) / "tandem_serve" / "assets"
        for name in ASSET_DIRS:
            shutil.rmtree(target / name, ignore_errors=True)
            shutil.copytree(Path(name), target / name, ignore=IGNORED)


setup(cmdclass={"build_py": BuildWithAssets})
