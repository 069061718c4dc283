"""One real embedded Triton for the whole session; its log is printed when a test failed."""

from __future__ import annotations

import logging
import sys

import pytest

from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions

logger = logging.getLogger(__name__)


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def triton(request, tmp_path_factory):
    server = EmbeddedTriton(TritonOptions(workspace=tmp_path_factory.mktemp("triton"), startup_timeout_s=300))
    server.start()
    failed_before = request.session.testsfailed
    yield server
    if request.session.testsfailed > failed_before:
        sys.stderr.write("\n" + server.log_tail(200) + "\n")
    server.stop()
