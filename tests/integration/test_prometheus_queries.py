"""The Grafana dashboard and the alert rules, evaluated by a real Prometheus scraping a real stack.

The stack is deploy/compose's, on loopback: the twin (Triton's HTTP API and metrics port) and the
sidecar steering its clock through the twin (actuator and meter `twin`, gateway on; compose runs no
node agent). Two `prometheus` processes scrape both every second and load
deploy/prometheus/alerts.yaml:

- `shipped`: deploy/compose/prometheus.yml itself, its targets pointed at these processes and its
  `pod` labels kept: the static-config stand-in for the `pod` label that Kubernetes service
  discovery gives both containers of a pod (the ServiceMonitor in overlays/prometheus-operator);
- `plain`: the same jobs without `labels:`, a static scrape as anyone's own Prometheus may have it,
  where no series has a `pod` label at all.

Requests go through the gateway for several seconds, then every template variable query, every
panel target (variables substituted as Grafana 11 does) and every alert expression is evaluated
through Prometheus' HTTP API. Any query error fails, and so does an empty answer, except for the
few listed below with their reason. On the plain scrape the `pod` variable has no value to offer,
and Grafana then selects All, whose `.*` must still fill every panel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import shutil
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from agent.bench.live_run import warm_up
from agent.bench.processes import ProcessGroup, SidecarSpec, free_port, start_sidecar, start_twin
from agent.catalog import gpu_spec, model_spec
from agent.twin.setup import TwinSetup
from agent.workloads import load_trace
from agent.workloads.loadgen import generate_load
from tests.unit.test_deploy import DASHBOARD, DEPLOY, metric_names, yaml_file
from tests.unit.test_deploy_safety import ALERTS

COMPOSE_PROMETHEUS = DEPLOY / "compose" / "prometheus.yml"
SETUP = TwinSetup(gpu_spec("a100-sxm4-80gb"), model_spec("llama3-8b"))  # compose's engine
SCRAPE_INTERVAL = "1s"
STEP_S = 1.0  # query_range resolution: one point per scrape
# Grafana's own variables. A 15 s rate window holds ~15 samples at this scrape interval (rate needs 2).
RATE_INTERVAL, INTERVAL = "15s", "5s"
PROMETHEUS_START_TIMEOUT_S = 30.0
PROMETHEUS_STOP_TIMEOUT_S = 10.0
PORT_ATTEMPTS = 3  # a port picked free can be taken before Prometheus binds it
QUERY_TIMEOUT_S = 10.0
LOAD_S = 8.0  # trace seconds replayed through the gateway
SETTLE_S = 2.0  # after the load: the last scrapes of the moved counters

# Series this stack cannot have, by metric name: who exports them, and why they are absent here.
ABSENT_HERE = {
    "DCGM_FI_DEV_SM_CLOCK": "dcgm-exporter's; it reads a real GPU through DCGM, and the twin has none",
    "kube_daemonset_status_number_unavailable": "kube-state-metrics'; there is no cluster here",
}
# Alert conditions a healthy stack need never meet (ThrottllemNotControlling is not listed: it holds
# while the sidecar starts, which both Prometheus scrape before the first request).
FALSE_HERE = {
    "ThrottllemSidecarDownWhileLocked": "the sidecar answers every scrape",
    "ThrottllemNodeAgentDown": "kube-state-metrics' series is absent here",
    "ThrottllemGpuLost": "the twin answers every clock call",
    "ThrottllemTelemetryStale": "the twin's metrics stay fresh",
    "ThrottllemLoopRestarting": "no control tick fails",
    "ThrottllemSloAtRisk": "negative slack under a clock lock is what the policy avoids; this load is light",
    "ThrottllemRequestsFailing": "every request is answered",
}
# Variables with nothing to offer on one scrape, by (scrape, variable).
EMPTY_VARIABLES = {
    ("plain", "pod"): "nothing gives a plain static scrape's series a `pod` label; Grafana selects All",
}

_LABEL_VALUES = re.compile(r"\s*label_values\(\s*(?:(?P<selector>.+),\s*)?(?P<label>\w+)\s*\)\s*")
_VARIABLE_REFERENCE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
_REGEX_SPECIALS = re.compile(r"[\\$^*{}\[\]'+?.()|]")


@dataclass(frozen=True, slots=True)
class Prometheus:
    """A running `prometheus` and where its HTTP API answers."""

    name: str
    url: str
    log_path: Path

    def log_tail(self, lines: int = 3) -> str:
        """The last lines of its log, joined into one line."""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return " | ".join(text.splitlines()[-lines:])


@dataclass(frozen=True, slots=True)
class Window:
    """The seconds (Unix time) the dashboard is looked at over: from before the first scrape to now."""

    start: float
    end: float

    @property
    def range(self) -> str:
        """Grafana's $__range for this window."""
        return f"{math.ceil(self.end - self.start)}s"


