"""GPU tier: figures recorded by the tests, written to $TANDEM_RESULTS (JSON) at the end of the session."""

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
