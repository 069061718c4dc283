"""GPU tier: figures recorded by the tests (tests/gpu/figures.py)."""

from tests.gpu.figures import results  # noqa: F401 - the fixture, shared with modules run with --noconftest
