"""Soak the supervised embedded Triton: many requests at a fixed concurrency, memory and shared memory watched.

Per run (an ensemble, over the wire or through system shared memory): N requests by C closed-loop
clients (the project's asyncio load generator, `TritonSender`), and every `--interval` seconds the
completed requests, errors, the RSS of tritonserver and of its stubs, /dev/shm's tandem and stub
files (the stubs' regions apart from the clients'), and the server's shared-memory registrations. It reports, per run: errors, throughput per
interval (min / max / coefficient of variation), RSS growth after warm-up (the first interval
after `--warm-up` of the requests), /dev/shm and registrations before vs after, and the
supervisor's restarts. A table (markdown) and JSON.

    python bench/soak.py --requests 100000 --concurrency 16 --out results/soak      # the GPU machine
    python bench/soak.py --requests 10000 --detection-requests 1000 --out soak     # CPU, CI-sized
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import tritonclient.grpc as grpcclient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from tandem_serve.loadgen import TritonSender  # noqa: E402
from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions  # noqa: E402
from tandem_serve.triton.stubs import SHM_DIR, server_stubs  # noqa: E402
from tandem_serve.workloads import OUTPUTS, ensemble_requests, pipeline_of  # noqa: E402

logger = logging.getLogger("soak")
CLIENT_PREFIX = "tandem"  # the project's clients' regions (ShmPool's default prefix)


@dataclass
class Sample:
    """One interval's look at the server."""

    at_s: float
    completed: int
    errors: int
    server_rss_mb: float
    stubs_rss_mb: float
    dev_shm_mb: float
    registrations: int


@dataclass
class SoakRun:
    """One ensemble over one transport."""

    ensemble: str
    shm: str
    requests: int
    concurrency: int
    completed: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    dev_shm_before_mb: float = 0.0  # the stubs' regions
    dev_shm_after_mb: float = 0.0
    client_shm_before_mb: float = 0.0  # the load generator's regions (removed when it closes)
    client_shm_after_mb: float = 0.0
    registrations_before: int = 0
    registrations_after: int = 0
    restarts: int = 0

    def summary(self, warm_up: float) -> dict:
        """Throughput per interval and RSS growth from the first sample after warm-up to the last."""
        rates = [(b.completed - a.completed) / (b.at_s - a.at_s) for a, b in zip(self.samples, self.samples[1:])
                 if b.at_s > a.at_s]
        warm = next((s for s in self.samples if s.completed >= warm_up * self.requests), self.samples[0])
        last = self.samples[-1]

        def growth(before: float, after: float) -> float:
            return round(100 * (after - before) / before, 2) if before else 0.0

        return {
            "throughput": round(self.completed / self.seconds, 1) if self.seconds else 0.0,
            "interval_min": round(min(rates), 1) if rates else 0.0,
            "interval_max": round(max(rates), 1) if rates else 0.0,
            "interval_cv": round(statistics.pstdev(rates) / statistics.mean(rates), 3) if len(rates) > 1 else 0.0,
            "server_rss_mb": [warm.server_rss_mb, last.server_rss_mb],
            "server_rss_growth_pct": growth(warm.server_rss_mb, last.server_rss_mb),
            "stubs_rss_mb": [warm.stubs_rss_mb, last.stubs_rss_mb],
            "stubs_rss_growth_pct": growth(warm.stubs_rss_mb, last.stubs_rss_mb),
            "dev_shm_after_warm_up_mb": warm.dev_shm_mb,  # the stubs' pools grow to their working size, then stay
            "registrations_after_warm_up": warm.registrations,
        }


def client_shm_mb() -> float:
    """MiB in the load generator's /dev/shm regions (the project's clients name theirs tandem-...)."""
    return sum(_size(entry) for entry in SHM_DIR.iterdir() if entry.name.startswith(CLIENT_PREFIX)) / 2**20


def stub_shm_mb(server: EmbeddedTriton) -> float:
    """MiB in the /dev/shm regions of this server's stubs (other servers on the machine are not counted)."""
    return sum(_size(stub.region_path) for stub in server_stubs(server.process.pid)) / 2**20


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def rss_mb(server: EmbeddedTriton) -> tuple[float, float]:
    """RSS of tritonserver and the sum over its stubs, MiB."""
    def one(pid: int) -> float:
        try:
            return psutil.Process(pid).memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            return 0.0

    return one(server.process.pid), sum(one(s.pid) for s in server_stubs(server.process.pid))


def registrations(server: EmbeddedTriton) -> int:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        return len(client.get_system_shared_memory_status(headers=server.keys.shm_headers("grpc")).regions)
    finally:
        client.close()


