"""Watch a running tritonserver's Python-backend stubs, bring failed models back, and say the truth about health.

Triton does not restart a dead stub: on 2.51 every request to its model then fails with "Stub
process ... is not healthy" while /v2/health/ready stays 200; from 26.01 model readiness turns
false (26.04: server readiness too) but the model stays broken until someone reloads it. The
supervisor, a thread beside the server:

- every `interval_s` lists the server's stubs (process table) and compares each Python model's
  live stubs with the instances its config declares; a model short of stubs at two checks in a
  row (or reported not ready by Triton while the server runs) has failed;
- recovers it through the repository API with the admin key: unload (its ensembles unload with
  it, so Triton's strict readiness reports not ready meanwhile) and load again, removing the dead
  stubs' /dev/shm regions; a model that will not load is retried with a growing delay;
- narrows every stub region to mode 0600 as soon as it sees it;
- reclaims the system shared-memory registrations of clients that died (registrations.py);
- answers `status()` for the launcher's health endpoint: ready only while the server is ready
  and every model serves.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import psutil
import tritonclient.http as httpclient

from tandem_serve.servers.health import HealthStatus
from tandem_serve.triton.keys import TritonKeys
from tandem_serve.triton.registrations import StaleRegions
from tandem_serve.triton.stubs import Stub, protect_region, server_stubs, shm_file, unlink_region

logger = logging.getLogger(__name__)


@dataclass
class SupervisorOptions:
    """How often to look, how long a reload may take, whether to reclaim dead clients' registrations."""

    interval_s: float = 0.5
    reload_timeout_s: float = 600.0  # a GPU encoder captures its CUDA graphs again while loading
    retry_delays_s: tuple[float, ...] = (1.0, 5.0, 15.0, 60.0)  # between failed reloads; the last repeats
    reclaim_shm: bool = True
    reclaim_interval_s: float = 5.0


@dataclass
class ModelHealth:
    """One Python-backend model as the supervisor sees it."""

    state: str = "serving"  # serving | recovering | failed
    instances: int = 0  # stubs its config declares
    alive: int = 0  # stubs seen at the last check
    restarts: int = 0
    last_failure: str = ""
    last_recovery_s: float | None = None
    retry_at: float = 0.0
    attempts: int = 0
    config: dict[str, Any] = field(default_factory=dict, repr=False)  # the config it last loaded with


@dataclass
class SupervisorCounters:
    """What the supervisor did since it started (reported under /status's `detail`)."""

    reclaimed_registrations: int = 0
    removed_stub_regions: int = 0
    protected_regions: int = 0


def declared_instances(config: dict[str, Any]) -> int:
    """Stub processes a model config (Triton's JSON, KIND_AUTO resolved) starts: count x GPUs for KIND_GPU."""
    total = 0
    for group in config.get("instance_group", []):
        count = int(group.get("count", 1))
        gpus = group.get("gpus") or []
        total += count * max(1, len(gpus)) if group.get("kind") == "KIND_GPU" else count
    return total


def refused_entries(refused: dict[str, str]) -> tuple[dict[str, dict[str, str]], str]:
    """The health endpoint's view of models refused at load: their /status entries and the reason's words."""
    models = {name: {"state": "refused", "last_failure": why} for name, why in sorted(refused.items())}
    return models, f"refused at load: {', '.join(sorted(refused))}"


