"""The sidecar process: builds every part from the settings, serves its ports, stops safely.

Start: open the engine adapter, the actuator and the meter → `loop.start()` clears any clock
lock a previous run left → listeners (sidecar port, gateway, admin) → one JSON line on stdout
(`{"event": "listening", ...}`, so callers find ports chosen with port 0) → the control loop and
the energy sampler run as named tasks of one TaskGroup.

Stop (the `stop` event, set on SIGTERM/SIGINT, or a task that died): cancel the tasks → open
admission and reset the clocks (`loop.shutdown`) *before* anything else, so a slow gateway drain
never keeps a GPU throttled → drain the gateway (its listener still open, new requests answered
503 + Retry-After rather than refused) → close listeners, adapter, meter → flush traces. A daemon thread
exits the process hard if that takes longer than THROTTLLEM_SHUTDOWN_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from agent.catalog import GPUS
from agent.config import Settings, env_name, warn_unknown_variables
from agent.control.admission import EngineLimits
from agent.domain import GpuSpec
from agent.engines import build_adapter
from agent.engines.base import EngineAdapter
from agent.gpus import Actuator, GpuControlError, Meter, open_engine_actuator, open_engine_meter
from agent.gpus.node_agent import NodeAgentTarget, PodIdentity
from agent.policy_registry import BuiltPolicy, PolicyContext, ServedEngine, build_policy, check_live_policy
from agent.predict.lengths import MaxTokensPredictor
from agent.sidecar.energy import EnergySampler
from agent.sidecar.http_api import build_admin_app, build_sidecar_app
from agent.sidecar.loop import ControlLoop, LoopConfig, PolicyBuilder
from agent.sidecar.metrics import SidecarMetrics
from agent.sidecar.request_energy import RequestEnergyLedger
from agent.sidecar.spans import DecisionSpans, RequestSpans
from agent.sidecar.tracker import RequestTracker
from agent.slo_presets import control_targets, load_slo_preset
from agent.telemetry import Tracing, setup_tracing

if TYPE_CHECKING:
    from agent.sidecar.gateway import Gateway

log = logging.getLogger(__name__)

ADMIN_HOST = "127.0.0.1"  # the admin API changes what the GPU does: never reachable from outside
GATEWAY_DRAIN_S = 5.0  # in-flight gateway requests get this long to finish on shutdown (clocks already reset)
HARD_EXIT_CODE = 70  # EX_SOFTWARE: cleanup hung; the clocks may still be locked
LEFT_LOCKED_EXIT_CODE = 1  # the reset on the way out failed: the clocks may still be locked
Announce = Callable[[dict[str, Any]], None]


def print_listening(ports: dict[str, Any]) -> None:
    """The one line on stdout that says the sidecar is up, and on which ports."""
    print(json.dumps({"event": "listening", **ports}), flush=True)


@dataclasses.dataclass(slots=True)
class Sidecar:
    """Every long-lived part of one sidecar, wired."""

    settings: Settings
    loop: ControlLoop
    tracker: RequestTracker
    energy: EnergySampler
    metrics: SidecarMetrics
    gateway_app: web.Application | None


class HardExitBackstop:
    """Exits the process if cleanup is not done in time: a hung reset must not hang the pod."""

    def __init__(self, timeout_s: float) -> None:
        self._timer = threading.Timer(timeout_s, self._fire)
        self._timer.daemon = True
        self._timeout_s = timeout_s

    def arm(self) -> None:
        """Start counting; call once."""
        self._timer.start()

    def cancel(self) -> None:
        """Cleanup finished in time."""
        self._timer.cancel()

    def _fire(self) -> None:
        log.critical(
            "cleanup took longer than %g s: exiting now; GPU clocks may still be locked", self._timeout_s
        )
        logging.shutdown()
        os._exit(HARD_EXIT_CODE)


def served_engine(settings: Settings, gpu: GpuSpec) -> ServedEngine:
    """The engine this sidecar steers, as its policies see it."""
    return ServedEngine(gpu, settings.model, settings.tp, settings.models_dir)


def policy_builder(settings: Settings, gpu: GpuSpec) -> PolicyBuilder:
    """Builds any live policy spec for the configured engine, SLO preset and models."""
    context = PolicyContext(
        served_engine(settings, gpu),
        control_targets(load_slo_preset(settings.slo, settings.model)),
        seed=settings.seed,
    )

    def build(spec: str, limits: EngineLimits | None) -> BuiltPolicy:
        return build_policy(spec, dataclasses.replace(context, limits=limits))

    return build


async def open_actuator(settings: Settings) -> Actuator:
    """The configured actuator of every GPU of the engine (dry-run observes NVML or the twin)."""
    pod = PodIdentity(settings.pod_namespace, settings.pod_name, settings.pod_uid)
    return await open_engine_actuator(
        settings.actuator,
        uuids=settings.selected_gpu_uuids,
        index=settings.gpu_index,
        twin_url=settings.twin_url,
        gpu_spec=GPUS[settings.gpu],
        node_agent=NodeAgentTarget(settings.node_socket, pod),
    )


async def open_meter(settings: Settings) -> Meter | None:
    """The configured meter; energy only feeds metrics, so one that cannot open is logged and skipped."""
    if settings.meter == "none":
        return None
    try:
        return await open_engine_meter(
            settings.meter,
            uuids=settings.selected_gpu_uuids,
            index=settings.gpu_index,
            twin_url=settings.twin_url,
            dcgm_url=settings.dcgm_url,
        )
    except GpuControlError as exc:
        log.error("energy meter %s unavailable, running without energy metrics: %s", settings.meter, exc)
        return None


def open_adapter(settings: Settings) -> EngineAdapter:
    """The engine adapter, selecting the configured model where the engine serves several."""
    opts: dict[str, Any] = {"setting": env_name("engine_metrics_url")}  # named when the host is wrong
    if settings.engine_model is not None:
        opts["model" if settings.engine == "triton" else "model_name"] = settings.engine_model
    return build_adapter(settings.engine, settings.metrics_url, **opts)


async def build_sidecar(settings: Settings, tracing: Tracing, stack: contextlib.AsyncExitStack) -> Sidecar:
    """Open and wire every part; `stack` closes what was opened, in reverse order."""
    adapter = open_adapter(settings)
    stack.push_async_callback(adapter.close)
    meter = await open_meter(settings)
    if meter is not None:
        stack.push_async_callback(meter.close)
    actuator = await open_actuator(settings)
    try:
        clocks = await actuator.supported_clocks_mhz()
    except BaseException:
        await actuator.close()
        raise
    gpu = dataclasses.replace(GPUS[settings.gpu], sm_clocks_mhz=clocks)  # the device's own clock list
    # Per-request energy needs both the meter's energy and the gateway's view of each request.
    ledger = RequestEnergyLedger() if meter is not None and settings.gateway_port else None
    request_spans = None if ledger is None else RequestSpans(ledger)
    tracker = RequestTracker(
        MaxTokensPredictor(), max_held=settings.hold_queue_max, max_hold_s=settings.max_hold_s, energy=ledger
    )
    loop = ControlLoop(
        adapter=adapter,
        actuator=actuator,
        tracker=tracker,
        gpu=gpu,
        policy_spec=settings.policy,
        build_policy=policy_builder(settings, gpu),
        config=LoopConfig(
            poll_interval_s=settings.poll_interval_ms / 1000,
            stale_after_s=settings.telemetry_stale_s,
            max_batch_size=settings.max_batch_size,
            max_num_tokens=settings.max_num_tokens,
        ),
    )
    stack.push_async_callback(loop.shutdown)
    gateway_app, gateway = build_gateway(settings, tracker, tracing, request_spans)
    energy = EnergySampler(meter, ledger=ledger)
    info = {"engine": settings.engine, "gpu": settings.gpu, "model": settings.model, "tp": str(settings.tp)}
    metrics = SidecarMetrics(loop, tracker, energy, info, gateway=gateway)
    loop.add_observer(metrics.observe)
    loop.add_observer(DecisionSpans(tracing.provider.get_tracer(__name__), settings.trace_sample_every))
    if ledger is not None and request_spans is not None:
        energy.add_observer(metrics.add_request_energy(ledger, settings.energy_max_tenants))
        energy.add_observer(request_spans.settle)
        stack.callback(request_spans.end_all)  # before tracing shuts down: no parked span is lost
    log.info(
        "engine %s at %s; actuator %s; meter %s; policy %s; SLO %s; gateway %s",
        settings.engine,
        adapter.name,
        actuator.name,
        "none" if meter is None else meter.name,
        settings.policy,
        settings.slo,
        f"to {settings.engine_url}"
        if gateway_app is not None
        else "off (metrics-only: no admission control)",
    )
    return Sidecar(settings, loop, tracker, energy, metrics, gateway_app)


def build_gateway(
    settings: Settings, tracker: RequestTracker, tracing: Tracing, request_spans: RequestSpans | None = None
) -> tuple[web.Application | None, Gateway | None]:
    """The gateway app when a gateway port is set, and the gateway (its counters feed /metrics)."""
    if not settings.gateway_port:
        return None, None
    from agent.sidecar.gateway import Gateway, GatewayLimits, build_gateway_app
    from agent.sidecar.prompt_tokens import build_prompt_counter

    allow = settings.gateway_allow_paths
    gateway = Gateway(
        tracker,
        settings.engine_url,
        prompt_tokens=build_prompt_counter(settings.tokenizer),
        tracer_provider=tracing.provider,
        limits=GatewayLimits(
            max_body_bytes=settings.gateway_max_body_bytes,
            body_buffer_bytes=settings.gateway_body_buffer_bytes,
            body_timeout_s=settings.gateway_body_timeout_s,
            header_timeout_s=settings.gateway_header_timeout_s,
            idle_timeout_s=settings.gateway_idle_timeout_s,
            max_connections=settings.gateway_max_connections,
            allow_paths=tuple(allow.split(",")) if allow else (),
        ),
        tenant_header=settings.energy_tenant_header,
        request_spans=request_spans,
    )
    return build_gateway_app(gateway), gateway


async def listen(
    app: web.Application, host: str, port: int, stack: contextlib.AsyncExitStack, **runner: Any
) -> int:
    """Serve `app` on host:port (0: any free port); returns the port."""
    sock = socket.create_server((host, port))
    stack.callback(sock.close)
    return await serve_on(app, sock, stack, **runner)


async def start_sock_site(runner: web.AppRunner, sock: socket.socket) -> None:
    """A plain site on a bound socket."""
    await web.SockSite(runner, sock).start()


async def serve_on(
    app: web.Application,
    sock: socket.socket,
    stack: contextlib.AsyncExitStack,
    start_site: Callable[[web.AppRunner, socket.socket], Awaitable[object]] = start_sock_site,
    **runner: Any,
) -> int:
    """Serve `app` on a socket already bound (through `start_site`); returns its port."""
    app_runner = web.AppRunner(app, **runner)
    await app_runner.setup()
    stack.push_async_callback(app_runner.cleanup)
    await start_site(app_runner, sock)
    return int(sock.getsockname()[1])


async def serve(settings: Settings, stop: asyncio.Event, announce: Announce = print_listening) -> str | None:
    """Run the sidecar until `stop` is set; always resets the clocks on the way out.

    Returns None once the clocks were reset, else why the reset failed. The ports are bound
    before any GPU is touched: a second sidecar started on a taken port exits without resetting
    the clock the running one holds.
    """
    backstop = HardExitBackstop(settings.shutdown_timeout_s)
    tracing = setup_tracing(settings)
    loop: ControlLoop | None = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            try:
                stack.callback(tracing.shutdown)
                sockets = bind_ports(settings, stack)
                sidecar = await build_sidecar(settings, tracing, stack)
                loop = sidecar.loop
                await sidecar.loop.start()
                ports = await start_listeners(sidecar, sockets, stack)
                if sidecar.gateway_app is not None:  # runs after the reset, before listeners close
                    stack.push_async_callback(drain_gateway, sidecar.gateway_app)
                # Pushed last, so it runs first: clocks are reset before the gateway drains.
                stack.push_async_callback(sidecar.loop.shutdown)
                await run_tasks(sidecar, stop, lambda: announce(ports))
            finally:
                backstop.arm()  # whatever ends the run, cleanup (the stack unwinding) is bounded
                log.info("stopping: admission open and clocks reset first, then closing")
    finally:
        backstop.cancel()
    log.info("stopped")
    return None if loop is None else loop.reset_error


@dataclasses.dataclass(frozen=True, slots=True)
class BoundPorts:
    """The sidecar's listening sockets, bound before anything else starts."""

    sidecar: socket.socket
    gateway: socket.socket | None
    admin: socket.socket | None


