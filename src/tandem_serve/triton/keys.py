"""The keys that guard the embedded server's restricted APIs, and how clients find and send them.

Two keys, so that a client allowed to use shared memory cannot also load models:
- the admin key: model-repository (load/unload; the supervisor reloads failed models with it),
  logging and trace APIs;
- the shared-memory key: registering, unregistering and listing shared-memory regions. An
  unkeyed shared-memory API lets any local process crash Triton 2.51 (register a stub's own
  region as an output) or unregister every other client's regions.

The launcher writes both to `keys.json` in its workspace (mode 0600; `tandem serve triton`
uses ~/.cache/tandem-serve/triton/), the way TorchServe writes key_file.json. Clients read that
file: `$TANDEM_TRITON_KEYS` or the default path, or a path given explicitly.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

ADMIN_HEADER = "tandem-admin-key"  # HTTP header; over gRPC Triton expects the name prefixed (grpc_header)
SHM_HEADER = "tandem-shm-key"
GRPC_PREFIX = "triton-grpc-protocol-"
ADMIN_APIS = ("model-repository", "logging", "trace")
SHM_APIS = ("shared-memory",)
KEYS_FILE = "keys.json"
KEYS_ENV = "TANDEM_TRITON_KEYS"
DEFAULT_WORKSPACE = Path("~/.cache/tandem-serve/triton").expanduser()


def grpc_header(header: str) -> str:
    """The gRPC metadata name Triton reads for a restricted-protocol header."""
    return GRPC_PREFIX + header


def header_for(protocol: str, header: str, value: str) -> dict[str, str]:
    """The header dict tritonclient sends for `header: value` over `protocol` ('grpc' or 'http')."""
    return {grpc_header(header) if protocol == "grpc" else header: value}


@dataclass(frozen=True)
class TritonKeys:
    """The admin and shared-memory keys of one server."""

    admin: str
    shm: str

    @classmethod
    def generate(cls) -> "TritonKeys":
        return cls(secrets.token_urlsafe(24), secrets.token_urlsafe(24))

    def restrictions(self) -> list[str]:
        """The restricted-API groups as `<apis>:<header>=<key>` for --http-restricted-api / --grpc-restricted-protocol."""
        return [f"{','.join(ADMIN_APIS)}:{ADMIN_HEADER}={self.admin}", f"{','.join(SHM_APIS)}:{SHM_HEADER}={self.shm}"]

    def admin_headers(self, protocol: str) -> dict[str, str]:
        return header_for(protocol, ADMIN_HEADER, self.admin)

    def shm_headers(self, protocol: str) -> dict[str, str]:
        return header_for(protocol, SHM_HEADER, self.shm)

    def write(self, path: Path) -> Path:
        """Write the keys readable by this user only (created 0600, never world-readable in between)."""
        path = Path(path)
        payload = json.dumps({"admin": {"header": ADMIN_HEADER, "key": self.admin},
                              "shared_memory": {"header": SHM_HEADER, "key": self.shm}}, indent=1)
        path.unlink(missing_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(payload)
        return path

    @classmethod
    def read(cls, path: Path) -> "TritonKeys":
        """The keys in a keys.json; a clear error when it is missing or malformed."""
        try:
            data = json.loads(Path(path).read_text())
            return cls(data["admin"]["key"], data["shared_memory"]["key"])
        except OSError as exc:
            raise FileNotFoundError(f"cannot read the Triton keys file {path}: {exc.strerror}") from None
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path} is not a tandem keys file (admin and shared_memory keys)") from None


def default_keys_file() -> Path:
    """Where clients look for the keys: $TANDEM_TRITON_KEYS, else `tandem serve triton`'s default workspace."""
    return Path(os.environ.get(KEYS_ENV) or DEFAULT_WORKSPACE / KEYS_FILE).expanduser()


def client_shm_key(key_file: Path | None = None) -> str | None:
    """The shared-memory key for a client: from `key_file`, else the default file if it exists, else None
    (a server without the restriction, such as one started by hand, needs none)."""
    path = Path(key_file) if key_file else default_keys_file()
    if key_file is None and not path.is_file():
        return None
    return TritonKeys.read(path).shm
