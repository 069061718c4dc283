"""The external peer of the text workloads: LitServe serving a sentence-transformers model, fp16 on the GPU, with
LitServe's own dynamic batching (what a user picks instead of the plugin; issue 18).

    python bench/peers/litserve_text.py --model DIR --port PORT [--device cuda] [--max-batch-size 64]
                                        [--batch-timeout 0.005] [--api-servers 4] [--workers 1]

POST /predict {"text": "..."} answers {"embedding": [...]} (sentence-transformers' `encode`, its own modules,
normalisation included); GET /health answers 200 once every inference worker has loaded the model. Binds loopback
only. Needs `litserve` (bench only: tests/gpu/prepare_carry.sh carries its wheels to the GPU machine).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import litserve as ls
from fastapi import HTTPException

logger = logging.getLogger("bench.peers.litserve_text")


class EmbeddingAPI(ls.LitAPI):
    """One sentence-transformers model per inference worker; a batch of texts per `predict`."""

    def __init__(self, model_dir: str, precision: str, **batching: Any):
        super().__init__(**batching)
        self.model_dir, self.precision = model_dir, precision
        self.model: Any = None

    def setup(self, device: str) -> None:
        """Load the model on `device` (fp16 on a GPU unless told fp32)."""
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(self.model_dir, device=device)
        if self.precision == "fp16" and device.startswith("cuda"):
            self.model.half()
        logger.info("loaded %s on %s (%s)", self.model_dir, device, self.precision)

    def decode_request(self, request: dict) -> str:
        """The request's text; a body without a string "text" is refused with a 400 naming the field."""
        text = request.get("text") if isinstance(request, dict) else None
        if not isinstance(text, str):
            raise HTTPException(400, 'the body needs a string field "text"')
        return text

    def predict(self, texts: list[str]) -> Any:
        """The batch's embeddings, one row per text."""
        return self.model.encode(texts, batch_size=len(texts), convert_to_numpy=True)

    def encode_response(self, output: Any) -> dict:
        return {"embedding": output.tolist()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a sentence-transformers directory")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--precision", choices=["fp16", "fp32"], default="fp16")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-timeout", type=float, default=0.005, help="seconds a batch waits to fill")
    parser.add_argument("--api-servers", type=int, default=4, help="LitServe's HTTP server processes")
    parser.add_argument("--workers", type=int, default=1, help="inference workers per device")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    api = EmbeddingAPI(args.model, args.precision, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator=args.device, devices=1, workers_per_device=args.workers, timeout=60,
                          fast_queue=True)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=args.api_servers, generate_client_file=False,
               log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