class TritonSupervisor:
    """Use `start()` once the server is ready, `stop()` before stopping the server; `status()` from any thread."""

    def __init__(self, server_pid: int, http_url: str, keys: TritonKeys, options: SupervisorOptions | None = None,
                 refused: dict[str, str] | None = None):
        self.server_pid = server_pid
        self.refused = dict(refused or {})  # models that failed to load at start: shown, not reloaded, not waited for
        self.http_url = http_url
        self.keys = keys
        self.options = options or SupervisorOptions()
        self.models: dict[str, ModelHealth] = {}
        self.counters = SupervisorCounters()
        self._triton_ready = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._regions: dict[int, str] = {}  # stub pid -> its region, for every stub seen alive
        self._short: dict[str, int] = defaultdict(int)  # model -> consecutive checks short of stubs
        self._stale = StaleRegions()
        self._next_reclaim = 0.0
        # checks must not hang on a stuck server; a reload may take minutes (CUDA graphs are captured again)
        self._client = httpclient.InferenceServerClient(http_url, connection_timeout=5.0, network_timeout=10.0)
        self._loader = httpclient.InferenceServerClient(http_url, connection_timeout=5.0,
                                                        network_timeout=self.options.reload_timeout_s)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "TritonSupervisor":
        """Learn the models and their stubs (the server must be ready), then watch from a daemon thread."""
        self._learn_models()
        self.check_once()
        self._thread = threading.Thread(target=self._run, name="tandem-supervisor", daemon=True)
        self._thread.start()
        logger.info("supervising %d Python-backend model(s): %s", len(self.models), ", ".join(sorted(self.models)))
        return self

    def stop(self) -> None:
        """Stop watching; a reload in progress is abandoned (the server is about to stop)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        self._client.close()
        self._loader.close()

    def _run(self) -> None:
        while not self._stop.wait(self.options.interval_s):
            try:
                self.check_once()
            except Exception:  # noqa: BLE001 - the watcher must outlive one bad check
                logger.exception("supervisor check failed")

    # -- what it reports -------------------------------------------------------------------------
    def server_alive(self) -> bool:
        try:
            return psutil.Process(self.server_pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def status(self) -> HealthStatus:
        """Live while the server process runs; ready while Triton is ready and every model serves."""
        live = self.server_alive()
        with self._lock:
            models = {name: {"state": m.state, "instances": m.instances, "alive": m.alive, "restarts": m.restarts,
                             "last_failure": m.last_failure, "last_recovery_s": m.last_recovery_s}
                      for name, m in sorted(self.models.items())}
            triton_ready = self._triton_ready
        broken = [name for name, m in models.items() if m["state"] != "serving"]
        # Triton's strict readiness stays false while a model is refused; the check then asks each model instead
        triton_ready = triton_ready or bool(self.refused)
        reason = ("tritonserver is not running" if not live else
                  f"not serving: {', '.join(broken)}" if broken else
                  "" if triton_ready else "tritonserver reports not ready")
        if self.refused:
            refused, why = refused_entries(self.refused)
            reason = "; ".join(filter(None, [reason, why]))
            models.update(refused)
        return HealthStatus(live=live, ready=live and triton_ready and not broken, server="tritonserver",
                            models=models, reason=reason, detail=asdict(self.counters))

    def regions(self) -> set[str]:
        """The /dev/shm regions of the stubs seen alive at the last check (to remove after the server stops)."""
        return set(self._regions.values())

    def unclean(self) -> bool:
        """Whether stopping may hang on a dead stub: a model is short of stubs now, or one was reloaded (Triton
        2.51 keeps unloading the old version, waiting on its dead stub, and waits for that at shutdown)."""
        with self._lock:
            return any(m.alive < m.instances or m.restarts for m in self.models.values())

    # -- the check ----------------------------------------------------------------------------------
    def _learn_models(self) -> None:
        index = self._client.get_model_repository_index(headers=self.keys.admin_headers("http"))
        for entry in index:
            if entry.get("state") != "READY":
                continue
            config = self._client.get_model_config(entry["name"])
            if config.get("backend") != "python":
                continue  # ensembles have no stubs; other backends are not watched
            self.models[entry["name"]] = ModelHealth(instances=declared_instances(config), config=config)

    def check_once(self) -> None:
        """One look at the stubs; recover what failed (blocking this thread while it reloads)."""
        if not self.server_alive():
            with self._lock:
                self._triton_ready = False
            return
        stubs = server_stubs(self.server_pid)
        by_model: dict[str, list[Stub]] = defaultdict(list)
        for stub in stubs:
            by_model[stub.model].append(stub)
            if stub.pid not in self._regions:
                self._regions[stub.pid] = stub.region
                if protect_region(stub):
                    self.counters.protected_regions += 1
        self._forget_dead_stubs({s.pid for s in stubs})
        ready = self._ask(self._client.is_server_ready, default=False)
        with self._lock:
            self._triton_ready = ready
        for name, health in list(self.models.items()):
            alive = len(by_model.get(name, []))
            with self._lock:
                health.alive = alive
            if health.state == "failed" and time.monotonic() < health.retry_at:
                continue
            short = alive < health.instances
            not_ready = not short and not ready and not self._ask(lambda: self._client.is_model_ready(name), True)
            self._short[name] = self._short[name] + 1 if (short or not_ready) else 0
            if self._short[name] >= 2 or health.state == "failed":
                why = (f"{health.instances - alive} of {health.instances} stub(s) gone" if short
                       else "Triton reports it not ready" if not_ready else health.last_failure)
                self._recover(name, health, why)
        if self.options.reclaim_shm and time.monotonic() >= self._next_reclaim:
            self._next_reclaim = time.monotonic() + self.options.reclaim_interval_s
            self._reclaim_registrations()

    @staticmethod
    def _ask(call: Callable[[], Any], default: Any) -> Any:
        """`call()`, or `default` when the server does not answer."""
        try:
            return call()
        except Exception:  # noqa: BLE001 - an unreachable server is an answer too
            return default

    def _forget_dead_stubs(self, alive: set[int]) -> None:
        """Remove the regions of stubs that are gone (a SIGKILLed stub leaves its region behind)."""
        for pid in [p for p in self._regions if p not in alive]:
            region = self._regions.pop(pid)
            if unlink_region(region):
                self.counters.removed_stub_regions += 1
                logger.info("removed the shared-memory region of the gone stub %d", pid)

    # -- recovery -------------------------------------------------------------------------------------
    def _recover(self, name: str, health: ModelHealth, why: str) -> None:
        started = time.monotonic()
        with self._lock:
            health.state, health.last_failure = "recovering", why
        logger.warning("model %s failed (%s): reloading it", name, why)
        headers = self.keys.admin_headers("http")
        try:
            # reload with the config it ran with (it may differ from config.pbtxt: `tandem tune` loads overrides);
            # a model whose earlier reload failed is unloaded and has no config to ask for any more
            config = self._ask(lambda: self._client.get_model_config(name), None) or health.config
            self._loader.unload_model(name, headers=headers)
            self._loader.load_model(name, headers=headers, config=json.dumps(config))
            config = self._client.get_model_config(name)
            instances = declared_instances(config)
            if not self._client.is_model_ready(name):
                raise RuntimeError("loaded, but Triton reports it not ready")
        except Exception as exc:  # noqa: BLE001 - a failed reload is retried, and reported meanwhile
            delays = self.options.retry_delays_s
            delay = delays[min(health.attempts, len(delays) - 1)]
            with self._lock:
                health.state, health.attempts = "failed", health.attempts + 1
                health.last_failure = f"{why}; reload failed: {str(exc)[:300]}"
                health.retry_at = time.monotonic() + delay
            logger.error("reloading model %s failed (attempt %d, next in %.0f s): %s", name, health.attempts, delay, exc)
            return
        took = time.monotonic() - started
        alive = sum(1 for stub in server_stubs(self.server_pid) if stub.model == name)
        with self._lock:
            health.state, health.instances, health.attempts, health.config = "serving", instances, 0, config
            health.alive = alive
            health.restarts += 1
            health.last_recovery_s = round(took, 3)
        self._short[name] = 0
        logger.warning("model %s serves again after %.1f s (restart %d)", name, took, health.restarts)

    # -- client registrations -------------------------------------------------------------------------
    def _reclaim_registrations(self) -> None:
        headers = self.keys.shm_headers("http")
        registered = self._ask(lambda: self._client.get_system_shared_memory_status(headers=headers), None)
        if not registered:
            return
        for region in self._stale.check(registered, self.server_pid):
            try:
                self._client.unregister_system_shared_memory(region["name"], headers=headers)
            except Exception as exc:  # noqa: BLE001 - in use by a request right now: next time
                logger.debug("could not unregister %s: %s", region["name"], exc)
                continue
            self.counters.reclaimed_registrations += 1
            try:
                shm_file(region["key"]).unlink(missing_ok=True)  # its creator is gone; nobody maps it
            except OSError as exc:  # another user's file in the sticky /dev/shm
                logger.debug("could not remove %s: %s", region["key"], exc)
            logger.warning("reclaimed the shared-memory registration %r of a client that is gone", region["name"])
