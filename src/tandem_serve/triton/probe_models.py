"""The pass-through Python-backend model `tandem profile` chains to time Triton's per-step costs."""

from __future__ import annotations

from typing import Any

from tandem_serve.triton import backend


class PassThroughModel:
    """DATA (uint8) -> DATA, copied: what any step does with its tensors, without compute."""

    def initialize(self, args: dict[str, str]) -> None:
        backend.bridge_logging()

    def execute(self, requests: list[Any]) -> list[Any]:
        return backend.respond(
            requests,
            decode=lambda r: backend.input_tensor(r, "DATA"),
            compute=lambda tensors: [t.clone() for t in tensors],
            encode=lambda t: [backend.output_tensor("DATA", t)],
            stage="pass_through",
        )
