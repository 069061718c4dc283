"""Run a batch of requests so that a bad request fails alone and its batch-mates succeed."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

from tandem_serve.errors import InvalidInputError

logger = logging.getLogger(__name__)

_Req = TypeVar("_Req")
_Item = TypeVar("_Item")
_Out = TypeVar("_Out")


@dataclass(frozen=True)
class Failure:
    """Why one request failed; `invalid` distinguishes the client's fault from the server's."""

    message: str
    invalid: bool
    http_status: int = 0  # 0: 400 when invalid, else 500

    @classmethod
    def of_input(cls, stage: str, exc: InvalidInputError) -> "Failure":
        """The client's fault, with the HTTP status its error class names (400, or 415 for a content type)."""
        return cls(f"{stage}: {exc}", invalid=True, http_status=exc.http_status)

    @property
    def status(self) -> int:
        return self.http_status or (400 if self.invalid else 500)


def process_requests(
    requests: Sequence[_Req],
    decode: Callable[[_Req], _Item],
    compute: Callable[[list[_Item]], Sequence[_Out]],
    stage: str,
) -> list[_Out | Failure]:
    """Decode each request (InvalidInputError fails that one), then compute the rest as one batch."""
    results: list[_Out | Failure | None] = [None] * len(requests)
    items: list[_Item] = []
    positions: list[int] = []
    for index, request in enumerate(requests):
        try:
            items.append(decode(request))
            positions.append(index)
        except InvalidInputError as exc:
            results[index] = Failure.of_input(stage, exc)
    if items:
        try:
            outputs = compute(items)
        except InvalidInputError as exc:
            outputs = [Failure.of_input(stage, exc)] * len(items)
        except Exception as exc:  # noqa: BLE001 - reported per request, never a crash
            logger.exception("%s failed on a batch of %d requests", stage, len(items))
            outputs = [Failure(f"{stage}: internal error ({type(exc).__name__})", invalid=False)] * len(items)
        for index, output in zip(positions, outputs):
            results[index] = output
    return results  # type: ignore[return-value]
