"""throttllem's own commands as real processes on loopback, always stopped: for demos, benches and tests.

    async with ProcessGroup(log_dir) as group:
        twin = await start_twin(group, setup)                             # `twin serve`, ports 0
        sidecar = await start_sidecar(group, twin, setup, SidecarSpec())  # `run`, twin actuator
        # (start_twin(..., api="vllm"): the twin speaks vLLM's API; the sidecar then reads it as vLLM)
        load = await start_load(group, LoadSpec(url=sidecar.gateway_url, ...), on_line)  # `load`
    # on the way out, every child still running gets SIGTERM, newest first, then SIGKILL if it hangs

Newest first matters: the sidecar must reset the twin's clocks while the twin still answers.
Each child runs with this interpreter (`python -m agent.cli`), so it is the code under test, not
whatever `throttllem` is first on PATH. Its stderr goes to `<log_dir>/<name>.log`; its stdout is
read line by line by a pump task (a full pipe would block the child): a server's first line is
its `{"event": "listening", ...}` announcement, and every other line goes to an optional callback.
A child that exits or stays silent before announcing is a `ProcessStartError` quoting its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from agent.shipped import SHIPPED_MODELS_DIR
from agent.twin.setup import TwinSetup
from agent.workloads.loadgen import TRITON_MODEL_NAME, LoadApi

START_TIMEOUT_S = 60.0  # the CLI imports a lot; a loaded 2-core machine needs the margin
STOP_TIMEOUT_S = 15.0  # the sidecar's own hard-exit backstop is 10 s
LOG_TAIL_LINES = 3
PORT_ATTEMPTS = 3  # a port picked free can be taken before the child binds it
LOOPBACK = "127.0.0.1"
LineHandler = Callable[[str], None]
T = TypeVar("T")
# The engines the twin emulates (`twin serve --api`), each read by the sidecar adapter of the same
# name (THROTTLLEM_ENGINE), and the API a load generator speaks to each: chat for vLLM (its
# users' usual route), completions for trtllm-serve, so both OpenAI routes are exercised.
ENGINE_LOAD_APIS = {
    "triton": LoadApi.TRITON,
    "trtllm-serve": LoadApi.OPENAI_COMPLETIONS,
    "vllm": LoadApi.OPENAI_CHAT,
}
ENGINES = tuple(ENGINE_LOAD_APIS)


class ProcessStartError(RuntimeError):
    """A child that exited, or said nothing, before it was ready; the message quotes its log."""


def throttllem_argv(*args: str) -> list[str]:
    """The command line of one `throttllem` subcommand, run by this interpreter."""
    return [sys.executable, "-m", "agent.cli", *args]


async def cancel_on_sigterm(work: Coroutine[Any, Any, T]) -> T:
    """Run `work`; SIGTERM cancels it, so every `ProcessGroup` it opened stops its children.

    Without this a demo killed by a supervisor (or a CI timeout) would leave its twin and sidecar
    running. SIGINT needs nothing: `asyncio.run` already turns it into a cancellation.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await task
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def free_port(host: str = LOOPBACK) -> int:
    """A port nobody listens on right now (for listeners whose 0 means 'off', like the gateway)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def child_env(settings: Mapping[str, str], *, inherit_otel: bool = True) -> dict[str, str]:
    """Our environment without THROTTLLEM_* (and OTEL_* unless inherited), plus `settings`."""
    dropped = ("THROTTLLEM_",) if inherit_otel else ("THROTTLLEM_", "OTEL_")
    env = {key: value for key, value in os.environ.items() if not key.startswith(dropped)}
    env.update(settings)
    return env


@dataclass(slots=True)
class Child:
    """One started process: its announcement, its log and its stdout pump."""

    name: str
    process: asyncio.subprocess.Process
    log_path: Path
    announced: dict[str, Any] = field(default_factory=dict)  # the listening line; empty: none expected
    pump: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        """The operating-system process id."""
        return self.process.pid

    @property
    def running(self) -> bool:
        """Not exited yet (as far as the event loop has noticed)."""
        return self.process.returncode is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last non-empty lines of the child's stderr, joined into one line."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return " | ".join([line.strip() for line in text.splitlines() if line.strip()][-lines:])

    def kill(self) -> None:
        """SIGKILL, as a crash would end it (no cleanup in the child)."""
        if self.running:
            self.process.kill()

    async def wait(self, timeout_s: float | None = None) -> int:
        """Until the child exits and its stdout is drained; its exit code."""
        code = await asyncio.wait_for(self.process.wait(), timeout_s)
        if self.pump is not None:
            await self.pump
        return code

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit within `timeout_s`. Its exit code."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
        try:
            return await self.wait(timeout_s)
        except TimeoutError:
            self.kill()
            return await self.wait()


class ProcessGroup:
    """Children started in one place and stopped, newest first, however the block ends."""

    def __init__(self, log_dir: Path, stop_timeout_s: float = STOP_TIMEOUT_S) -> None:
        self.log_dir = log_dir
        self.stop_timeout_s = stop_timeout_s
        self.children: list[Child] = []

    async def __aenter__(self) -> ProcessGroup:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop_all()

    async def stop_all(self) -> None:
        """Stop every child still running, newest first; interrupted, kill whatever is left."""
        try:
            for child in reversed(self.children):
                await child.stop(self.stop_timeout_s)
        except BaseException:
            for child in self.children:
                child.kill()
            raise

    async def start(
        self,
        name: str,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        announces: bool = True,
        on_line: LineHandler | None = None,
        timeout_s: float = START_TIMEOUT_S,
        nofile: int | None = None,
    ) -> Child:
        """Start `throttllem <args>`; for a server (`announces`), wait for its listening line.

        `nofile` caps the child's open descriptors (RLIMIT_NOFILE), as a container's ulimit would.
        """
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                *throttllem_argv(*args),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env=None if env is None else dict(env),
                preexec_fn=None if nofile is None else partial(_limit_descriptors, nofile),
            )
        child = Child(name, process, log_path)
        self.children.append(child)
        first: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        if not announces:
            first.set_result(None)
        child.pump = asyncio.create_task(_pump(process, first, on_line), name=f"{name}-stdout")
        if announces:
            child.announced = await self._announcement(child, first, timeout_s)
        return child

    async def _announcement(
        self, child: Child, first: asyncio.Future[str | None], timeout_s: float
    ) -> dict[str, Any]:
        """The child's listening line; `ProcessStartError` (the child stopped) when there is none."""
        try:
            line = await asyncio.wait_for(asyncio.shield(first), timeout_s)
        except TimeoutError:
            await child.stop(self.stop_timeout_s)
            raise ProcessStartError(
                f"{child.name} did not announce its ports within {timeout_s:g} s; {_quote_log(child)}"
            ) from None
        if line is None:
            code = await child.wait()
            raise ProcessStartError(f"{child.name} exited with code {code} on start; {_quote_log(child)}")
        try:
            announced = json.loads(line)
        except json.JSONDecodeError:
            announced = None
        if not isinstance(announced, dict) or announced.get("event") != "listening":
            await child.stop(self.stop_timeout_s)
            raise ProcessStartError(
                f"{child.name} printed {line.strip()[:200]!r} instead of its listening line"
            )
        return announced


