"""A node agent in the test's event loop, over twin GPU endpoints served on loopback, and a raw client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.node.authorize import AnyPod, Authorizer
from agent.node.gpu_backends import NodeGpu, open_twin_gpus
from agent.node.server import NodeAgent
from tests.unit.test_gpus_twin import FakeTwinGpu, serve


class NamedTwinGpu(FakeTwinGpu):
    """FakeTwinGpu with its own UUID, so an agent can steer several."""

    def __init__(self, uuid: str) -> None:
        super().__init__()
        self.uuid = uuid

    def state(self) -> dict:
        return {**super().state(), "uuid": self.uuid}


def socket_path() -> Path:
    """A short path: Unix socket paths are limited to 108 bytes."""
    return Path(tempfile.mkdtemp(prefix="tn")) / "node.sock"


@dataclass
class Harness:
    path: Path
    fakes: list[NamedTwinGpu]
    agent: NodeAgent
    task: asyncio.Task
    announced: dict[str, Any] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def twins(count: int) -> AsyncIterator[tuple[list[NamedTwinGpu], list[str]]]:
    fakes = [NamedTwinGpu(f"GPU-{i:04d}-0000") for i in range(count)]
    served = [await serve(fake) for fake in fakes]
    try:
        yield fakes, [url for _, url in served]
    finally:
        for runner, _ in served:
            await runner.cleanup()


@contextlib.asynccontextmanager
async def running_agent(
    count: int = 1,
    *,
    ttl_s: float = 0.3,
    idle_timeout_s: float = 5.0,
    max_connections: int = 8,
    authorizer: Authorizer | None = None,
    gpus: list[NodeGpu] | None = None,
    path: Path | None = None,
    locked_mhz: int | None = None,
) -> AsyncIterator[Harness]:
    """An agent over `count` twin GPUs (each locked at `locked_mhz` before it starts, when given)."""
    async with twins(count) as (fakes, urls):
        for fake in fakes:
            fake.locked = locked_mhz
        opened = gpus if gpus is not None else list(await open_twin_gpus(urls))
        agent = NodeAgent(
            opened,
            authorizer or AnyPod(),
            lease_ttl_s=ttl_s,
            idle_timeout_s=idle_timeout_s,
            max_connections=max_connections,
        )
        path = path or socket_path()
        ready: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(agent.run(path, None, ready.set_result))
        done, _ = await asyncio.wait({task, ready}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # raise its start error
        harness = Harness(path, fakes, agent, task, ready.result())
        try:
            yield harness
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class RawClient:
    """Speaks the protocol line by line, for tests of what the agent does with each line."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: Path) -> RawClient:
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
        return cls(reader, writer)

    async def ask(self, request: dict | bytes) -> dict:
        raw = request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n"
        self.writer.write(raw)
        await self.writer.drain()
        return json.loads(await asyncio.wait_for(self.reader.readline(), 5))

    async def closed(self, timeout_s: float = 5) -> bool:
        """Whether the agent ends the connection within `timeout_s`."""
        try:
            return await asyncio.wait_for(self.reader.read(), timeout_s) == b""
        except ConnectionError:
            return True

    def close(self) -> None:
        self.writer.close()


async def leased(path: Path, gpus: list[str] | None = None) -> tuple[RawClient, dict]:
    client = await RawClient.connect(path)
    assert (await client.ask({"op": "hello"}))["ok"]
    reply = await client.ask({"op": "acquire", **({"gpus": gpus} if gpus else {})})
    return client, reply


async def until(condition, timeout_s: float = 3.0, step_s: float = 0.01) -> float:
    """Seconds until `condition()` holds; AssertionError past the timeout."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not condition():
        assert loop.time() - start < timeout_s, "condition never held"
        await asyncio.sleep(step_s)
    return loop.time() - start