async def soak(server: EmbeddedTriton, ensemble: str, shm: str, requests: int, concurrency: int,
               interval_s: float) -> SoakRun:
    """Send `requests` requests from `concurrency` closed-loop clients, sampling every `interval_s`."""
    run = SoakRun(ensemble, shm, requests, concurrency, dev_shm_before_mb=stub_shm_mb(server),
                  client_shm_before_mb=client_shm_mb(), registrations_before=registrations(server))
    restarts_before = sum(m["restarts"] for m in server.health_status().models.values())
    payloads = ensemble_requests(ensemble, 64, seed=11)
    url = server.grpc_url
    next_index = 0
    lock = asyncio.Lock()

    async with TritonSender(url, "grpc", ensemble, payloads, OUTPUTS[pipeline_of(ensemble)], shm=shm,
                            slots=concurrency, timeout_s=60.0, shm_key=server.keys.shm) as send:
        async def client() -> None:
            nonlocal next_index
            while True:
                async with lock:
                    if next_index >= requests:
                        return
                    index, next_index = next_index, next_index + 1
                try:
                    await send(index)
                    run.completed += 1
                except Exception as exc:  # noqa: BLE001 - counted by kind, the soak goes on
                    run.errors += 1
                    kind = str(exc)[:120]
                    run.error_kinds[kind] = run.error_kinds.get(kind, 0) + 1

        async def sampler(start: float) -> None:
            while True:
                server_rss, stubs_rss = await asyncio.to_thread(rss_mb, server)
                run.samples.append(Sample(round(time.monotonic() - start, 2), run.completed, run.errors,
                                          round(server_rss, 1), round(stubs_rss, 1), round(stub_shm_mb(server), 2),
                                          await asyncio.to_thread(registrations, server)))
                logger.info("%s/%s: %d/%d done, %d errors, tritonserver %.0f MiB, stubs %.0f MiB", ensemble, shm,
                            run.completed, requests, run.errors, server_rss, stubs_rss)
                await asyncio.sleep(interval_s)

        start = time.monotonic()
        watcher = asyncio.create_task(sampler(start))
        await asyncio.gather(*(client() for _ in range(concurrency)))
        run.seconds = time.monotonic() - start
        watcher.cancel()
        server_rss, stubs_rss = rss_mb(server)
        run.samples.append(Sample(round(run.seconds, 2), run.completed, run.errors, round(server_rss, 1),
                                  round(stubs_rss, 1), round(stub_shm_mb(server), 2), registrations(server)))
    run.dev_shm_after_mb = stub_shm_mb(server)
    run.client_shm_after_mb = client_shm_mb()
    run.registrations_after = registrations(server)
    run.restarts = sum(m["restarts"] for m in server.health_status().models.values()) - restarts_before
    return run


def markdown(runs: list[SoakRun], warm_up: float, where: dict) -> str:
    lines = [f"Soak on {where.get('gpu') or 'CPU'} ({where['cpus']} cores, {where['host']}), "
             f"concurrency {runs[0].concurrency}, RSS growth from the first sample after {warm_up:.0%} of the requests",
             "",
             "| ensemble | transport | requests | errors | req/s | per interval min / max (CV) | tritonserver RSS MiB "
             "(growth) | stubs RSS MiB (growth) | stub regions MiB before / warm / after | client regions MiB before / "
             "after | registrations before / during / after | restarts |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        s = run.summary(warm_up)
        lines.append(
            f"| {run.ensemble} | {'wire' if run.shm == 'none' else run.shm + ' shm'} | {run.completed + run.errors} | "
            f"{run.errors} | {s['throughput']} | {s['interval_min']} / {s['interval_max']} ({s['interval_cv']}) | "
            f"{s['server_rss_mb'][0]:.0f} -> {s['server_rss_mb'][1]:.0f} ({s['server_rss_growth_pct']:+.1f} %) | "
            f"{s['stubs_rss_mb'][0]:.0f} -> {s['stubs_rss_mb'][1]:.0f} ({s['stubs_rss_growth_pct']:+.1f} %) | "
            f"{run.dev_shm_before_mb:.1f} / {s['dev_shm_after_warm_up_mb']:.1f} / {run.dev_shm_after_mb:.1f} | "
            f"{run.client_shm_before_mb:.1f} / {run.client_shm_after_mb:.1f} | "
            f"{run.registrations_before} / {s['registrations_after_warm_up']} / {run.registrations_after} | {run.restarts} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000, help="per text run")
    parser.add_argument("--detection-requests", type=int, help="per detection run (default --requests)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--warm-up", type=float, default=0.05, help="share of the requests before the RSS baseline")
    parser.add_argument("--prime", type=int, default=0,
                        help="requests sent per ensemble before its measured runs (not recorded): the server's pools "
                             "and allocators reach their working size first")
    parser.add_argument("--ensembles", nargs="+", default=["text_embedding_fused", "object_detection"])
    parser.add_argument("--shm", nargs="+", default=["none", "system"], choices=["none", "system", "cuda"])
    parser.add_argument("--model-repository", action="append", type=Path, default=[])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    where = machine()
    runs = []
    with EmbeddedTriton(TritonOptions(model_repositories=args.model_repository, workspace=args.out / "triton")) as server:
        for ensemble in args.ensembles:
            count = args.detection_requests or args.requests if pipeline_of(ensemble) == "detection" else args.requests
            if args.prime:
                primed = asyncio.run(soak(server, ensemble, "none", args.prime, args.concurrency, args.interval))
                logger.info("primed %s with %d requests (%d errors)", ensemble, primed.completed, primed.errors)
            for shm in args.shm:
                run = asyncio.run(soak(server, ensemble, shm, count, args.concurrency, args.interval))
                runs.append(run)
                logger.info("%s", markdown([run], args.warm_up, where).splitlines()[-1])
    table = markdown(runs, args.warm_up, where)
    (args.out / "soak.md").write_text(table)
    (args.out / "soak.json").write_text(json.dumps({
        "machine": where, "warm_up": args.warm_up,
        "runs": [{**asdict(run), "summary": run.summary(args.warm_up)} for run in runs]}, indent=1))
    print(table)
    return 0 if all(r.errors == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