def bind_ports(settings: Settings, stack: contextlib.ExitStack | contextlib.AsyncExitStack) -> BoundPorts:
    """Bind every port the settings ask for; OSError (e.g. in use) names the variable and port."""

    def bind(host: str, port: int, field: str) -> socket.socket:
        try:
            sock = socket.create_server((host, port))
        except OSError as exc:
            raise OSError(
                exc.errno, f"{env_name(field)}: cannot listen on {host}:{port}: {exc.strerror}"
            ) from exc
        stack.callback(sock.close)
        return sock

    return BoundPorts(
        sidecar=bind(settings.sidecar_host, settings.sidecar_port, "sidecar_port"),
        gateway=bind(settings.gateway_host, settings.gateway_port, "gateway_port")
        if settings.gateway_port
        else None,
        admin=bind(ADMIN_HOST, settings.admin_port, "admin_port") if settings.admin_enabled else None,
    )


async def start_listeners(
    sidecar: Sidecar, sockets: BoundPorts, stack: contextlib.AsyncExitStack
) -> dict[str, Any]:
    """Serve the sidecar port, the gateway and the admin API on their bound sockets; the ports."""
    settings = sidecar.settings
    ports: dict[str, Any] = {
        "sidecar_port": await serve_on(
            build_sidecar_app(sidecar.loop, sidecar.metrics, sidecar.energy.ledger),
            sockets.sidecar,
            stack,
            access_log=None,
        ),
        "gateway_port": None,
        "admin_port": None,
    }
    if sidecar.gateway_app is not None and sockets.gateway is not None:
        ports["gateway_port"] = await serve_gateway(sidecar.gateway_app, sockets.gateway, stack)
    if settings.admin_enabled:
        engine = served_engine(settings, sidecar.loop.gpu)

        def check(spec: str) -> None:
            if check_live_policy(spec, engine).entry.gates_admission and sidecar.gateway_app is None:
                raise ValueError(f"policy {spec!r} needs the gateway, and this sidecar runs without one")

        assert sockets.admin is not None  # bound whenever the admin API is enabled
        ports["admin_port"] = await serve_on(
            build_admin_app(sidecar.loop, check), sockets.admin, stack, access_log=None
        )
    return ports


