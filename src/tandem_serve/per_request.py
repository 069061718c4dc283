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
            results[index] = Failure(f"{stage}: {exc}", invalid=True)
    if items:
        try:
            outputs = compute(items)
        except InvalidInputError as exc:
            outputs = [Failure(f"{stage}: {exc}", invalid=True)] * len(items)
        except Exception as exc:  # noqa: BLE001 - reported per request, never a crash
            logger.exception("%s failed on a batch of %d requests", stage, len(items))
            outputs = [Failure(f"{stage}: internal error ({type(exc).__name__})", invalid=False)] * len(items)
        for index, output in zip(positions, outputs):
            results[index] = output
    return results  # type: ignore[return-value]
