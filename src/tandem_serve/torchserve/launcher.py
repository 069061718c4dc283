"""Start a real TorchServe (the `torchserve` wheel's Java frontend) on a model store, safely configured.

Every address (REST inference/management/metrics and gRPC) binds 127.0.0.1 unless told
otherwise (another address logs a warning), token authorization stays on (clients read the
generated key file), the model management API stays off (models load from the store at start
only), `allowed_urls` admits nothing but the store, and metrics are in Prometheus format. Java and
its workers run with umask 077 in a workspace of mode 0700: config.properties, the key file, logs,
and TorchServe's temporary files (its pid file, worker sockets, extracted archives).
TorchServe's /ping needs the inference token; the launcher's health endpoint (/live, /ready,
/status; `health.py`) answers probes without one. Use `EmbeddedTorchServe` as a context manager.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tandem_serve.servers.health import HealthServer, HealthStatus
from tandem_serve.servers.processes import (
    client_host,
    free_ports,
    is_loopback,
    kill_process_group,
    log_tail,
    process_group_members,
)
from tandem_serve.servers.server_process import ServerProcess

logger = logging.getLogger(__name__)
KEY_FILE = "key_file.json"


class TorchServeStartError(RuntimeError):
    """TorchServe is missing a requirement or did not become ready; the message says which."""


@dataclass
class TorchServeOptions:
    """How to start TorchServe."""

    model_store: Path
    models: list[str] = field(default_factory=lambda: ["all"])  # archive names in the store, or "all"
    host: str = "127.0.0.1"  # inference and metrics
    # The management API (REST and gRPC) binds apart: loopback even when `host` exposes inference (an image).
    management_host: str = "127.0.0.1"
    inference_port: int = 0  # 0: a free port
    management_port: int = 0
    metrics_port: int = 0
    grpc_inference_port: int = 0
    grpc_management_port: int = 0
    workspace: Path | None = None  # kept after stop when given; else a temporary directory
    startup_timeout_s: float = 300.0
    stop_timeout_s: float = 30.0
    token_expiration_min: int = 60  # TorchServe's default; the key file is rewritten on renewal
    health_port: int | None = 0  # the launcher's health endpoint (0: a free port; None: none)
    # log4j's asynchronous loggers: the frontend writes an access-log line per request (to three appenders in
    # TorchServe's own log4j2.xml) without waiting on the files; lines may reach them a moment later
    async_logging: bool = True
    job_queue_size: int = 100  # requests queued per model before TorchServe answers 503 (its own default)
    extra_properties: dict[str, str] = field(default_factory=dict)


def check_requirements() -> str:
    """The java executable to use; raise TorchServeStartError naming what is missing."""
    missing = [name for name, module in (("torchserve", "ts"), ("pyyaml", "yaml"), ("torch-model-archiver", "model_archiver"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise TorchServeStartError(f"missing Python package(s) {missing}: pip install 'tandem-serve[torchserve]' "
                                   "(TorchServe workers die without pyyaml)")
    return find_java()


def find_java() -> str:
    """The java executable ($JAVA_HOME/bin/java, else on PATH), version 11 or newer; else TorchServeStartError."""
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java or not Path(java).exists():
        raise TorchServeStartError("Java not found: TorchServe's frontend needs a JDK 11+ "
                                   "(e.g. apt install openjdk-17-jre-headless) on PATH or in JAVA_HOME")
    version = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    match = re.search(r'version "(\d+)', version)
    if match and int(match.group(1)) < 11:
        raise TorchServeStartError(f"TorchServe needs Java 11+, found: {version.splitlines()[0]}")
    return java


class EmbeddedTorchServe(ServerProcess):
    """A running TorchServe; `with EmbeddedTorchServe(options) as server: server.inference_url ...`."""

    name = "TorchServe"
    start_error = TorchServeStartError

    def __init__(self, options: TorchServeOptions):
        self.options = options
        super().__init__(options.workspace, "tandem-torchserve-")
        self.log_path = self.workspace / "torchserve.log"
        self.host = options.host
        reach = client_host(self.host)
        given = {name: getattr(options, f"{name}_port")
                 for name in ("inference", "management", "metrics", "grpc_inference", "grpc_management")}
        picked = iter(free_ports(list(given.values()).count(0), reach, taken=[p for p in given.values() if p]))
        self.ports = {name: port or next(picked) for name, port in given.items()}
        self.health: HealthServer | None = None

    @property
    def inference_url(self) -> str:
        return f"http://{client_host(self.host)}:{self.ports['inference']}"

    @property
    def management_url(self) -> str:
        return f"http://{client_host(self.options.management_host)}:{self.ports['management']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{client_host(self.host)}:{self.ports['metrics']}"

    @property
    def health_url(self) -> str | None:
        return None if self.health is None else f"http://{client_host(self.host)}:{self.health.port}"

    @property
    def key_file(self) -> Path:
        return self.workspace / KEY_FILE

    def key(self, kind: str = "inference") -> str:
        """The current token of `kind` (inference or management) from the generated key file."""
        return read_key(self.key_file, kind)

    def properties(self) -> dict[str, str]:
        """config.properties as written for this run."""
        store = Path(self.options.model_store).resolve()
        return {
            "inference_address": f"http://{self.host}:{self.ports['inference']}",
            "management_address": f"http://{self.options.management_host}:{self.ports['management']}",
            "metrics_address": f"http://{self.host}:{self.ports['metrics']}",
            "grpc_inference_address": self.host,
            "grpc_inference_port": str(self.ports["grpc_inference"]),
            "grpc_management_address": self.options.management_host,
            "grpc_management_port": str(self.ports["grpc_management"]),
            "model_store": str(store),
            "enable_model_api": "false",
            "disable_token_authorization": "false",
            "token_expiration_min": str(self.options.token_expiration_min),
            "allowed_urls": "file://" + re.escape(str(store)) + "/.*",
            "enable_envvars_config": "false",
            "install_py_dep_per_model": "false",
            "disable_system_metrics": "true",
            "async_logging": str(self.options.async_logging).lower(),
            "job_queue_size": str(self.options.job_queue_size),
            "metrics_mode": "prometheus",  # /metrics on the metrics address, for scrapers (no token needed there)
            "initial_worker_port": str(20000 + os.getpid() % 20000),  # worker sockets differ between runs
            **self.options.extra_properties,
        }

    def command(self, java: str = "java") -> list[str]:
        """The Java frontend's command line, as `torchserve --start` builds it, but started by us directly so
        that it dies with this process (PR_SET_PDEATHSIG) even when this process is killed."""
        import ts

        home = Path(ts.__file__).resolve().parents[1]
        return [java, f"-Dmodel_server_home={home}", f"-Djava.io.tmpdir={self.workspace / 'tmp'}",
                "-cp", f".:{home / 'ts' / 'frontend' / '*'}", "org.pytorch.serve.ModelServer",
                "--python", sys.executable, "-f", str(self.workspace / "config.properties"),
                "-s", str(Path(self.options.model_store).resolve()), "-ncs", "-m", *self.options.models]

    def start(self) -> "EmbeddedTorchServe":
        """Start TorchServe and wait until every model has a ready worker; raise TorchServeStartError with the log."""
        java = check_requirements()
        if not Path(self.options.model_store).is_dir():
            raise TorchServeStartError(f"model store {self.options.model_store} does not exist (build it with `tandem archive`)")
        missing = missing_models(Path(self.options.model_store), self.options.models)
        if missing:
            raise TorchServeStartError(f"not in the model store {self.options.model_store}: {', '.join(missing)} "
                                       "(an archive is named with its .mar, a directory archive without)")
        if self.options.job_queue_size < 1:
            raise TorchServeStartError(f"job_queue_size must be >= 1, got {self.options.job_queue_size}")
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.workspace.chmod(0o700)
        temp = self.workspace / "tmp"
        temp.mkdir(parents=True, exist_ok=True)
        if not is_loopback(self.host):
            logger.warning("TorchServe binds %s: reachable from other hosts (every API needs a token from %s)",
                           self.host, self.key_file)
        if not is_loopback(self.options.management_host):
            logger.warning("TorchServe's management API binds %s: reachable from other hosts (its token is in %s)",
                           self.options.management_host, self.key_file)
        (self.workspace / "config.properties").write_text("".join(f"{k}={v}\n" for k, v in self.properties().items()))
        env = dict(os.environ, TEMP=str(temp), TMPDIR=str(temp), LOG_LOCATION=str(self.workspace / "logs"),
                   METRICS_LOCATION=str(self.workspace / "logs"), JAVA_HOME=str(Path(java).resolve().parents[1]))
        env.pop("TS_CONFIG_FILE", None)
        self._spawn(self.command(java), env, self.log_path, cwd=self.workspace)
        try:
            self._wait_ready()
            if self.options.health_port is not None:
                self.health = HealthServer(self.health_status, self.host, self.options.health_port).start()
        except BaseException:
            self.stop()
            raise
        logger.info("TorchServe ready: inference %s, management %s%s; tokens in %s", self.inference_url,
                    self.management_url, f", health {self.health_url}" if self.health else "", self.key_file)
        return self

    def health_status(self) -> HealthStatus:
        """Live while Java runs; ready while /ping says Healthy and every model has a READY worker."""
        live = self.is_alive()
        models: dict[str, dict] = {}
        reason = "" if live else "TorchServe is not running"
        try:
            ping = self._get(f"{self.inference_url}/ping", "inference")
            for model in self._get(f"{self.management_url}/models", "management")["models"]:  # type: ignore[index]
                workers = self._get(f"{self.management_url}/models/{model['modelName']}", "management")[0]["workers"]  # type: ignore[index]
                states = [w.get("status") for w in workers]
                models[model["modelName"]] = {"workers": len(states), "ready": states.count("READY"), "states": states}
            healthy = ping.get("status") == "Healthy"  # type: ignore[union-attr]
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError, KeyError, IndexError, TypeError,
                FileNotFoundError) as exc:
            healthy, reason = False, reason or f"TorchServe did not answer: {exc}"
        # a model serves while one worker is READY (TorchServe routes around a restarting one); /status shows the rest
        broken = sorted(name for name, m in models.items() if not m["ready"])
        if live and not reason:
            reason = "" if healthy and not broken else f"no ready worker: {', '.join(broken)}" if broken else "ping failed"
        return HealthStatus(live=live, ready=live and healthy and bool(models) and not broken, server="torchserve",
                            models=models, reason=reason)

    def _get(self, url: str, kind: str) -> object:
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.key(kind)}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def _wait_ready(self) -> None:
        self._wait_until(lambda: self.key_file.is_file() and self.health_status().ready, self.options.startup_timeout_s, ())

    def log_tail(self, lines: int = 60) -> str:
        """The frontend's log and the model workers' log, last lines of each."""
        return "\n".join(log_tail(p, lines) for p in (self.log_path, self.workspace / "logs" / "model_log.log"))

    def stop(self) -> None:
        """SIGTERM to the whole group (Java stops its workers), SIGKILL after stop_timeout_s; drop a temporary workspace."""
        if self.health is not None:
            self.health.stop()
            self.health = None
        process, self.process = self.process, None
        if process is None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + self.options.stop_timeout_s
        while process_group_members(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        kill_process_group(process.pid, "torchserve")
        process.wait()
        self._drop_workspace()


def missing_models(store: Path, models: list[str]) -> list[str]:
    """The entries of TorchServe's `-m` list (`all`, `NAME.mar`, a directory, `NAME=FILE`) with nothing of that name in
    `store`: TorchServe would log ModelNotFoundException and never become ready."""
    missing = []
    for model in models:
        target = model.split("=", 1)[-1]
        if model != "all" and "://" not in target and not (store / target).exists():
            missing.append(model)
    return missing


def read_key(key_file: Path, kind: str = "inference") -> str:
    """A token from TorchServe's key_file.json; a clear error when the file is missing or malformed."""
    try:
        return json.loads(Path(key_file).read_text())[kind]["key"]
    except OSError as exc:
        raise FileNotFoundError(f"cannot read TorchServe's key file {key_file}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{key_file} holds no {kind} key") from None
