"""Client-side shared memory for Triton: regions created and registered once, reused across requests.

A `ShmPool` holds one input and one output region, each cut into `slots` equal parts; a request
takes a slot for its lifetime (so up to `slots` requests can be in flight), writes its inputs
into the slot's input part and has the server write its outputs into the slot's output part.
`close()` (or leaving the `with` block, also on an exception or Ctrl-C) unregisters both regions
from the server and destroys them: no /dev/shm entry or CUDA allocation outlives the pool.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import secrets
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor, triton_to_np_dtype

logger = logging.getLogger(__name__)
KINDS = ("none", "system", "cuda")
ALIGN = 64  # bytes between tensors inside a slot
_open_pools: "set[ShmPool]" = set()


def _aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


@dataclass(frozen=True)
class Placed:
    """Where one tensor lies in a region: offset and size in bytes."""

    offset: int
    byte_size: int


class ShmPool:
    """Input and output regions of `slots` x `input_bytes` / `output_bytes`, registered with `client`."""

    def __init__(self, client: Any, kind: str = "system", slots: int = 4, input_bytes: int = 1 << 20,
                 output_bytes: int = 1 << 20, device_id: int = 0, prefix: str = "tandem",
                 headers: dict[str, str] | None = None):
        if kind not in ("system", "cuda"):
            raise ValueError(f"shared-memory kind must be 'system' or 'cuda', got {kind!r}")
        if slots < 1 or input_bytes < ALIGN or output_bytes < ALIGN:
            raise ValueError("slots >= 1 and region parts of at least 64 bytes required")
        self.client, self.kind, self.device_id = client, kind, device_id
        self.headers = headers  # the shared-memory key's header, where the server restricts the API (keys.py)
        self.slots, self.input_bytes, self.output_bytes = slots, _aligned(input_bytes), _aligned(output_bytes)
        base = f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"
        self.input_name, self.output_name = f"{base}-in", f"{base}-out"
        self._handles: dict[str, Any] = {}
        self._registered: list[str] = []
        self._free: queue.Queue[int] = queue.Queue()
        self._lock = threading.Lock()
        try:
            self._create(self.input_name, self.slots * self.input_bytes)
            self._create(self.output_name, self.slots * self.output_bytes)
        except BaseException:
            self.close()
            raise
        for index in range(slots):
            self._free.put(index)
        _open_pools.add(self)

    @property
    def _module(self) -> Any:
        if self.kind == "system":
            import tritonclient.utils.shared_memory as module
        else:
            import tritonclient.utils.cuda_shared_memory as module
        return module

    def _create(self, name: str, byte_size: int) -> None:
        try:
            if self.kind == "system":
                handle = self._module.create_shared_memory_region(name, f"/{name}", byte_size)
                self._handles[name] = handle
                self.client.register_system_shared_memory(name, f"/{name}", byte_size, headers=self.headers)
            else:
                handle = self._module.create_shared_memory_region(name, byte_size, self.device_id)
                self._handles[name] = handle
                self.client.register_cuda_shared_memory(name, self._module.get_raw_handle(handle), self.device_id,
                                                        byte_size, headers=self.headers)
        except Exception as exc:
            if "restricted" in str(exc):
                raise PermissionError(
                    f"the server's shared-memory API needs its key ({exc}): pass the server's keys.json "
                    "(--key-file, $TANDEM_TRITON_KEYS; `tandem serve triton` prints where it is)") from None
            raise
        self._registered.append(name)

    def close(self) -> None:
        """Unregister and destroy both regions; safe to call twice and when the server is gone."""
        with self._lock:
            for name in self._registered:
                self._unregister(name)
            self._registered = []
            for handle in self._handles.values():
                try:
                    self._module.destroy_shared_memory_region(handle)
                except Exception as exc:  # noqa: BLE001
                    logger.warning("destroying a shared-memory region failed: %s", exc)
            self._handles = {}
        _open_pools.discard(self)

    def _unregister(self, name: str, wait_s: float = 30.0) -> None:
        """Unregister `name`, waiting while the server still uses it; a gone server is not an error."""
        unregister = (self.client.unregister_system_shared_memory if self.kind == "system"
                      else self.client.unregister_cuda_shared_memory)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                unregister(name, headers=self.headers)
                return
            except Exception as exc:  # noqa: BLE001 - decide below
                if "in use" in str(exc) and time.monotonic() < deadline:
                    time.sleep(0.05)  # requests still reading or writing it
                    continue
                logger.debug("unregistering %s failed: %s", name, exc)
                return

    def __enter__(self) -> "ShmPool":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def slot(self, timeout_s: float = 300.0) -> Iterator[int]:
        """A free slot for one request (blocks while all are in flight)."""
        try:
            index = self._free.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no free shared-memory slot within {timeout_s:.0f} s") from None
        try:
            yield index
        finally:
            self._free.put(index)

    @staticmethod
    def _payloads(arrays: Sequence[Any]) -> tuple[list[Any], list[int]]:
        """Each input as bytes to place (BYTES serialized; torch tensors kept, possibly on a GPU) and its size."""
        payloads, sizes = [], []
        for array in arrays:
            if isinstance(array, np.ndarray) and array.dtype == np.object_:
                raw = serialize_byte_tensor(array).item()
                payloads.append(np.frombuffer(raw, np.uint8))
            elif isinstance(array, np.ndarray):
                payloads.append(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
            else:  # a torch tensor
                payloads.append(array.detach().contiguous().reshape(-1).view(torch_uint8()))
            sizes.append(int(payloads[-1].shape[0]))
        return payloads, sizes

    @classmethod
    def input_size(cls, arrays: Sequence[Any]) -> int:
        """Bytes `arrays` take in a slot (BYTES serialized, each tensor aligned)."""
        return sum(_aligned(size) for size in cls._payloads(arrays)[1])

    def _region_bytes(self, name: str) -> Any:
        """A CUDA region as a torch uint8 tensor (DLPack view of the device memory, no copy)."""
        import torch

        size = self.slots * (self.input_bytes if name == self.input_name else self.output_bytes)
        return torch.from_dlpack(self._module.as_shared_memory_tensor(self._handles[name], "UINT8", [size]))

    def write_inputs(self, slot: int, arrays: Sequence[Any]) -> list[Placed]:
        """Copy inputs (numpy arrays, BYTES as object arrays, or torch tensors) into the slot's input part.

        Into a CUDA region a CUDA tensor is copied device to device (no host copy). Raises
        ValueError when the inputs do not fit the slot.
        """
        payloads, sizes = self._payloads(arrays)
        if sum(_aligned(s) for s in sizes) > self.input_bytes:
            raise ValueError(f"request inputs of {sum(sizes)} bytes exceed the {self.input_bytes}-byte "
                             "shared-memory slot; create the pool with larger input_bytes")
        placed, offset = [], slot * self.input_bytes
        region = self._region_bytes(self.input_name) if self.kind == "cuda" else None
        for payload, size in zip(payloads, sizes):
            if region is not None:
                import torch

                if isinstance(payload, np.ndarray):
                    with warnings.catch_warnings():  # read-only numpy memory: torch only reads it here
                        warnings.simplefilter("ignore", UserWarning)
                        source = torch.from_numpy(payload)
                else:
                    source = payload
                region[offset : offset + size].copy_(source)
            else:
                host = payload if isinstance(payload, np.ndarray) else payload.cpu().numpy()
                self._module.set_shared_memory_region(self._handles[self.input_name], [host], offset=offset)
            placed.append(Placed(offset, size))
            offset += _aligned(size)
        if region is not None:
            import torch

            torch.cuda.synchronize(region.device)  # the server reads the region as soon as the request arrives
        return placed

    def output_areas(self, slot: int, count: int) -> list[Placed]:
        """The slot's output part split evenly between `count` outputs."""
        share = (self.output_bytes // count) // ALIGN * ALIGN
        return [Placed(slot * self.output_bytes + i * share, share) for i in range(count)]

    def read_output(self, area: Placed, datatype: str, shape: Sequence[int]) -> np.ndarray:
        """A host copy of one output the server wrote into `area`."""
        dtype = np.dtype(triton_to_np_dtype(datatype))
        count = int(np.prod(shape))
        if self.kind == "cuda":
            region = self._region_bytes(self.output_name)
            raw = region[area.offset : area.offset + count * dtype.itemsize].cpu().numpy()
            return raw.view(dtype).reshape(shape).copy()
        array = self._module.get_contents_as_numpy(self._handles[self.output_name], dtype, list(shape), offset=area.offset)
        return np.array(array, copy=True)


def torch_uint8() -> Any:
    import torch

    return torch.uint8


def numpy_datatype(array: Any) -> str:
    """Triton's datatype name for a numpy array (object arrays are BYTES) or a torch tensor."""
    if isinstance(array, np.ndarray):
        return np_to_triton_dtype(array.dtype)
    import torch

    if array.dtype == torch.bfloat16:
        return "BF16"
    return np_to_triton_dtype(torch.empty(0, dtype=array.dtype).numpy().dtype)


@atexit.register
def _close_open_pools() -> None:
    """Pools the program forgot to close (e.g. it exits on an exception): leave no /dev/shm entry behind."""
    for pool in list(_open_pools):
        pool.close()