def prometheus_binary() -> str:
    """The `prometheus` on PATH; a clear failure when there is none (CI installs it: never skipped)."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("`prometheus` is not installed: apt-get install prometheus (.ci/run installs it)")
    return binary


def scrape_config(addresses: Mapping[str, str], *, keep_labels: bool) -> dict[str, Any]:
    """deploy/compose/prometheus.yml with each compose service's target at its address here.

    Without `keep_labels` its `labels:` go, which leaves a plain static scrape. The rules are
    loaded, and everything is scraped and evaluated every second.
    """
    config = yaml_file(COMPOSE_PROMETHEUS)
    config["global"] |= {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL}
    config["rule_files"] = [str(ALERTS)]
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            hosts = [target.rsplit(":", 1)[0] for target in static["targets"]]
            unknown = [host for host in hosts if host not in addresses]
            assert not unknown, f"{COMPOSE_PROMETHEUS.name} scrapes {unknown}, which this test does not run"
            static["targets"] = [addresses[host] for host in hosts]
            if not keep_labels:
                static.pop("labels", None)
    return config


@contextlib.asynccontextmanager
async def running_prometheus(
    binary: str, session: aiohttp.ClientSession, config: Mapping[str, Any], directory: Path, name: str
) -> AsyncIterator[Prometheus]:
    """`prometheus` with `config` on a free loopback port, ready; stopped however the block ends."""
    config_path, log_path = directory / f"{name}.yml", directory / f"{name}.log"
    config_path.write_text(yaml.safe_dump(dict(config)), encoding="utf-8")
    for attempt in range(1, PORT_ATTEMPTS + 1):
        address = f"127.0.0.1:{free_port()}"
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={directory / f'{name}-tsdb'}",
                f"--web.listen-address={address}",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        prometheus = Prometheus(name, f"http://{address}", log_path)
        try:
            if await _ready(session, prometheus, process):
                yield prometheus
                return
        finally:
            await _stop(process)
        if attempt == PORT_ATTEMPTS or "address already in use" not in prometheus.log_tail(20):
            pytest.fail(f"prometheus ({name}) did not start: {log_path}: {prometheus.log_tail()}")


async def _ready(
    session: aiohttp.ClientSession, prometheus: Prometheus, process: asyncio.subprocess.Process
) -> bool:
    """Wait until /-/ready answers 200; False if the process exits first."""
    deadline = time.monotonic() + PROMETHEUS_START_TIMEOUT_S
    while process.returncode is None:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(f"{prometheus.url}/-/ready", timeout=aiohttp.ClientTimeout(total=2)) as r:
                if r.status == 200:
                    return True
        if time.monotonic() > deadline:
            pytest.fail(f"prometheus ({prometheus.name}) not ready in {PROMETHEUS_START_TIMEOUT_S:g} s")
        await asyncio.sleep(0.1)
    return False


async def _stop(process: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL if it has not exited in time."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
    try:
        await asyncio.wait_for(process.wait(), PROMETHEUS_STOP_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()


class QueryError(AssertionError):
    """Prometheus refused a query; the message has its error."""


async def api(session: aiohttp.ClientSession, prometheus: Prometheus, path: str, **params: str) -> Any:
    """The `data` of one Prometheus HTTP API answer; QueryError for an error answer."""
    url = f"{prometheus.url}/api/v1/{path}"
    async with session.get(url, params=params, timeout=aiohttp.ClientTimeout(total=QUERY_TIMEOUT_S)) as r:
        status, text = r.status, await r.text()
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        raise QueryError(f"HTTP {status}, not JSON: {text[:200]}") from None
    if body.get("status") != "success":
        raise QueryError(f"{body.get('errorType')}: {body.get('error')}")
    return body["data"]


async def query_range(
    session: aiohttp.ClientSession, prometheus: Prometheus, expr: str, window: Window
) -> list[Any]:
    """`expr` at every step of `window`, as a Grafana time-series panel asks for it."""
    data = await api(
        session,
        prometheus,
        "query_range",
        query=expr,
        start=str(window.start),
        end=str(window.end),
        step=str(STEP_S),
    )
    return data["result"]


async def until_data(
    session: aiohttp.ClientSession, prometheus: Prometheus, expr: str, timeout_s: float
) -> None:
    """Wait until the instant query `expr` has a result."""
    deadline = time.monotonic() + timeout_s
    while not (await api(session, prometheus, "query", query=expr))["result"]:
        assert time.monotonic() < deadline, f"{prometheus.name}: no {expr} within {timeout_s:g} s"
        await asyncio.sleep(0.2)


# --- Grafana's side -----------------------------------------------------------------------------


def interpolate(expr: str, values: Mapping[str, str]) -> str:
    """`expr` with $name and ${name} replaced; unknown names stay, as Grafana leaves them."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return values.get(name, match.group())

    return _VARIABLE_REFERENCE.sub(value, expr)


