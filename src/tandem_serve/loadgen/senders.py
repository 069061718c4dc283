"""Targets for the load loops: `async send(i)` to a Triton model (tritonclient's asyncio clients) or an HTTP POST."""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

import numpy as np

from tandem_serve.errors import ConfigError


class TritonSender:
    """`async send(i)`: request i % len(requests) to one model over gRPC or HTTP (tritonclient's asyncio clients),
    the inputs over the wire or through a shared-memory pool of `slots` ("system" or "cuda").

    `requests` holds, per request, its (input name, numpy array) pairs; outputs are read back as numpy.
    Use `async with`: closes the client and the pool (unregistering its regions).
    """

    def __init__(self, url: str, protocol: str, model: str, requests: Sequence[Sequence[tuple[str, np.ndarray]]],
                 outputs: Sequence[str], shm: str = "none", slots: int = 64, timeout_s: float = 60.0,
                 output_bytes: int = 1 << 16, shm_key: str | None = None):
        from tandem_serve.clients.shm import KINDS

        if shm not in KINDS:
            raise ConfigError(f"shm must be one of {KINDS}, got {shm!r}")
        if not requests:
            raise ConfigError("a sender needs at least one request")
        self.url, self.protocol, self.model, self.shm = url, protocol, model, shm
        self.requests, self.outputs, self.slots, self.timeout_s = list(requests), list(outputs), slots, timeout_s
        self.output_bytes = output_bytes
        self.shm_key = shm_key  # None: the default keys file's (client.shm_headers)
        self.client: Any = None
        self.pool: Any = None
        self._setup_client: Any = None
        self._free: asyncio.Semaphore | None = None

    async def __aenter__(self) -> "TritonSender":
        from tandem_serve.clients.triton import shm_headers, triton_client
        from tandem_serve.clients.shm import ShmPool

        if self.protocol == "grpc":
            import tritonclient.grpc.aio as aio

            self.client = aio.InferenceServerClient(self.url)
        elif self.protocol == "http":
            import tritonclient.http.aio as aio

            self.client = aio.InferenceServerClient(self.url, conn_limit=max(100, self.slots), conn_timeout=self.timeout_s)
        else:
            raise ConfigError(f"protocol must be 'grpc' or 'http', got {self.protocol!r}")
        if self.shm != "none":  # regions are server-wide: registered once through a synchronous client
            self._setup_client = triton_client(self.url, self.protocol, self.timeout_s)
            input_bytes = max(ShmPool.input_size([a for _, a in r]) for r in self.requests)
            self.pool = ShmPool(self._setup_client, self.shm, self.slots, input_bytes, self.output_bytes * len(self.outputs),
                                headers=shm_headers(self.protocol, self.shm_key))
            self._free = asyncio.Semaphore(self.slots)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            if self.pool is not None:
                self.pool.close()
            if self._setup_client is not None:
                self._setup_client.close()
        finally:
            await self.client.close()

    async def __call__(self, index: int) -> dict[str, np.ndarray]:
        from tandem_serve.clients.triton import bind_slot, read_slot_outputs, tritonclient_module
        from tandem_serve.clients.shm import numpy_datatype

        module = tritonclient_module(self.protocol)
        pairs = self.requests[index % len(self.requests)]
        inputs = [module.InferInput(name, list(array.shape), numpy_datatype(array)) for name, array in pairs]
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {"timeout": int(self.timeout_s * 1e6)}
        if self.pool is None:
            for tensor, (_, array) in zip(inputs, pairs):
                tensor.set_data_from_numpy(array)
            result = await self.client.infer(self.model, inputs, outputs=[module.InferRequestedOutput(n) for n in self.outputs],
                                             **kwargs)
            return {name: result.as_numpy(name) for name in self.outputs}
        async with self._free:  # a slot is always free here: as many permits as slots
            with self.pool.slot(timeout_s=0.0) as slot:
                requested, areas = bind_slot(self.protocol, self.pool, slot, inputs, [a for _, a in pairs], self.outputs)
                result = await self.client.infer(self.model, inputs, outputs=requested, **kwargs)
                return read_slot_outputs(self.protocol, self.pool, result, self.outputs, areas)


class PostSender:
    """`async send(i)`: body i % len(bodies) POSTed to `url` with `headers` (aiohttp, tritonclient's own HTTP
    dependency: one pool of keep-alive connections). A non-200 answer raises, naming its status and message.
    Picklable until entered (for `measure(..., processes=N)`)."""

    def __init__(self, url: str, bodies: Sequence[tuple[bytes, str]], headers: dict[str, str] | None = None,
                 timeout_s: float = 60.0, connections: int = 512):
        if not bodies:
            raise ConfigError("a sender needs at least one request body")
        self.url, self.bodies, self.headers = url, list(bodies), dict(headers or {})
        self.timeout_s, self.connections = timeout_s, connections
        self.session: Any = None

    async def __aenter__(self) -> "PostSender":
        import aiohttp

        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.connections),
                                             timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.session.close()

    async def __call__(self, index: int) -> bytes:
        body, content_type = self.bodies[index % len(self.bodies)]
        async with self.session.post(self.url, data=body, headers={**self.headers, "Content-Type": content_type}) as response:
            raw = await response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {raw[:200].decode(errors='replace')}")
            return raw


class TorchServeSender(PostSender):
    """A PostSender to a TorchServe's `/predictions/<model>` with the inference token."""

    def __init__(self, url: str, model: str, bodies: Sequence[tuple[bytes, str]], token: str,
                 timeout_s: float = 60.0, connections: int = 512):
        super().__init__(f"{url.rstrip('/')}/predictions/{model}", bodies, {"Authorization": f"Bearer {token}"},
                         timeout_s, connections)
