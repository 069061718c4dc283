"""The GPU tier's figures: a session fixture whose dict the tests fill, written to $TANDEM_RESULTS (JSON) at the end.
Imported by conftest.py, and by test modules run with --noconftest on a machine without the Triton wheels."""

from __future__ import annotations

import json
import os

import pytest
import torch


@pytest.fixture(scope="session")
def results():
    figures: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    yield figures
    if os.environ.get("TANDEM_RESULTS"):
        with open(os.environ["TANDEM_RESULTS"], "w") as handle:
            json.dump(figures, handle, indent=2)