def regex_value(variable: Mapping[str, Any], options: Sequence[str]) -> str:
    """A multi-value, include-All variable in a `=~` matcher, every option selected, as Grafana writes it.

    With no options Grafana selects All, which its `allValue` stands for; each option is
    regex-escaped inside the PromQL string, and several are one alternation.
    """
    if not options:
        assert variable.get("includeAll") and variable.get("allValue"), (
            f"${variable['name']} has no values and no All value: every panel using it would be empty"
        )
        return str(variable["allValue"])
    escaped = [_REGEX_SPECIALS.sub(lambda m: "\\\\" + m.group(), option) for option in options]
    return escaped[0] if len(escaped) == 1 else f"({'|'.join(escaped)})"


def panel_targets(panels: Sequence[Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    """(panel title, target) of every panel, collapsed rows' panels included."""
    found = []
    for panel in panels:
        found += panel_targets(panel.get("panels", []))
        found += [(str(panel["title"]), target) for target in panel.get("targets", [])]
    return found


def selectors(expr: str) -> list[str]:
    """Every vector selector (metric name and its matchers) in a PromQL expression."""
    names = metric_names(expr)
    pattern = re.compile(r'(?<![\w:"])([A-Za-z_:][\w:]*)\s*(\{(?:[^}"]|"(?:[^"\\]|\\.)*")*\})?')
    return sorted({m.group().strip() for m in pattern.finditer(expr) if m.group(1) in names})


def test_selectors_keep_each_metric_with_its_matchers() -> None:
    expr = 'sum by (pod) (rate(a_total{x="}",y=~"b|c"}[5m])) / on (job) up == 0 and b{pod="up"}'
    assert selectors(expr) == ['a_total{x="}",y=~"b|c"}', 'b{pod="up"}', "up"]


async def dashboard_problems(
    session: aiohttp.ClientSession, prometheus: Prometheus, window: Window
) -> list[str]:
    """What is wrong with the dashboard on this Prometheus: errors and unexpectedly empty answers."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    problems: list[str] = []
    values = {"__rate_interval": RATE_INTERVAL, "__interval": INTERVAL, "__range": window.range}
    span = {"start": str(window.start), "end": str(window.end)}
    for variable in dashboard["templating"]["list"]:
        name = variable["name"]
        if variable["type"] == "datasource":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        parsed = _LABEL_VALUES.fullmatch(query)
        if variable["type"] != "query" or parsed is None:
            problems.append(f"${name}: only label_values() query variables are evaluated here, got {query!r}")
            continue
        match = {} if parsed["selector"] is None else {"match[]": interpolate(parsed["selector"], values)}
        try:
            options = await api(session, prometheus, f"label/{parsed['label']}/values", **match, **span)
        except QueryError as exc:
            problems.append(f"${name}: {query}: {exc}")
            options = []
        if not options and (prometheus.name, name) not in EMPTY_VARIABLES:
            problems.append(f"${name}: {query} has no values")
        values[name] = regex_value(variable, options)
    for title, target in panel_targets(dashboard["panels"]):
        expr = interpolate(target["expr"], values)
        where = f"panel {title!r} {target['refId']}: {expr}"
        try:
            if target.get("instant"):
                data = await api(session, prometheus, "query", query=expr, time=str(window.end))
                result = data["result"]
            else:
                result = await query_range(session, prometheus, expr, window)
        except QueryError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if not result and not metric_names(target["expr"]) & ABSENT_HERE.keys():
            problems.append(f"{where}: no data")
    return problems


async def alert_problems(session: aiohttp.ClientSession, prometheus: Prometheus, window: Window) -> list[str]:
    """What is wrong with the alert rules on this Prometheus, evaluated as its rule manager does."""
    rules = [rule for group in yaml_file(ALERTS)["groups"] for rule in group["rules"]]
    problems: list[str] = []
    for rule in rules:
        name, expr = rule["alert"], rule["expr"]
        try:
            if not await query_range(session, prometheus, expr, window) and name not in FALSE_HERE:
                problems.append(f"alert {name}: its condition never held: {expr.strip()}")
            for selector in selectors(expr):
                if not await query_range(session, prometheus, selector, window) and not (
                    metric_names(selector) & ABSENT_HERE.keys()
                ):
                    problems.append(f"alert {name}: {selector} has no series")
        except QueryError as exc:
            problems.append(f"alert {name}: {exc}")
    loaded = [r for g in (await api(session, prometheus, "rules"))["groups"] for r in g["rules"]]
    if sorted(r["name"] for r in loaded) != sorted(r["alert"] for r in rules):
        problems.append(f"rules loaded: {sorted(r['name'] for r in loaded)}, not those of {ALERTS.name}")
    problems += [
        f"rule {r['name']}: health {r['health']} {r.get('lastError', '')}".rstrip()
        for r in loaded
        if r["health"] != "ok"
    ]
    return problems


async def label_problems(session: aiohttp.ClientSession, prometheus: Prometheus) -> list[str]:
    """Labels Prometheus had to rename: an exported label named like a target label (`pod`, say)."""
    labels = await api(session, prometheus, "labels")
    return [
        f"{label}: an exported label clashed with a target label" for label in labels if "exported_" in label
    ]


def test_dashboard_and_alerts_have_data_on_a_real_prometheus(tmp_path: Path) -> None:
    binary = prometheus_binary()
    requests = load_trace("azure-conv").window(600.0, LOAD_S).requests(max_tokens=128)

    async def scenario() -> tuple[dict[str, list[str]], int]:
        async with (
            ProcessGroup(tmp_path / "logs") as group,
            aiohttp.ClientSession() as session,
            contextlib.AsyncExitStack() as prometheus_stack,
        ):
            twin = await start_twin(group, SETUP)
            sidecar = await start_sidecar(group, twin, SETUP, SidecarSpec(inherit_otel=False))
            addresses = {
                "twin": twin.metrics_url.split("/")[2],
                "sidecar": sidecar.url.split("/")[2],
            }
            start = time.time() - STEP_S
            prometheus = [
                await prometheus_stack.enter_async_context(
                    running_prometheus(
                        binary, session, scrape_config(addresses, keep_labels=keep), tmp_path, name
                    )
                )
                for name, keep in (("shipped", True), ("plain", False))
            ]
            # Both see the sidecar start up (no engine work yet), then the loop takes control.
            starting = 'throttllem_loop_mode{throttllem_loop_mode="starting"} == 1'
            await asyncio.gather(*(until_data(session, p, starting, 20.0) for p in prometheus))
            await warm_up(session, sidecar)
            assert sidecar.gateway_url is not None
            report = await generate_load(sidecar.gateway_url, "ensemble", requests)
            await asyncio.sleep(SETTLE_S)
            window = Window(start, time.time())
            problems = {
                p.name: [
                    *await dashboard_problems(session, p, window),
                    *await alert_problems(session, p, window),
                    *await label_problems(session, p),
                ]
                for p in prometheus
            }
        return problems, sum(not r.answered for r in report.results)

    problems, unanswered = asyncio.run(scenario())
    assert unanswered == 0  # else the counters the panels show moved for the wrong reasons
    summary = "\n".join(f"{name}: {problem}" for name, found in problems.items() for problem in found)
    assert not summary, "\n" + summary
