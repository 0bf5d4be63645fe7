"""Settings from `THROTTLLEM_*` environment variables, validated once at start-up.

Every setting has a default that works on the twin (and, for the sidecar, in the safest mode: no
clock is ever set unless `THROTTLLEM_ACTUATOR` says so); a bad value stops the program with the
variable's name and what it accepts. Command-line flags override these per invocation.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import yarl
from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agent.catalog import GPUS, MODELS
from agent.gpus.node_agent import check_pod_field
from agent.policy_registry import PolicySpec, ServedEngine, check_live_policy, policy_syntax
from agent.shipped import SHIPPED_MODELS_DIR
from agent.slo_presets import load_slo_preset

log = logging.getLogger(__name__)

ENV_PREFIX = "THROTTLLEM_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Where each engine serves its metrics by default: Triton on its metrics port, the others on their API port.
DEFAULT_METRICS_URLS = {
    "triton": "http://127.0.0.1:8002/metrics",
    "trtllm-serve": "http://127.0.0.1:8000/metrics",
    "vllm": "http://127.0.0.1:8000/metrics",
}


class ConfigError(ValueError):
    """An environment variable with a value we cannot use."""


def env_name(field: str) -> str:
    """The environment variable that sets `field`."""
    return f"{ENV_PREFIX}{field.upper()}"


def _problem(field: str, value: Any, message: str) -> str:
    """One problem, naming the variable and its value; None reads as unset, which is what it means."""
    return f"{env_name(field)}{' is unset' if value is None else f'={value!r}'}: {message}"


def in_catalog(value: str, info: ValidationInfo) -> str:
    """A `gpu` or `model` field's value, refused unless the catalog knows it."""
    known = GPUS if info.field_name == "gpu" else MODELS
    if value not in known:
        raise ValueError(f"must be one of {', '.join(sorted(known))}")
    return value


def log_level(value: str) -> str:
    """A log level's name in capitals, refused unless logging knows it as one of ours."""
    if value.upper() not in LOG_LEVELS:
        raise ValueError(f"must be one of {' | '.join(LOG_LEVELS)}")
    return value.upper()


# A DNS name: dot-separated labels of letters, digits and '-' (not at either end); '_' too, which
# Docker's and Consul's service names use and resolvers accept.
_DNS_NAME = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9_]([-A-Za-z0-9_]{0,61}[A-Za-z0-9_])?(\.[A-Za-z0-9_]([-A-Za-z0-9_]{0,61}[A-Za-z0-9_])?)*\.?"
)
_URL_FORM = "must be an http(s) URL like http://host:port[/path]"


def host_name(value: str) -> str:
    """A host to listen on or connect to: a DNS name or an IP literal, refused otherwise."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _DNS_NAME.fullmatch(value):
            raise ValueError("must be a DNS name (letters, digits, '-', '.') or an IP address") from None
    return value


# An HTTP field name is a token (RFC 9110 §5.1, §5.6.2); 256 characters is far beyond any in use.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,256}")


def header_name(value: str) -> str:
    """An HTTP header name (a token: letters, digits and !#$%&'*+-.^_`|~), refused otherwise."""
    if not _HEADER_NAME.fullmatch(value):
        raise ValueError("must be an HTTP header name: letters, digits and !#$%&'*+-.^_`|~, e.g. X-Tenant")
    return value


def _url_port(value: str) -> str:
    """The port as written in `value` ('' when none): yarl would read '+80' or '８０' as 80."""
    hostport = urlsplit(value).netloc.rpartition("@")[2]
    return (hostport.rpartition("]")[2] if hostport.startswith("[") else hostport).partition(":")[2]


def http_url(value: str) -> str:
    """An http(s) URL aiohttp can open: checked here so a typo fails at start, naming its variable.

    Refused: whitespace anywhere, a scheme other than http(s), a host that is neither a DNS name
    nor an IP literal, a port outside 1..65535 or not plain digits. Whether the host resolves is
    not checked: in Kubernetes a Service may appear after the pod starts, so that stays a runtime
    error (the adapter's messages name the variable).
    """
    if any(char.isspace() for char in value):
        raise ValueError(f"{_URL_FORM}, without whitespace")
    try:
        port = _url_port(value)
        if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"the port must be a number in 1..65535, got {port!r}")
        url = yarl.URL(value)  # what aiohttp parses the URL with
    except ValueError as exc:
        raise ValueError(f"{_URL_FORM}: {exc}") from None
    if url.scheme not in ("http", "https") or not url.raw_host:
        raise ValueError(_URL_FORM)
    try:
        host_name(url.raw_host)
    except ValueError as exc:
        raise ValueError(f"{_URL_FORM}: the host {url.raw_host!r} {exc}") from None
    return value


