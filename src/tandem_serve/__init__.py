"""tandem-serve: CPU and GPU stages in tandem inside Triton and TorchServe."""

import os as _os
import site as _site
import sys as _sys

__version__ = "0.1.0"


def _add_stub_site_dirs() -> None:
    """Inside a Triton Python-backend stub, put the launcher's site-packages first on sys.path.

    The stub embeds an interpreter that ignores PYTHONPATH, so the embedded launcher passes the
    environment's site directories in TANDEM_PYTHONPATH; addsitedir also reads their .pth files.
    """
    before = list(_sys.path)
    for directory in _os.environ.get("TANDEM_PYTHONPATH", "").split(_os.pathsep):
        if directory and directory not in before:
            _site.addsitedir(directory)
    added = [p for p in _sys.path if p not in before]
    _sys.path[:] = added + before


_add_stub_site_dirs()
