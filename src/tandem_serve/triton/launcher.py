"""Start the `tritonserver` binary of the nvidia-pytriton wheel on our model repositories, supervised.

The server gets a per-run workspace holding the Python backend with the stub built for the
running interpreter, and an environment (PYTHONPATH, LD_LIBRARY_PATH) in which the stubs import
this interpreter's packages. Safe defaults:
- it binds 127.0.0.1 (another address logs a warning);
- the model-repository, logging and trace APIs need the admin key, the shared-memory API its
  own key (`keys.py`; both in `<workspace>/keys.json`, mode 0600), and the keys are wiped from
  the server's command line once it has parsed them (/proc/<pid>/cmdline is readable by every
  local user);
- the server and its stubs run with umask 077, and the supervisor narrows the stubs' /dev/shm
  regions (created 0644 by Triton) to 0600;
- model control is explicit but behind the admin key: the supervisor (`supervisor.py`) reloads a
  model whose stub died, and the launcher's health endpoint (/live, /ready, /status) says so.
Use `EmbeddedTriton` as a context manager.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tandem_serve.paths import default_repositories
from tandem_serve.servers.health import HealthServer, HealthStatus
from tandem_serve.servers.processes import (
    client_host,
    free_ports,
    is_loopback,
    kill_process_group,
    log_tail,
    process_group_members,
    scrub_arguments,
    stop_process,
)
from tandem_serve.servers.server_process import ServerProcess
from tandem_serve.triton.keys import KEYS_FILE, TritonKeys
from tandem_serve.triton.queue_policy import warn_about_queue_policies
from tandem_serve.triton.stubs import Stub, all_stubs, kill_stubs, orphaned_stubs, unlink_region
from tandem_serve.triton.supervisor import SupervisorOptions, TritonSupervisor, refused_entries

logger = logging.getLogger(__name__)

STUB_PATH_ENV = "TANDEM_STUB_PYTHONPATH"
TRITON_LOG_LINE = re.compile(rb"(^|\n)[IWE]\d{4} \d\d:\d\d:\d\d\.\d+ ")  # Triton's own log format
DEAD_STUB_GRACE_S = 5.0  # stop waits this long, not stop_timeout_s, after a stub died (Triton would wait on it)


class TritonStartError(RuntimeError):
    """The server did not become ready; the message holds the tail of its log."""


def _paths_from_env(name: str) -> list[Path]:
    return [Path(p) for p in os.environ.get(name, "").split(os.pathsep) if p]


@dataclass
class TritonOptions:
    """How to start the embedded server."""

    model_repositories: list[Path] = field(default_factory=list)  # empty: the project's two
    host: str = "127.0.0.1"
    http_port: int = 0  # 0: a free port
    grpc_port: int = 0
    metrics_port: int = 0
    health_port: int | None = 0  # the launcher's health endpoint (0: a free port; None: none)
    startup_timeout_s: float = 300.0
    stop_timeout_s: float = 45.0
    log_verbose: int = 0
    workspace: Path | None = None  # kept after stop when given; else a temporary directory
    # Directories put first on the stubs' sys.path only (e.g. one holding numpy<2 when the
    # launching environment has numpy 2, which this stub build cannot use for TYPE_STRING).
    stub_python_path: list[Path] = field(default_factory=lambda: _paths_from_env(STUB_PATH_ENV))
    extra_args: list[str] = field(default_factory=list)
    # Reload models whose stubs die, reclaim dead clients' shared-memory registrations (supervisor.py).
    supervise: bool = True
    supervisor: SupervisorOptions = field(default_factory=SupervisorOptions)
    # Explicit model control without supervision (`tandem tune` needs it; supervision implies it).
    # The API stays behind the admin key like the rest of the model-repository API.
    model_control: bool = False
    # An installed server (the directory holding bin/tritonserver and backends/, e.g. /opt/tritonserver in
    # the NGC image); None: nvidia-pytriton's embedded 2.51.
    tritonserver_home: Path | None = None
    # A keys.json to use (e.g. a mounted secret); None: fresh keys each start. Either way the workspace gets a copy.
    keys_file: Path | None = None
    # False (the default): a model that fails to load is refused alone; the others serve, the refusal is logged and
    # shown by the health endpoint. True: any load failure stops the server (tritonserver --exit-on-error).
    exit_on_error: bool = False


EMBEDDED_EXTRA = "pip install 'tandem-serve[embedded]'"


@dataclass(frozen=True)
class TritonDistribution:
    """A tritonserver to run: nvidia-pytriton's embedded 2.51 (the stub for this Python is copied into the
    workspace), or an installed server such as an NGC image's /opt/tritonserver (its backends as they are)."""

    root: Path
    installed: bool = False

    @classmethod
    def find(cls, home: Path | None = None) -> "TritonDistribution":
        """The installed server under `home` when given, else the embedded one; a clear error where it is missing."""
        if home is not None:
            home = Path(home)
            if not (home / "bin" / "tritonserver").is_file():
                raise TritonStartError(f"no bin/tritonserver under {home} (an installed Triton, e.g. /opt/tritonserver)")
            if not (home / "backends" / "python" / "libtriton_python.so").is_file():
                raise TritonStartError(f"{home}/backends/python has no Python backend (libtriton_python.so)")
            return cls(home, installed=True)
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise TritonStartError(f"the embedded Triton is not installed: {EMBEDDED_EXTRA} (nvidia-pytriton 0.7.0), "
                                   "or pass --tritonserver DIR of an installed server such as /opt/tritonserver")
        root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
        if not (root / "bin" / "tritonserver").is_file():
            raise TritonStartError(f"no tritonserver binary under {root}")
        return cls(root)

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def libs(self) -> Path | None:
        return None if self.installed else self.root.parent.parent / "nvidia_pytriton.libs"

    def stub_for(self, version: tuple[int, int]) -> Path:
        stub = self.root / "python_backend_stubs" / f"{version[0]}.{version[1]}" / "triton_python_backend_stub"
        if not stub.is_file():
            available = sorted(p.name for p in (self.root / "python_backend_stubs").iterdir())
            raise TritonStartError(f"no Python-backend stub for Python {version[0]}.{version[1]}; the wheel has {available}")
        return stub

    def has_option(self, option: str, env: dict[str, str]) -> bool:
        """Whether this server's `--help` lists `option` (e.g. --allow-client-shm, new in 26.05)."""
        try:
            result = subprocess.run([str(self.binary), "--help"], env=env, capture_output=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return option.encode() in result.stdout + result.stderr


def read_keys_file(path: Path) -> TritonKeys:
    """Keys from a keys.json such as a mounted secret; warns when other local users can read it."""
    path = Path(path)
    keys = TritonKeys.read(path)
    if path.stat().st_mode & 0o004:
        logger.warning("%s is readable by every local user: mount it with mode 0440 or narrower", path)
    return keys


def stub_environment(dist: TritonDistribution, first: list[Path] | None = None) -> dict[str, str]:
    """The server's environment: stubs see this interpreter's packages and libpython.

    The stub's embedded interpreter ignores PYTHONPATH: `tandem_serve/__init__` adds the
    directories of TANDEM_PYTHONPATH as site directories instead (see `_prepare_workspace`).
    """
    env = dict(os.environ)
    site_dirs = [*map(str, first or []), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path]
    env["TANDEM_PYTHONPATH"] = os.pathsep.join(p for p in dict.fromkeys(site_dirs) if p and Path(p).is_dir())
    lib_path = [str(dist.libs or ""), sysconfig.get_config_var("LIBDIR") or ""]
    if env.get("LD_LIBRARY_PATH"):
        lib_path.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in lib_path if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def is_tandem_stub(stub: Stub) -> bool:
    """Whether a stub runs from a workspace this launcher made (its backend dir holds our keys file)."""
    workspace = stub.executable.parents[2]
    return (workspace / KEYS_FILE).exists() or workspace.name.startswith("tandem-triton-")


def sweep_orphaned_stubs() -> int:
    """Kill the stubs of tandem servers that are gone and remove their regions; returns how many were found."""
    orphans = orphaned_stubs(is_tandem_stub)
    kill_stubs(orphans)
    if orphans:
        logger.warning("removed %d orphaned Python-backend stub(s) left by a killed launcher", len(orphans))
    return len(orphans)


class EmbeddedTriton(ServerProcess):
    """A running tritonserver; `with EmbeddedTriton(options) as server: server.grpc_url ...`."""

    name = "tritonserver"
    start_error = TritonStartError

    def __init__(self, options: TritonOptions | None = None):
        self.options = options or TritonOptions()
        super().__init__(self.options.workspace, "tandem-triton-")
        self.keys = read_keys_file(self.options.keys_file) if self.options.keys_file else TritonKeys.generate()
        self.log_path = self.workspace / "server.log"
        self.host = self.options.host
        given = [self.options.http_port, self.options.grpc_port, self.options.metrics_port]
        picked = iter(free_ports(given.count(0), self._client_host, taken=[p for p in given if p]))
        self.http_port, self.grpc_port, self.metrics_port = (port or next(picked) for port in given)
        self.supervisor: TritonSupervisor | None = None
        self.health: HealthServer | None = None
        self.refused: dict[str, str] = {}  # models that failed to load at start (exit_on_error false): name -> reason

    @property
    def _client_host(self) -> str:
        return client_host(self.host)

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def admin_key(self) -> str:
        return self.keys.admin

    @property
    def keys_file(self) -> Path:
        return self.workspace / KEYS_FILE

    @property
    def health_url(self) -> str | None:
        return None if self.health is None else f"http://{self._client_host}:{self.health.port}"

    def command(self, dist: TritonDistribution, client_shm_flag: bool = False) -> list[str]:
        """The tritonserver command line (`client_shm_flag`: the server has --allow-client-shm, off by default
        since 26.05; the project's clients use system and CUDA shared memory, so it is turned on, keyed)."""
        repositories = self.options.model_repositories or default_repositories()
        explicit = self.options.supervise or self.options.model_control
        restrictions = self.keys.restrictions()
        backends = dist.root / "backends" if dist.installed else self.workspace / "backends"
        return [
            str(dist.binary),
            *[f"--model-repository={Path(r).resolve()}" for r in repositories],
            f"--backend-directory={backends}",
            *(["--allow-client-shm=true"] if client_shm_flag else []),
            *(["--model-control-mode=explicit", "--load-model=*"] if explicit else ["--model-control-mode=none"]),
            "--strict-readiness=true",
            f"--exit-on-error={'true' if self.options.exit_on_error else 'false'}",
            "--exit-timeout-secs=30",  # 10 s was not always enough to unload on the H100
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            *[f"--http-restricted-api={r}" for r in restrictions],
            *[f"--grpc-restricted-protocol={r}" for r in restrictions],
            f"--log-verbose={self.options.log_verbose}",
            *self.options.extra_args,
        ]

    def _prepare_workspace(self, dist: TritonDistribution) -> None:
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.workspace.chmod(0o700)  # the log may hold request data at high verbosity; the keys live here
        self.keys.write(self.keys_file)
        if dist.installed:  # its own backends and stub, built for the image's Python with this package installed
            return
        backend = self.workspace / "backends" / "python"
        backend.mkdir(parents=True, exist_ok=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            target = backend / name
            if not target.exists():
                target.symlink_to(dist.root / "backends" / "python" / name)
        # copied beside and renamed over: a kept workspace's old stub may still be exiting, and writing into a
        # running executable fails (ETXTBSY) where replacing its directory entry does not
        staged = backend / "triton_python_backend_stub.new"
        shutil.copy2(dist.stub_for(sys.version_info[:2]), staged)
        os.replace(staged, backend / "triton_python_backend_stub")
        # The backend directory is on the stub's sys.path: the package link makes
        # `import tandem_serve` work, and its __init__ then adds TANDEM_PYTHONPATH.
        package_link = backend / "tandem_serve"
        if not package_link.exists():
            package_link.symlink_to(Path(__file__).resolve().parents[1], target_is_directory=True)

    def start(self) -> "EmbeddedTriton":
        """Start the server and wait until it is ready; raise TritonStartError with the log tail."""
        dist = TritonDistribution.find(self.options.tritonserver_home)
        sweep_orphaned_stubs()
        self._prepare_workspace(dist)
        if not is_loopback(self.host):
            logger.warning("tritonserver binds %s: reachable from other hosts. Inference is open to them; the "
                           "restricted APIs need the keys in %s", self.host, self.keys_file)
        warn_about_queue_policies(self.options.model_repositories or default_repositories())
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0  # a kept workspace's log grows
        env = stub_environment(dist, self.options.stub_python_path)
        self._spawn(self.command(dist, dist.has_option("--allow-client-shm", env)), env, self.log_path, private=True)
        try:
            self._hide_keys(log_start)
            self._wait_ready()
            self._start_supervision()
        except BaseException:
            self.stop()
            raise
        logger.info("tritonserver ready: HTTP %s, gRPC %s, metrics %s:%d%s", self.http_url, self.grpc_url,
                    self._client_host, self.metrics_port, f", health {self.health_url}" if self.health else "")
        return self

    def _hide_keys(self, log_start: int) -> None:
        """Wipe the keys from the server's command line once it has parsed its options: Triton's logger writes
        its first line (`I1201 12:00:00.000000 ...`) only after that; libraries may print before it."""
        assert self.process is not None
        deadline = time.monotonic() + 60
        parsed = False
        while not parsed and self.process.poll() is None and time.monotonic() < deadline:
            with open(self.log_path, "rb") as log:
                log.seek(log_start)
                parsed = TRITON_LOG_LINE.search(log.read()) is not None
            if not parsed:
                time.sleep(0.01)
        if not parsed:
            logger.warning("tritonserver wrote no log line within 60 s: its keys stay visible in /proc/%d/cmdline",
                           self.process.pid)
        elif not scrub_arguments(self.process.pid, [self.keys.admin, self.keys.shm]):
            logger.warning("could not wipe the keys from tritonserver's command line (no ptrace access to it): "
                           "other local users can read them in /proc/%d/cmdline", self.process.pid)

    def _start_supervision(self) -> None:
        assert self.process is not None
        if self.options.supervise:
            self.supervisor = TritonSupervisor(self.process.pid, self.http_url, self.keys, self.options.supervisor,
                                               refused=self.refused).start()
        if self.options.health_port is not None:
            self.health = HealthServer(self.health_status, self.host, self.options.health_port).start()

    def health_status(self) -> HealthStatus:
        """The supervisor's view, or (unsupervised) whether the process runs and Triton says it is ready."""
        if self.supervisor is not None:
            return self.supervisor.status()
        live = self.is_alive()
        if not self.refused:
            ready = live and self._triton_ready()
            return HealthStatus(live=live, ready=ready, server="tritonserver", reason="" if ready else "not ready")
        # Triton's strict readiness stays false with a refused model: ready when every other model is
        states = self._index_states() if live else {}
        waiting = [e["name"] for state, entries in states.items() if state != "READY" for e in entries
                   if e["name"] not in self.refused]
        ready = bool(states) and not waiting
        models, reason = refused_entries(self.refused)
        return HealthStatus(live=live, ready=ready, server="tritonserver", models=models,
                            reason=reason + (f"; not ready: {', '.join(waiting)}" if waiting else ""))

    def _triton_ready(self) -> bool:
        return self._probe("ready")

    def _triton_live(self) -> bool:
        return self._probe("live")

    def _probe(self, which: str) -> bool:
        """Triton's own /v2/health/<which> answers 200."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/{which}", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def _wait_ready(self) -> None:
        """Until Triton is ready; without exit_on_error, until no model is still loading (one that failed is
        refused alone: logged, kept in `refused`, and the start fails only when no model loaded at all)."""
        if self.options.exit_on_error:
            self._wait_until(self._triton_ready, self.options.startup_timeout_s, ())
            return
        self._wait_until(self._models_settled, self.options.startup_timeout_s, ())
        for name, reason in sorted(self.refused.items()):
            logger.error("model %s was refused at load and does not serve (the other models do): %s", name, reason)
        if self.refused and not self._index_states().get("READY"):
            raise TritonStartError(f"no model loaded; refused: {self.refused}\n{self.log_tail()}")

    def _index_states(self) -> dict[str, list[dict]]:
        """The model repository index grouped by state (READY, UNAVAILABLE, LOADING...); empty while unreachable."""
        request = urllib.request.Request(f"http://{self.http_url}/v2/repository/index", data=b"{}", method="POST",
                                         headers=self.keys.admin_headers("http"))
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                entries = json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            return {}
        states: dict[str, list[dict]] = {}
        for entry in entries:
            states.setdefault(entry.get("state", ""), []).append(entry)
        return states

    def _models_settled(self) -> bool:
        """Whether every model of the index has loaded or been refused; refused ones go to `refused`."""
        if not self._triton_live():
            return False
        states = self._index_states()
        if not states or "LOADING" in states or "UNLOADING" in states:
            return False
        # UNAVAILABLE with Triton's reason (the adapter's error, then a traceback: its first line is kept); an
        # ensemble whose step was refused is never loaded and has no state
        self.refused = {e["name"]: (e.get("reason") or "not loaded: a model it needs was refused").split("\n")[0]
                        for state, entries in states.items() if state != "READY" for e in entries}
        return True

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server log, for error messages."""
        return log_tail(self.log_path, lines)

    def stop(self) -> None:
        """Stop supervising, SIGINT, then SIGKILL after stop_timeout_s (DEAD_STUB_GRACE_S after a stub died);
        reap leftover stubs and every stub region of this server; drop a temporary workspace."""
        if self.health is not None:
            self.health.stop()
            self.health = None
        dead_stub = False
        if self.supervisor is not None:
            self.supervisor.stop()
            dead_stub = self.supervisor.unclean()
            regions = self.supervisor.regions()
            self.supervisor = None
        else:
            regions = set()
        process, self.process = self.process, None
        if process is None:
            return
        grace = min(self.options.stop_timeout_s, DEAD_STUB_GRACE_S) if dead_stub else self.options.stop_timeout_s
        stop_process(process, "tritonserver", grace)
        reap_process_group(process.pid, regions)  # start_new_session: the group id is the server's pid
        if process.returncode != 0 and self._own_workspace:
            logger.warning("tritonserver exited with %s; log kept at %s", process.returncode, self.log_path)
        self._drop_workspace(keep=process.returncode != 0)


def reap_process_group(pgid: int, regions: set[str] = frozenset()) -> None:
    """Kill what is left of the server's process group (orphaned stubs), unlink their regions and `regions`."""
    members = set(process_group_members(pgid))
    regions = set(regions) | {s.region for s in all_stubs() if s.pid in members}
    kill_process_group(pgid, "tritonserver")
    for region in regions:
        unlink_region(region)