def _limit_descriptors(count: int) -> None:
    """In the child before exec: at most `count` open descriptors."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))


def _quote_log(child: Child) -> str:
    tail = child.log_tail()
    return f"{child.log_path}: {tail}" if tail else f"nothing in {child.log_path}"


async def _pump(
    process: asyncio.subprocess.Process, first: asyncio.Future[str | None], on_line: LineHandler | None
) -> None:
    """Read stdout to the end: the first line to `first` (unless already set), the rest to `on_line`."""
    assert process.stdout is not None
    async for raw in process.stdout:
        line = raw.decode("utf-8", errors="replace")
        if not first.done():
            first.set_result(line)
        elif on_line is not None:
            on_line(line)
    if not first.done():
        first.set_result(None)


@dataclass(frozen=True, slots=True)
class Twin:
    """A running `throttllem twin serve` and where to reach it."""

    child: Child
    http_url: str  # the serving API (Triton's or an OpenAI one) and the GPU control endpoint
    metrics_url: str  # the engine's metrics: Triton's metrics port, else the HTTP port; /metrics path
    api: str = "triton"  # the engine it emulates: one of ENGINES
    model_name: str = TRITON_MODEL_NAME  # the model it serves under that API

    @property
    def gpu_url(self) -> str:
        """The twin GPU's state document."""
        return f"{self.http_url}/twin/v1/gpu"


