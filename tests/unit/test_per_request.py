"""A bad request fails alone; an unexpected error fails the batch without a traceback."""

from tandem_serve.errors import InvalidInputError
from tandem_serve.runtime.per_request import Failure, process_requests


def _decode(value):
    if value < 0:
        raise InvalidInputError(f"negative value {value}")
    return value


def test_bad_request_fails_alone_and_batch_is_computed_once():
    calls = []

    def compute(items):
        calls.append(list(items))
        return [v * 10 for v in items]

    results = process_requests([1, -2, 3], _decode, compute, "stage")
    assert results[0] == 10 and results[2] == 30
    assert results[1] == Failure("stage: negative value -2", invalid=True, http_status=400) and results[1].status == 400
    assert calls == [[1, 3]]


def test_unexpected_error_is_internal_and_hides_details():
    def compute(items):
        raise RuntimeError("secret internals")

    results = process_requests([1, 2], _decode, compute, "stage")
    assert all(isinstance(r, Failure) and not r.invalid for r in results)
    assert "secret" not in results[0].message and "RuntimeError" in results[0].message


def test_all_invalid_skips_compute():
    def compute(items):
        raise AssertionError("must not be called")

    assert all(isinstance(r, Failure) for r in process_requests([-1, -2], _decode, compute, "s"))
