"""`throttllem coordinator` as a process: it brings up the first engine, routes through its router,
reports on /healthz and /metrics, and on SIGTERM stops every engine process it started."""

import asyncio

import aiohttp

from agent.bench.processes import LOOPBACK, ProcessGroup, child_env

ENV = {
    "THROTTLLEM_COORDINATOR_GPU": "a100-sxm4-80gb",
    "THROTTLLEM_COORDINATOR_MODEL": "llama3-8b",
    "THROTTLLEM_COORDINATOR_SIZES": "1,2",
    "THROTTLLEM_COORDINATOR_CAPACITIES": "1:4,2:50",
    "THROTTLLEM_COORDINATOR_POLICY": "max",
    "THROTTLLEM_COORDINATOR_PERIOD_S": "0.5",
}


def test_the_coordinator_serves_through_its_router_and_stops_its_engines(tmp_path):
    async def scenario():
        async with ProcessGroup(tmp_path) as group, aiohttp.ClientSession() as session:
            argv = [
                "coordinator",
                "--port",
                "0",
                "--router-port",
                "0",
                "--log-dir",
                str(tmp_path / "engines"),
            ]
            child = await group.start("coordinator", argv, env=child_env(ENV, inherit_otel=False))
            base = f"http://{LOOPBACK}:{child.announced['port']}"
            router = f"http://{LOOPBACK}:{child.announced['router_port']}"
            for _ in range(120):
                async with session.get(f"{router}/v2/health/ready") as response:
                    if response.status == 200:
                        break
                await asyncio.sleep(0.5)
            async with session.get(f"{base}/healthz") as response:
                health = await response.json()
            async with session.get(f"{base}/metrics") as response:
                page = await response.text()
            code = await child.stop()
        return health, page, code

    health, page, code = asyncio.run(scenario())
    assert health["status"] == "alive" and health["serving"] == 1 and health["pending"] == []
    assert "throttllem_coordinator_serving_size 1.0" in page
    assert 'throttllem_coordinator_actions_total{action="route",size="1"} 1.0' in page
    assert code == 0
    logs = {p.name: p.read_text() for p in (tmp_path / "engines").glob("*.log")}
    assert set(logs) == {"twin-tp1.log", "sidecar-tp1.log"}
    assert "stopped" in logs["sidecar-tp1.log"], "the sidecar exited through its clean path (clocks reset)"