def setup_args(setup: TwinSetup) -> list[str]:
    """The `add_setup_args` flags that describe `setup`, so a child runs the very same twin."""
    engine = setup.engine
    args = [
        "--gpu", setup.gpu.name,
        "--model", setup.model.name,
        "--tp", str(setup.tp),
        "--max-batch-size", str(engine.max_batch_size),
        "--max-num-tokens", str(engine.max_num_tokens),
        "--tokens-per-block", str(engine.tokens_per_block),
        "--scheduler", engine.scheduler.value,
        "--clock-delay-ms", repr(setup.clock_change_delay_s * 1000.0),
        "--noise", repr(setup.noise),
        "--seed", str(setup.seed),
    ]  # fmt: skip
    return [*args, "--chunked-context"] if engine.chunked_context else args


async def start_twin(
    group: ProcessGroup,
    setup: TwinSetup,
    *,
    api: str = "triton",
    name: str = "twin",
    http_port: int = 0,
    metrics_port: int = 0,
    time_scale: float = 1.0,
    metrics_interval_ms: float = 500.0,
) -> Twin:
    """`throttllem twin serve --api <api>` on loopback (ports 0: any free ones).

    Triton serves its metrics on a port of their own (`metrics_port`, refreshed every
    `metrics_interval_ms`); vLLM and trtllm-serve on the HTTP port, so both are Triton's only.
    """
    if api not in ENGINES:
        raise ValueError(f"api must be one of {', '.join(ENGINES)}, got {api!r}")
    args = [
        "twin", "serve", *setup_args(setup),
        "--api", api,
        "--host", LOOPBACK,
        "--http-port", str(http_port),
        "--time-scale", repr(time_scale),
    ]  # fmt: skip
    if api == "triton":
        args += ["--metrics-port", str(metrics_port), "--metrics-interval-ms", repr(metrics_interval_ms)]
    child = await group.start(name, args, env=child_env({}))
    announced = child.announced
    http = f"http://{LOOPBACK}:{announced['http_port']}"
    metrics = http if api != "triton" else f"http://{LOOPBACK}:{announced['metrics_port']}"
    return Twin(child, http, f"{metrics}/metrics", api, str(announced["model_name"]))


@dataclass(frozen=True, slots=True)
class NodeAgent:
    """A running `throttllem node` and its socket."""

    child: Child
    socket: Path

    def sidecar_settings(self) -> dict[str, str]:
        """What a sidecar (`SidecarSpec.settings`) needs to steer its GPU through this agent."""
        return {"ACTUATOR": "node", "NODE_SOCKET": str(self.socket)}


async def start_node_agent(
    group: ProcessGroup,
    gpu_urls: Sequence[str],
    socket_path: Path,
    *,
    name: str = "node",
    lease_ttl_s: float = 1.0,
    timeout_s: float = START_TIMEOUT_S,
) -> NodeAgent:
    """`throttllem node` steering twin GPUs (one per URL), no pod check; ready once its socket is."""
    socket_path.unlink(missing_ok=True)
    env = child_env(
        {
            "THROTTLLEM_NODE_SOCKET": str(socket_path),
            "THROTTLLEM_NODE_GPU_BACKEND": "twin",
            "THROTTLLEM_NODE_TWIN_URLS": ",".join(gpu_urls),
            "THROTTLLEM_NODE_POD_CHECK": "none",
            "THROTTLLEM_NODE_LEASE_TTL_S": repr(lease_ttl_s),
        },
        inherit_otel=False,
    )
    child = await group.start(name, ["node"], env=env, announces=False)
    loop = asyncio.get_running_loop()
    began = loop.time()
    while not socket_path.exists():
        if not child.running:
            raise ProcessStartError(
                f"{name} exited with code {await child.wait()} on start; {_quote_log(child)}"
            )
        if loop.time() - began > timeout_s:
            await child.stop()
            raise ProcessStartError(
                f"{name} did not open {socket_path} within {timeout_s:g} s; {_quote_log(child)}"
            )
        await asyncio.sleep(0.02)
    return NodeAgent(child, socket_path)


@dataclass(frozen=True, slots=True)
class SidecarSpec:
    """How to run `throttllem run` next to a twin (everything else: the sidecar's defaults)."""

    policy: str = "throttllem"
    slo: str = "mlperf-server"
    gateway: bool = True
    actuator: str = "twin"
    meter: str = "twin"
    models_dir: Path = SHIPPED_MODELS_DIR
    engine: str | None = None  # THROTTLLEM_ENGINE; None: the engine the twin emulates (`Twin.api`)
    settings: Mapping[str, str] = field(default_factory=dict)  # more THROTTLLEM_<KEY> values, by key
    inherit_otel: bool = True  # pass this environment's OTEL_* variables on
    env: Mapping[str, str] = field(default_factory=dict)  # other variables, verbatim (e.g. OTEL_*)
    nofile: int | None = None  # RLIMIT_NOFILE of the sidecar; None: inherited