class Settings(BaseSettings):
    """What the twin, the benchmarks and the sidecar run with."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # What runs where: the engine and GPU models (catalog names) and the policy.
    gpu: str = Field(
        "a100-sxm4-80gb", description="GPU type (catalog name): the twin's, or the GPU the sidecar controls"
    )
    model: str = Field("llama3-8b", description="served model (catalog name)")
    tp: int = Field(1, ge=1, le=8, description="tensor-parallel degree of the engine")
    policy: str = Field("max", description=f"clock policy: {policy_syntax(live=True)}")
    seed: int = Field(0, ge=0, description="seed for every random choice of a run")
    models_dir: Path = Field(
        None,  # type: ignore[assignment]  # validated into the shipped directory
        validate_default=True,
        description="trained models: <gpu>/<model>-tp<N>/, lengths/; unset: those shipped in the package",
    )
    clock_change_delay_ms: float = Field(
        5.0, ge=0.0, le=1000.0, description="delay before a clock change takes effect (twin GPU)"
    )
    slo: str = Field(
        "mlperf-server",
        description="SLO preset: a shipped name (mlperf-server, mlperf-interactive, paper) or a .toml path",
    )

    # The engine the sidecar watches.
    engine: Literal["triton", "trtllm-serve", "vllm"] = Field("triton", description="engine kind")
    engine_metrics_url: str | None = Field(
        None,
        description="engine metrics URL; unset: http://127.0.0.1:8002/metrics for triton, "
        "http://127.0.0.1:8000/metrics for trtllm-serve and vllm",
    )
    engine_url: str = Field(
        "http://127.0.0.1:8000", description="engine HTTP API: where the gateway forwards requests"
    )
    engine_model: str | None = Field(
        None, description="model whose metrics to read when the engine serves several; unset: the only one"
    )
    max_batch_size: int = Field(256, ge=1, description="engine's max batch size (as built), for admission")
    max_num_tokens: int = Field(8192, ge=1, description="engine's max tokens per iteration, for admission")

    # The sidecar's listeners.
    gateway_host: str = Field("0.0.0.0", description="address the gateway (admission proxy) listens on")
    gateway_port: int = Field(
        0, ge=0, le=65535, description="gateway port; 0: no gateway (metrics-only mode, no admission control)"
    )
    gateway_max_body_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        le=1024**3,
        description="largest request body the gateway reads, in bytes; larger: 413 before it is read",
    )
    gateway_body_buffer_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1024,
        description="bytes of request bodies the gateway holds at once, all requests together; "
        "more wait 1 s, then 503",
    )
    gateway_body_timeout_s: float = Field(
        60.0, gt=0.0, le=3600.0, description="a request body must arrive within this many seconds; else 408"
    )
    gateway_header_timeout_s: float = Field(
        10.0, gt=0.0, le=600.0, description="seconds a request head may take from its first byte"
    )
    gateway_idle_timeout_s: float = Field(
        30.0, gt=0.0, le=3600.0, description="the gateway closes a keep-alive connection idle this long"
    )
    gateway_max_connections: int | None = Field(
        None,
        ge=1,
        description="client connections the gateway holds at once; more get 503 and are closed; "
        "unset: (RLIMIT_NOFILE - 64) / 2, at most 4096",
    )
    gateway_allow_paths: str | None = Field(
        None,
        description="more paths the gateway forwards, any method: comma-separated globs (* matches / too), "
        "e.g. /v2/models/*/stats; unset: the inference API only",
    )
    sidecar_host: str = Field("0.0.0.0", description="address of /healthz, /readyz and /metrics")
    sidecar_port: int = Field(9401, ge=0, le=65535, description="port of /healthz, /readyz and /metrics")
    admin_enabled: bool = Field(
        False, description="serve the admin API (GET /admin/state, POST /admin/policy) on 127.0.0.1 only"
    )
    admin_port: int = Field(9402, ge=0, le=65535, description="admin API port (always bound to 127.0.0.1)")

    # The GPU: how the clock is set and energy read.
    actuator: Literal["nvml", "twin", "dryrun", "node"] = Field(
        "dryrun",
        description="how clocks are set: nvml | twin | dryrun (decide and log, never set) | node (ask "
        "the node agent, `throttllem node`, over its socket)",
    )
    meter: Literal["nvml", "dcgm", "twin", "none"] = Field(
        "none", description="where energy is read: nvml | dcgm | twin | none"
    )
    gpu_uuid: str | None = Field(
        None, description="GPU to control, by NVML UUID (GPU-...); preferred to the index"
    )
    gpu_uuids: str | None = Field(
        None,
        description="every GPU of a TP-N engine, comma-separated NVML UUIDs (N of them); all are locked "
        "to one clock",
    )
    gpu_index: int | None = Field(None, ge=0, description="GPU to control, by NVML index (TP1 only)")
    twin_url: str | None = Field(None, description="twin server URL (for the twin actuator or meter)")
    dcgm_url: str = Field(
        "http://localhost:9400/metrics", description="dcgm-exporter metrics URL (dcgm meter)"
    )
    node_socket: Path = Field(
        Path("/run/throttllem/node.sock"), description="the node agent's Unix socket (node actuator)"
    )
    pod_namespace: str | None = Field(
        None, description="this pod's namespace (Downward API metadata.namespace), for the node agent"
    )
    pod_name: str | None = Field(None, description="this pod's name (metadata.name), for the node agent")
    pod_uid: str | None = Field(None, description="this pod's UID (metadata.uid), for the node agent")

    # The control loop and its watchdog.
    poll_interval_ms: int = Field(100, ge=10, le=10_000, description="control period: one poll and decision")
    telemetry_stale_s: float = Field(
        2.0, gt=0.0, le=600.0, description="engine telemetry older than this: stock clocks, admission open"
    )
    hold_queue_max: int = Field(256, ge=1, description="requests that may wait for admission; more get 429")
    max_hold_s: float = Field(5.0, gt=0.0, le=600.0, description="longest a request waits for admission")
    shutdown_timeout_s: float = Field(
        10.0, gt=0.0, le=600.0, description="after SIGTERM, exit hard if cleanup takes longer than this"
    )
    trace_sample_every: int = Field(
        50, ge=1, description="export one decision span in this many (every clock change is exported)"
    )
    energy_tenant_header: str | None = Field(
        None,
        description="request header whose value (cut to 64 characters) is the tenant label of "
        'throttllem_request_energy_joules, e.g. X-Tenant; unset: tenant=""',
    )
    energy_max_tenants: int = Field(
        64,
        ge=1,
        le=10_000,
        description="distinct tenant label values of throttllem_request_energy_joules, and as many model "
        'values; later ones are reported as "other"',
    )
    tokenizer: Path | None = Field(
        None, description="tokenizer.json the gateway counts prompt tokens with; unset: it estimates"
    )
    log_level: str = Field("INFO", description="DEBUG | INFO | WARNING | ERROR")

    @field_validator("gpu", "model")
    @classmethod
    def _in_catalog(cls, value: str, info: ValidationInfo) -> str:
        return in_catalog(value, info)

    @field_validator("models_dir", mode="before")
    @classmethod
    def _shipped_models_unless_given(cls, value: object) -> object:
        return SHIPPED_MODELS_DIR if value is None else value

    @field_validator("policy")
    @classmethod
    def _policy_spec(cls, value: str) -> str:
        try:
            PolicySpec.parse(value)
        except ValueError:
            raise ValueError(f"must be {policy_syntax(live=True)}") from None
        return value

    @field_validator("engine_metrics_url", "engine_url", "twin_url", "dcgm_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else http_url(value)

    @field_validator("gateway_host", "sidecar_host")
    @classmethod
    def _host(cls, value: str) -> str:
        return host_name(value)

    @field_validator("energy_tenant_header")
    @classmethod
    def _header_name(cls, value: str | None) -> str | None:
        return None if value is None else header_name(value)

    @field_validator("gateway_body_buffer_bytes")
    @classmethod
    def _body_buffer(cls, value: int, info: ValidationInfo) -> int:
        largest = info.data.get("gateway_max_body_bytes")
        if largest is not None and value < largest:
            raise ValueError(
                f"must be at least THROTTLLEM_GATEWAY_MAX_BODY_BYTES ({largest}): the largest body must fit"
            )
        return value

    @field_validator("gateway_allow_paths")
    @classmethod
    def _allow_paths(cls, value: str | None) -> str | None:
        if value is None:
            return None
        patterns = [part.strip() for part in value.split(",") if part.strip()]
        if not patterns or not all(pattern.startswith("/") for pattern in patterns):
            raise ValueError("must be comma-separated path patterns, each starting with / (e.g. /v1/models)")
        return ",".join(patterns)

    @field_validator("pod_namespace", "pod_name", "pod_uid")
    @classmethod
    def _pod_field(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else check_pod_field(str(info.field_name).removeprefix("pod_"), value)

    @field_validator("gpu_uuid")
    @classmethod
    def _uuid(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("GPU-"):
            raise ValueError(
                "must be a full GPU UUID as nvidia-smi -L prints it (GPU-...); MIG cannot lock clocks"
            )
        return value

    @field_validator("gpu_uuids")
    @classmethod
    def _uuid_list(cls, value: str | None) -> str | None:
        if value is None:
            return None
        uuids = [part.strip() for part in value.split(",")]
        if not all(uuid.startswith("GPU-") for uuid in uuids):
            raise ValueError("must be full GPU UUIDs (GPU-...), comma-separated; MIG cannot lock clocks")
        if len(set(uuids)) != len(uuids):
            raise ValueError("lists a GPU twice")
        return ",".join(uuids)

    @property
    def selected_gpu_uuids(self) -> tuple[str, ...]:
        """The engine's GPUs by UUID (THROTTLLEM_GPU_UUIDS or THROTTLLEM_GPU_UUID); empty when unset."""
        if self.gpu_uuids is not None:
            return tuple(self.gpu_uuids.split(","))
        return () if self.gpu_uuid is None else (self.gpu_uuid,)

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError("must be an existing tokenizer file (tokenizer.json)")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        return log_level(value)

    def sidecar_problems(self) -> list[str]:
        """What stops the sidecar running with these settings together; each names a variable."""
        problems = self._gpu_selection_problems()
        policy = PolicySpec.parse(self.policy).entry  # the field's validator has refused what does not parse
        if policy.needs_trained_models and not self.models_dir.is_dir():
            problems.append(_problem("models_dir", str(self.models_dir), "must be an existing directory"))
        else:
            engine = ServedEngine(GPUS[self.gpu], self.model, self.tp, self.models_dir)
            try:
                check_live_policy(self.policy, engine)
            except ValueError as exc:
                problems.append(_problem("policy", self.policy, str(exc)))
        if policy.runs_live and policy.gates_admission and not self.gateway_port:
            problems.append(
                _problem(
                    "gateway_port",
                    self.gateway_port,
                    f"must be set for THROTTLLEM_POLICY={self.policy}: it decides from the gateway's view "
                    "of every request, and without one it would never leave stock clocks",
                )
            )
        try:
            load_slo_preset(self.slo, self.model)
        except ValueError as exc:
            problems.append(_problem("slo", self.slo, str(exc)))
        if self.telemetry_stale_s * 1000 <= 2 * self.poll_interval_ms:
            problems.append(
                _problem(
                    "telemetry_stale_s",
                    self.telemetry_stale_s,
                    f"must exceed two control periods (THROTTLLEM_POLL_INTERVAL_MS={self.poll_interval_ms})",
                )
            )
        return problems

    def _gpu_selection_problems(self) -> list[str]:
        problems = []
        if self.twin_url is None and "twin" in (self.actuator, self.meter):
            users = " and ".join(
                f"{env_name(f)}=twin" for f in ("actuator", "meter") if getattr(self, f) == "twin"
            )
            problems.append(
                _problem(
                    "twin_url",
                    None,
                    f"needed when {users}: the twin server's HTTP URL, e.g. http://127.0.0.1:8000",
                )
            )
        selectors = [f for f in ("gpu_uuids", "gpu_uuid", "gpu_index") if getattr(self, f) is not None]
        if self.actuator == "node" and self.gpu_index is not None:
            problems.append(
                _problem(
                    "gpu_index",
                    self.gpu_index,
                    "the node actuator selects GPUs by UUID: set THROTTLLEM_GPU_UUIDS",
                )
            )
        if len(selectors) > 1:
            names = " and ".join(env_name(f) for f in selectors)
            problems.append(
                _problem(selectors[-1], getattr(self, selectors[-1]), f"{names} both select GPUs: keep one")
            )
        elif not selectors and (self.actuator == "nvml" or self.meter in ("nvml", "dcgm")):
            problems.append(
                _problem(
                    "gpu_uuid",
                    None,
                    "set it (or THROTTLLEM_GPU_UUIDS, or THROTTLLEM_GPU_INDEX) for the nvml actuator "
                    "and nvml or dcgm meters",
                )
            )
        elif selectors and self.twin_url is None:
            count = len(self.selected_gpu_uuids) or 1  # an index selects one GPU
            if count != self.tp:
                problems.append(
                    _problem(
                        selectors[0],
                        getattr(self, selectors[0]),
                        f"selects {count} GPU(s) but THROTTLLEM_TP={self.tp}: an engine of TP N runs on N "
                        "GPUs and one sidecar steers them all; list all N in THROTTLLEM_GPU_UUIDS",
                    )
                )
        return problems

    @property
    def metrics_url(self) -> str:
        """The engine metrics URL, or the engine kind's default."""
        return self.engine_metrics_url or DEFAULT_METRICS_URLS[self.engine]


