"""The sidecar's own HTTP port (/healthz, /readyz, /metrics, request energy) and its optional admin API.

- `/healthz`: the process and its event loop are alive (liveness).
- `/readyz`: 200 while the sidecar steers with fresh telemetry and a working GPU, else 503; the
  JSON body says why. It reports the *controller*: the gateway serves either way, so wire it to
  alerts or a readiness gate of the sidecar alone, not to the pod's traffic.
- `/metrics`: Prometheus text format (`agent.sidecar.metrics`).
- `GET /v1/requests/{id}/energy`: the energy of the request the gateway answered with
  `X-Throttllem-Request-Id: {id}` — 200 `{"request_id", "energy_j", "tokens", "final"}`, 404
  `{"error"}` for an id unknown (never seen, or forgotten past the last 10,000 finished), 400
  `{"error"}` for one that is not 32 hex digits. The ids are random: only who got one can ask.

The admin API (`GET /admin/state`, `POST /admin/policy {"policy": "<spec>"}`) changes what the
GPU does, so it is off by default and the app serves it on its own listener bound to 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4

from agent.sidecar.loop import ControlLoop, LoopStatus
from agent.sidecar.metrics import SidecarMetrics
from agent.sidecar.request_energy import RequestEnergyLedger

REQUEST_ID = re.compile(r"[0-9a-fA-F]{32}")  # what `secrets.token_hex(16)` makes (the tracker)


def status_json(status: LoopStatus) -> dict[str, Any]:
    """The loop status as JSON-ready data."""
    return {
        key: value.value
        if isinstance(value, enum.Enum)
        else list(value)
        if isinstance(value, tuple)
        else value
        for key, value in dataclasses.asdict(status).items()
    }


def build_sidecar_app(
    loop: ControlLoop, metrics: SidecarMetrics, request_energy: RequestEnergyLedger | None = None
) -> web.Application:
    """Health, readiness, metrics and (without a ledger: 404 for every id) per-request energy."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_: web.Request) -> web.Response:
        status = loop.status()
        body = {"ready": not status.not_ready, **status_json(status)}
        return web.json_response(body, status=200 if body["ready"] else 503)

    async def metrics_page(_: web.Request) -> web.Response:
        response = web.Response(body=metrics.exposition())
        response.headers["Content-Type"] = CONTENT_TYPE_PLAIN_0_0_4
        return response

    async def energy(request: web.Request) -> web.Response:
        request_id = request.match_info["request_id"]
        if not REQUEST_ID.fullmatch(request_id):
            return web.json_response({"error": "a request id is 32 hexadecimal digits"}, status=400)
        if request_energy is None:
            message = "unknown request id: per-request energy is off (no meter, or no gateway)"
            return web.json_response({"error": message}, status=404)
        known = request_energy.lookup(request_id.lower())
        if known is None:
            return web.json_response({"error": "unknown request id"}, status=404)
        body = {
            "request_id": known.request_id,
            "energy_j": known.energy_j,
            "tokens": known.tokens,
            "final": known.final,
        }
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/v1/requests/{request_id:[^/]*}/energy", energy)
    return app


def build_admin_app(loop: ControlLoop, check_policy: Callable[[str], None]) -> web.Application:
    """State and a runtime policy switch; `check_policy` raises ValueError for a spec it refuses."""

    async def state(_: web.Request) -> web.Response:
        decision = loop.last_decision
        return web.json_response(
            {
                "loop": status_json(loop.status()),
                "counters": dataclasses.asdict(loop.counters),
                "requests": {**dataclasses.asdict(loop.tracker.counters), "held": loop.tracker.held},
                "last_decision": None if decision is None else dataclasses.asdict(decision),
            }
        )

    async def set_policy(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return web.json_response({"error": 'the body must be JSON: {"policy": "<spec>"}'}, status=400)
        spec = body.get("policy") if isinstance(body, dict) else None
        if not isinstance(spec, str):
            return web.json_response({"error": 'the body must be {"policy": "<spec>"}'}, status=400)
        try:
            check_policy(spec)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        loop.request_policy(spec)
        return web.json_response({"policy": spec, "status": "switching at the next tick"}, status=202)

    app = web.Application()
    app.router.add_get("/admin/state", state)
    app.router.add_post("/admin/policy", set_policy)
    return app