async def serve_gateway(app: web.Application, sock: socket.socket, stack: contextlib.AsyncExitStack) -> int:
    """Serve the gateway on its bound socket, through its connection budget; returns the port."""
    from agent.sidecar.gateway import GATEWAY_KEY, server_options, start_gateway_site

    return await serve_on(
        app,
        sock,
        stack,
        start_gateway_site,
        shutdown_timeout=GATEWAY_DRAIN_S,
        access_log=None,  # one span per request is the record; a log line each is noise at load
        **server_options(app[GATEWAY_KEY].limits),
    )


async def drain_gateway(app: web.Application) -> None:
    """New gateway requests get 503 + Retry-After while those in flight finish (bounded)."""
    from agent.sidecar.gateway import GATEWAY_KEY

    await app[GATEWAY_KEY].drain(GATEWAY_DRAIN_S)


async def run_tasks(sidecar: Sidecar, stop: asyncio.Event, ready: Callable[[], None]) -> None:
    """The control loop and the energy sampler, until `stop` is set (or one of them dies)."""
    async with asyncio.TaskGroup() as group:
        tasks = [
            group.create_task(sidecar.loop.run(), name="control-loop"),
            group.create_task(sidecar.energy.run(), name="energy-sampler"),
        ]
        ready()
        await stop.wait()
        for task in tasks:
            task.cancel()


def run_sidecar(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; 0 after a clean stop, 1 when the clocks could not be reset."""
    warn_unknown_variables()

    async def main() -> str | None:
        stop = asyncio.Event()
        running = asyncio.get_running_loop()

        def on_signal(name: str) -> None:
            if stop.is_set():
                log.warning("%s again: still cleaning up", name)
                return
            log.info("%s received", name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            running.add_signal_handler(sig, on_signal, sig.name)
        return await serve(settings, stop)

    reset_error = asyncio.run(main())
    sys.stdout.flush()
    if reset_error is not None:
        gpus = ",".join(settings.selected_gpu_uuids) or f"index {settings.gpu_index}"
        log.critical(
            "the GPU clocks may still be locked (%s): the reset failed: %s; reset them with "
            "`nvidia-smi -rgc -i <GPU>` on the node",
            gpus,
            reset_error,
        )
        return LEFT_LOCKED_EXIT_CODE
    return 0
