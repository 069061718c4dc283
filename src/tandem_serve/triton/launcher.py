"""Start the `tritonserver` binary of the nvidia-pytriton wheel on our model repositories.

The server gets a per-run workspace holding the Python backend with the stub built for the
running interpreter, and an environment (PYTHONPATH, LD_LIBRARY_PATH) in which the stubs import
this interpreter's packages. It binds 127.0.0.1 by default, keeps model control off and puts the
model-repository, logging and trace APIs behind a per-run key (shared memory too when bound to a
non-loopback address). Use `EmbeddedTriton` as a context manager.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import signal
import shutil
import sys
import sysconfig
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tandem_serve.paths import default_repositories
from tandem_serve.processes import (
    client_host,
    free_port,
    is_loopback,
    kill_process_group,
    log_tail,
    process_group_members,
    stop_process,
)
from tandem_serve.server_process import ServerProcess

logger = logging.getLogger(__name__)

ADMIN_HEADER = "tandem-admin-key"  # HTTP header; over gRPC Triton expects it prefixed (GRPC_ADMIN_HEADER)
GRPC_ADMIN_HEADER = "triton-grpc-protocol-" + ADMIN_HEADER
STUB_PATH_ENV = "TANDEM_STUB_PYTHONPATH"
RESTRICTED_APIS = ("model-repository", "logging", "trace")


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
    startup_timeout_s: float = 300.0
    stop_timeout_s: float = 45.0
    log_verbose: int = 0
    workspace: Path | None = None  # kept after stop when given; else a temporary directory
    # Directories put first on the stubs' sys.path only (e.g. one holding numpy<2 when the
    # launching environment has numpy 2, which this stub build cannot use for TYPE_STRING).
    stub_python_path: list[Path] = field(default_factory=lambda: _paths_from_env(STUB_PATH_ENV))
    extra_args: list[str] = field(default_factory=list)
    # Explicit model control (load/unload with config overrides; `tandem tune` needs it). The API stays
    # behind the admin key like the rest of the model-repository API.
    model_control: bool = False


@dataclass(frozen=True)
class TritonDistribution:
    """Paths inside the installed nvidia-pytriton wheel."""

    root: Path

    @classmethod
    def find(cls) -> "TritonDistribution":
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise TritonStartError("the package nvidia-pytriton is not installed (pip install nvidia-pytriton==0.7.0)")
        root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
        if not (root / "bin" / "tritonserver").is_file():
            raise TritonStartError(f"no tritonserver binary under {root}")
        return cls(root)

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def libs(self) -> Path:
        return self.root.parent.parent / "nvidia_pytriton.libs"

    def stub_for(self, version: tuple[int, int]) -> Path:
        stub = self.root / "python_backend_stubs" / f"{version[0]}.{version[1]}" / "triton_python_backend_stub"
        if not stub.is_file():
            available = sorted(p.name for p in (self.root / "python_backend_stubs").iterdir())
            raise TritonStartError(f"no Python-backend stub for Python {version[0]}.{version[1]}; the wheel has {available}")
        return stub


def stub_environment(dist: TritonDistribution, first: list[Path] | None = None) -> dict[str, str]:
    """The server's environment: stubs see this interpreter's packages and libpython.

    The stub's embedded interpreter ignores PYTHONPATH: `tandem_serve/__init__` adds the
    directories of TANDEM_PYTHONPATH as site directories instead (see `_prepare_workspace`).
    """
    env = dict(os.environ)
    site_dirs = [*map(str, first or []), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path]
    env["TANDEM_PYTHONPATH"] = os.pathsep.join(p for p in dict.fromkeys(site_dirs) if p and Path(p).is_dir())
    lib_path = [str(dist.libs), sysconfig.get_config_var("LIBDIR") or ""]
    if env.get("LD_LIBRARY_PATH"):
        lib_path.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in lib_path if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def stub_shm_regions(pids: list[int]) -> list[str]:
    """The /dev/shm region names that Python-backend stubs among `pids` were started with."""
    regions = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"triton_python_backend_stub") and len(argv) > 2:
            regions.append(argv[2].decode())
    return regions


def reap_process_group(pgid: int) -> None:
    """Kill what is left of the server's process group (orphaned stubs) and unlink their shm."""
    regions = stub_shm_regions(process_group_members(pgid))
    kill_process_group(pgid, "tritonserver")
    for region in regions:
        Path("/dev/shm", region.lstrip("/")).unlink(missing_ok=True)


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def orphaned_stubs() -> list[int]:
    """Pids of Python-backend stubs started from a tandem workspace whose tritonserver is gone.

    That happens when the process that launched the server is SIGKILLed: the server dies with it
    (PR_SET_PDEATHSIG) but its stubs are re-parented and live on, each holding a /dev/shm region.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = _cmdline(int(entry.name))
        if not argv or not argv[0].endswith(b"/backends/python/triton_python_backend_stub"):
            continue
        workspace = Path(argv[0].decode(errors="replace")).parents[2]
        if not ((workspace / "admin-key").exists() or workspace.name.startswith("tandem-triton-")):
            continue  # not started by this launcher
        parent = _cmdline(_parent(int(entry.name)))
        if parent and parent[0].endswith(b"tritonserver"):
            continue  # its server still runs
        found.append(int(entry.name))
    return found


def sweep_orphaned_stubs() -> int:
    """Kill orphaned tandem stubs and unlink their shared-memory regions; returns how many were found."""
    pids = orphaned_stubs()
    regions = stub_shm_regions(pids)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for region in regions:
        Path("/dev/shm", region.lstrip("/")).unlink(missing_ok=True)
    if pids:
        logger.warning("removed %d orphaned Python-backend stub(s) left by a killed launcher", len(pids))
    return len(pids)


class EmbeddedTriton(ServerProcess):
    """A running tritonserver; `with EmbeddedTriton(options) as server: server.grpc_url ...`."""

    name = "tritonserver"
    start_error = TritonStartError

    def __init__(self, options: TritonOptions | None = None):
        self.options = options or TritonOptions()
        super().__init__(self.options.workspace, "tandem-triton-")
        self.admin_key = secrets.token_urlsafe(24)
        self.log_path = self.workspace / "server.log"
        self.host = self.options.host
        self.http_port = self.options.http_port or free_port(self._client_host)
        self.grpc_port = self.options.grpc_port or free_port(self._client_host)
        self.metrics_port = self.options.metrics_port or free_port(self._client_host)

    @property
    def _client_host(self) -> str:
        return client_host(self.host)

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    def command(self, dist: TritonDistribution) -> list[str]:
        """The tritonserver command line."""
        repositories = self.options.model_repositories or default_repositories()
        restricted = list(RESTRICTED_APIS) + ([] if is_loopback(self.host) else ["shared-memory"])
        restriction = f"{','.join(restricted)}:{ADMIN_HEADER}={self.admin_key}"
        return [
            str(dist.binary),
            *[f"--model-repository={Path(r).resolve()}" for r in repositories],
            f"--backend-directory={self.workspace / 'backends'}",
            *(["--model-control-mode=explicit", "--load-model=*"] if self.options.model_control
              else ["--model-control-mode=none"]),
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--exit-timeout-secs=30",  # 10 s was not always enough to unload on the H100
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--http-restricted-api={restriction}",
            f"--grpc-restricted-protocol={restriction}",
            f"--log-verbose={self.options.log_verbose}",
            *self.options.extra_args,
        ]

    def _prepare_workspace(self, dist: TritonDistribution) -> None:
        backend = self.workspace / "backends" / "python"
        backend.mkdir(parents=True, exist_ok=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            target = backend / name
            if not target.exists():
                target.symlink_to(dist.root / "backends" / "python" / name)
        shutil.copy2(dist.stub_for(sys.version_info[:2]), backend / "triton_python_backend_stub")
        # The backend directory is on the stub's sys.path: the package link makes
        # `import tandem_serve` work, and its __init__ then adds TANDEM_PYTHONPATH.
        package_link = backend / "tandem_serve"
        if not package_link.exists():
            package_link.symlink_to(Path(__file__).resolve().parents[1], target_is_directory=True)
        key_file = self.workspace / "admin-key"
        key_file.write_text(self.admin_key)
        key_file.chmod(0o600)

    def start(self) -> "EmbeddedTriton":
        """Start the server and wait until it is ready; raise TritonStartError with the log tail."""
        dist = TritonDistribution.find()
        sweep_orphaned_stubs()
        self._prepare_workspace(dist)
        command = self.command(dist)
        self._spawn(command, stub_environment(dist, self.options.stub_python_path), self.log_path)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        logger.info("tritonserver ready: HTTP %s, gRPC %s, metrics %s:%d",
                    self.http_url, self.grpc_url, self._client_host, self.metrics_port)
        return self

    def _wait_ready(self) -> None:
        url = f"http://{self.http_url}/v2/health/ready"

        def ready() -> bool:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200

        self._wait_until(ready, self.options.startup_timeout_s, (urllib.error.URLError, ConnectionError, TimeoutError))

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server log, for error messages."""
        return log_tail(self.log_path, lines)

    def stop(self) -> None:
        """SIGINT, then SIGKILL after stop_timeout_s; reap leftover stubs; drop a temporary workspace."""
        process, self.process = self.process, None
        if process is None:
            return
        stop_process(process, "tritonserver", self.options.stop_timeout_s)
        reap_process_group(process.pid)  # start_new_session: the group id is the server's pid
        if process.returncode != 0 and self._own_workspace:
            logger.warning("tritonserver exited with %s; log kept at %s", process.returncode, self.log_path)
        self._drop_workspace(keep=process.returncode != 0)