@dataclass(frozen=True, slots=True)
class Sidecar:
    """A running `throttllem run` and where to reach it."""

    child: Child
    url: str  # /healthz, /readyz, /metrics
    gateway_url: str | None  # None: no gateway

    @property
    def metrics_url(self) -> str:
        """The sidecar's Prometheus page."""
        return f"{self.url}/metrics"


def sidecar_env(spec: SidecarSpec, twin: Twin, setup: TwinSetup, gateway_port: int) -> dict[str, str]:
    """The THROTTLLEM_* environment of a sidecar watching `twin`, which runs `setup`."""
    settings = {
        "GPU": setup.gpu.name,
        "MODEL": setup.model.name,
        "TP": str(setup.tp),
        "MAX_BATCH_SIZE": str(setup.engine.max_batch_size),
        "MAX_NUM_TOKENS": str(setup.engine.max_num_tokens),
        "ENGINE": spec.engine or twin.api,
        "ENGINE_METRICS_URL": twin.metrics_url,
        "ENGINE_URL": twin.http_url,
        "TWIN_URL": twin.http_url,
        "ACTUATOR": spec.actuator,
        "METER": spec.meter,
        "POLICY": spec.policy,
        "SLO": spec.slo,
        "MODELS_DIR": str(spec.models_dir.resolve()),
        "SIDECAR_HOST": LOOPBACK,
        "SIDECAR_PORT": "0",
        "GATEWAY_HOST": LOOPBACK,
        "GATEWAY_PORT": str(gateway_port),
        **spec.settings,
    }
    named = {f"THROTTLLEM_{key.upper()}": value for key, value in settings.items()}
    return child_env({**named, **spec.env}, inherit_otel=spec.inherit_otel)


async def start_sidecar(
    group: ProcessGroup, twin: Twin, setup: TwinSetup, spec: SidecarSpec, *, name: str = "sidecar"
) -> Sidecar:
    """`throttllem run` steering `twin`; retries with another gateway port if its pick was taken."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        gateway_port = free_port() if spec.gateway else 0
        try:
            child = await group.start(
                name if attempt == 1 else f"{name}-{attempt}",
                ["run"],
                env=sidecar_env(spec, twin, setup, gateway_port),
                nofile=spec.nofile,
            )
        except ProcessStartError as exc:
            if attempt == PORT_ATTEMPTS or "address already in use" not in str(exc).lower():
                raise
            continue
        gateway = child.announced.get("gateway_port")
        return Sidecar(
            child,
            f"http://{LOOPBACK}:{child.announced['sidecar_port']}",
            None if gateway is None else f"http://{LOOPBACK}:{gateway}",
        )
    raise AssertionError("unreachable: the last attempt raises")


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What `throttllem load` replays, and against which URL."""

    url: str
    api: str = LoadApi.TRITON.value  # `load --api`: triton, openai-completions or openai-chat
    trace: str = "azure-conv"
    start_s: float = 0.0
    duration_s: float = 60.0  # trace seconds (before rate scaling)
    rate_scale: float = 1.0
    max_tokens: int | None = None  # client max_tokens; None: the traced output length
    slo: str = "mlperf-server"
    model: str = "llama3-8b"  # catalog model whose SLO targets apply
    model_name: str | None = None  # the model the server serves; None: load's default for the API
    energy_url: str | None = None  # the sidecar's HTTP port, to read each request's energy from


def load_args(spec: LoadSpec) -> list[str]:
    """The `throttllem load --events` command line for `spec` (per-request JSON lines on stdout)."""
    args = [
        "load", "--events",
        "--url", spec.url,
        "--api", spec.api,
        "--model", spec.model,
        "--trace", spec.trace,
        "--start", repr(spec.start_s),
        "--duration", repr(spec.duration_s),
        "--rate-scale", repr(spec.rate_scale),
        "--slo", spec.slo,
    ]  # fmt: skip
    optional = (
        ("--model-name", spec.model_name),
        ("--energy-url", spec.energy_url),
        ("--max-tokens", None if spec.max_tokens is None else str(spec.max_tokens)),
    )
    return args + [part for flag, value in optional if value is not None for part in (flag, value)]


async def start_load(
    group: ProcessGroup, spec: LoadSpec, on_line: LineHandler, *, name: str = "load"
) -> Child:
    """`throttllem load --events`: every stdout line (one JSON event) goes to `on_line`."""
    return await group.start(name, load_args(spec), env=child_env({}), announces=False, on_line=on_line)
