"""How long the supervised embedded Triton takes to serve again after a stub of each model is SIGKILLed.

For every Python-backend model in turn: kill one of its stubs, then time until the launcher's health
endpoint says ready again (detection + unload + load, with CUDA-graph capture for GPU encoders),
and report the supervisor's own reload time. A table (markdown) and JSON.

    python bench/recovery.py --out results/recovery
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions  # noqa: E402
from tandem_serve.triton.stubs import server_stubs  # noqa: E402

logger = logging.getLogger("recovery")


def ready(server: EmbeddedTriton) -> bool:
    try:
        with urllib.request.urlopen(server.health_url + "/ready", timeout=5) as response:
            return response.status == 200
    except urllib.error.HTTPError:
        return False


def recover(server: EmbeddedTriton, model: str, bound_s: float) -> dict:
    """Kill one stub of `model`; seconds until not ready, until ready again, and the supervisor's reload time."""
    victim = next(s for s in server_stubs(server.process.pid) if s.model == model)
    os.kill(victim.pid, signal.SIGKILL)
    killed = time.monotonic()
    not_ready_at = None
    while time.monotonic() - killed < bound_s:
        up = ready(server)
        if not up and not_ready_at is None:
            not_ready_at = time.monotonic() - killed
        if up and not_ready_at is not None:
            break
        time.sleep(0.05)
    back = time.monotonic() - killed
    status = server.health_status().models[model]
    return {"model": model, "detected_s": round(not_ready_at or -1, 2),
            "ready_again_s": round(back, 2), "reload_s": status["last_recovery_s"], "restarts": status["restarts"],
            "region_removed": not victim.region_path.exists()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", help="default: every Python-backend model")
    parser.add_argument("--bound", type=float, default=180.0, help="seconds to wait for each recovery")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with EmbeddedTriton(TritonOptions(workspace=args.out / "triton")) as server:
        for model in args.models or sorted(server.health_status().models):
            rows.append(recover(server, model, args.bound))
            logger.info("%s", rows[-1])
    where = machine()
    lines = [f"Recovery after a SIGKILLed stub, {where.get('gpu') or 'CPU'} ({where['cpus']} cores), shipped configs",
             "", "| model | /ready 503 after s | /ready 200 again after s | reload (unload + load) s | region removed |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['detected_s']} | {r['ready_again_s']} | {r['reload_s']} | {r['region_removed']} |"
              for r in rows]
    table = "\n".join(lines) + "\n"
    (args.out / "recovery.md").write_text(table)
    (args.out / "recovery.json").write_text(json.dumps({"machine": where, "rows": rows}, indent=1))
    print(table)
    return 0 if all(r["restarts"] >= 1 and r["region_removed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