def load_settings(overrides: Mapping[str, Any] | None = None, *, sidecar: bool = False) -> Settings:
    """Read and validate the environment (then `overrides`, from flags); errors name what to change.

    `sidecar` also checks the settings together as the sidecar uses them (`sidecar_problems`):
    other commands must not fail for a sidecar-only combination they never use.
    """
    settings = read_settings(Settings, ENV_PREFIX, overrides)
    problems = settings.sidecar_problems() if sidecar else []
    if problems:
        raise ConfigError("; ".join(problems))
    return settings


def settings_variables() -> set[str]:
    """Every THROTTLLEM_* variable some settings class of this process reads.

    Found by walking BaseSettings' subclasses (sidecar, coordinator, node agent...), so a class
    added later counts without being listed here; the command line imports every command's
    settings, so all are loaded.
    """
    names: set[str] = set()
    pending = list(BaseSettings.__subclasses__())
    while pending:
        model = pending.pop()
        pending.extend(model.__subclasses__())
        prefix = str(model.model_config.get("env_prefix", "")).upper()
        if prefix.startswith(ENV_PREFIX):
            names.update(f"{prefix}{field.upper()}" for field in model.model_fields)
    return names


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One line per THROTTLLEM_* variable in `environ` that no setting reads, with the name meant.

    Names are compared in capitals, as pydantic-settings reads them.
    """
    known = settings_variables()
    lines = []
    for name in sorted(environ):
        upper = name.upper()
        if upper.startswith(ENV_PREFIX) and upper not in known:
            # Compared without the prefix every name shares, which would make any two look close.
            close = difflib.get_close_matches(
                upper.removeprefix(ENV_PREFIX), [k.removeprefix(ENV_PREFIX) for k in known], n=1
            )
            meant = f"; did you mean {ENV_PREFIX}{close[0]}?" if close else ""
            lines.append(f"{name} is set but no setting reads it, so it is ignored{meant}")
    return lines


def warn_unknown_variables(environ: Mapping[str, str] = os.environ) -> None:
    """Log a WARNING per misspelt or unknown THROTTLLEM_* variable; never fail.

    A newer configuration must still start an older binary.
    """
    for line in unknown_variables(environ):
        log.warning("%s", line)


S = TypeVar("S", bound=BaseSettings)


def read_settings(model: type[S], prefix: str, overrides: Mapping[str, Any] | None = None) -> S:
    """`model` from the environment (then `overrides`); one ConfigError naming every bad variable."""
    overrides = dict(overrides or {})
    try:
        return model(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            message = err["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
            field = str(err["loc"][0])
            name = f"--{field.replace('_', '-')}" if field in overrides else f"{prefix}{field.upper()}"
            problems.append(f"{name}={err.get('input')!r}: {message}")
        raise ConfigError("; ".join(problems)) from None


def settings_table_markdown(model: type[BaseSettings] = Settings, prefix: str = ENV_PREFIX) -> str:
    """The README's table of every environment variable of `model`: name, default, meaning."""
    rows = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    for field, info in model.model_fields.items():
        default = info.default
        shown = (
            "unset"
            if default is None
            else f"`{str(default).lower() if isinstance(default, bool) else default}`"
        )
        meaning = (info.description or "").replace("|", "\\|").replace("<", "\\<")
        rows.append(f"| `{prefix}{field.upper()}` | {shown} | {meaning} |")
    return "\n".join(rows) + "\n"
