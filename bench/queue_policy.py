"""The queue bound and Triton's batcher: an ensemble under a closed load with the shipped configs (a queue policy on
every stage, two instances of each), with one instance of the bottleneck stage, and with no queue policy at all.

    python bench/queue_policy.py [--ensemble text_embedding_fused] [--clients 64] [--seconds 20] [--rounds 2]
                                 [--out bench/results/queue-policy.json]

Each client sends one request (one text, or one generated scene for object_detection) and waits for it, again and
again: nothing new arrives while all wait, the load under which a lost wake-up of Triton's batcher shows
(tandem_serve/triton/queue_policy.py). Per variant: requests/s, p50 / p99 / max latency and the requests over
400 ms, from `--rounds` interleaved runs of `--seconds` each, every variant on a server of its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from tandem_serve.clients.triton import text_input  # noqa: E402
from tandem_serve.loadgen import percentile_ms  # noqa: E402
from tandem_serve.paths import default_repositories  # noqa: E402
from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions  # noqa: E402

logger = logging.getLogger("queue_policy")
BOTTLENECK = {"text_embedding_fused": "encoder_fused", "text_embedding": "encoder", "object_detection": "detector"}
VARIANTS = ("shipped", "one_instance", "no_policy")


def variant_repositories(root: Path, variant: str, bottleneck: str) -> list[Path]:
    """Copies of the shipped repositories (files linked) with `variant`'s configs."""
    repositories = []
    for source in default_repositories():
        target = root / source.name
        repositories.append(target)
        for model in (m for m in source.iterdir() if (m / "config.pbtxt").exists()):
            (target / model.name).mkdir(parents=True)
            for item in model.iterdir():
                if item.name != "config.pbtxt":
                    (target / model.name / item.name).symlink_to(item, target_is_directory=item.is_dir())
            config = text_format.Parse((model / "config.pbtxt").read_text(), mc.ModelConfig())
            if variant == "no_policy" and config.HasField("dynamic_batching"):
                config.dynamic_batching.ClearField("default_queue_policy")
            if variant != "shipped" and config.name == bottleneck:
                config.instance_group[0].count = 1  # all cores (cpu_threads 0) on its one CPU instance
            (target / model.name / "config.pbtxt").write_text(text_format.MessageToString(config))
    return repositories


def request_inputs(ensemble: str, client_index: int) -> list:
    """One request of the ensemble's kind."""
    if ensemble == "object_detection":
        from tandem_serve.vision.shapes import encode_scene, generate_scene  # generated scenes, as the tests send

        rng = np.random.default_rng(client_index)
        data = np.frombuffer(encode_scene(generate_scene(rng), rng), dtype=np.uint8)
        image = grpcclient.InferInput("image", [1, data.size], "UINT8")
        image.set_data_from_numpy(data[None])
        return [image]
    return [text_input([f"a short query number {client_index} about the weather and the news"], "grpc", name="text")]


def closed_load(url: str, ensemble: str, clients: int, seconds: float) -> dict:
    """`clients` threads each sending one request after another for `seconds`: rate and latencies."""
    latencies: list[float] = []
    errors: list[str] = []
    stop = time.monotonic() + seconds

    def client(index: int) -> None:
        with grpcclient.InferenceServerClient(url) as connection:
            inputs = request_inputs(ensemble, index)
            connection.infer(ensemble, inputs)  # warm
            while time.monotonic() < stop:
                start = time.monotonic()
                try:
                    connection.infer(ensemble, inputs, client_timeout=60)
                    latencies.append(time.monotonic() - start)
                except Exception as exc:  # noqa: BLE001 - counted, the run goes on
                    errors.append(str(exc)[:120])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - start
    ordered = sorted(latencies)  # seconds; the load generator's percentiles
    return {"requests": len(ordered), "per_s": len(ordered) / wall, "p50_ms": percentile_ms(ordered, 0.5),
            "p99_ms": percentile_ms(ordered, 0.99), "max_ms": ordered[-1] * 1e3 if ordered else float("nan"),
            "over_400ms": sum(x > 0.4 for x in ordered),
            "errors": len(errors), "first_error": errors[0] if errors else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ensemble", default="text_embedding_fused", choices=sorted(BOTTLENECK))
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", type=Path, default=Path("bench/results/queue-policy.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runs = []
    for round_index in range(args.rounds):
        for variant in args.variants:
            with tempfile.TemporaryDirectory() as tmp:
                repositories = variant_repositories(Path(tmp), variant, BOTTLENECK[args.ensemble])
                with EmbeddedTriton(TritonOptions(model_repositories=repositories, workspace=Path(tmp) / "ws")) as server:
                    result = closed_load(server.grpc_url, args.ensemble, args.clients, args.seconds)
            runs.append({"variant": variant, "round": round_index, **result})
            logger.info("%-13s round %d: %7.1f /s  p50 %6.1f  p99 %6.1f  max %6.0f ms  over 400 ms %d  errors %d",
                        variant, round_index, result["per_s"], result["p50_ms"], result["p99_ms"], result["max_ms"],
                        result["over_400ms"], result["errors"])
    result = {"machine": machine(), "ensemble": args.ensemble, "clients": args.clients, "seconds": args.seconds,
              "bottleneck": BOTTLENECK[args.ensemble], "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    lines = [f"`{args.ensemble}`, {args.clients} closed-loop clients, {args.seconds:.0f} s per run, "
             f"{machine()['cpus']} cores, GPU: {machine()['gpu']}", "",
             "| variant | round | requests/s | p50 ms | p99 ms | max ms | over 400 ms | errors |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['round']} | {r['per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['max_ms']:.0f} | {r['over_400ms']} | {r['errors']} |" for r in runs]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
