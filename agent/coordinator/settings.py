"""The coordinator's settings, from THROTTLLEM_COORDINATOR_* environment variables; clear errors.

Read like the sidecar's (`agent.config`): each bad value fails at start naming its variable.
Capacities come from the `capacity.json` profiles beside the IPS models unless given.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agent.config import ConfigError, host_name, in_catalog, log_level, read_settings, settings_table_markdown
from agent.coordinator.names import DEFAULT_DEPLOYMENT, DEFAULT_SERVICE, deployment_name
from agent.shipped import SHIPPED_MODELS_DIR

COORDINATOR_PREFIX = "THROTTLLEM_COORDINATOR_"
# Kubernetes object names: a Service's is a DNS-1035 label, a Deployment's a DNS-1123 subdomain.
_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def coordinator_env(field: str) -> str:
    """The environment variable that sets `field`."""
    return f"{COORDINATOR_PREFIX}{field.upper()}"


class CoordinatorSettings(BaseSettings):
    """What the coordinator sizes, how cautiously, and where it listens."""

    model_config = SettingsConfigDict(env_prefix=COORDINATOR_PREFIX, extra="ignore", frozen=True)

    backend: Literal["local", "kubernetes"] = Field(
        "local",
        description="where engines run: local (processes on loopback) | kubernetes (a Deployment per size)",
    )
    gpu: str = Field("a100-sxm4-40gb", description="GPU of every engine (catalog name)")
    model: str = Field("llama2-13b", description="served model (catalog name)")
    sizes: str = Field("1,2,4", description="tensor-parallel sizes the coordinator may run, comma-separated")
    initial_size: int | None = Field(None, ge=1, description="size started first; unset: the smallest")
    capacities: str | None = Field(
        None,
        description="req/s each size serves within the SLO, as size:rps,...; unset: the capacity.json "
        "profiles in the models directory",
    )
    capacity_trace: str = Field("azure-conv", description="whose request mix the capacity profiles are for")
    slo: str = Field("mlperf-server", description="SLO preset the capacities and the sidecars hold to")
    models_dir: Path = Field(
        None,  # type: ignore[assignment]  # validated into the shipped directory
        validate_default=True,
        description="IPS models and capacity profiles; unset: those shipped in the package",
    )
    period_s: float = Field(10.0, gt=0.0, le=600.0, description="seconds between sizing decisions")
    ready_poll_s: float = Field(
        1.0,
        gt=0.0,
        le=600.0,
        description="while a shadow starts, seconds between looks at whether it is ready",
    )
    headroom: float = Field(0.8, gt=0.0, le=1.0, description="plan for this fraction of each size's capacity")
    grace_s: float = Field(
        60.0, ge=0.0, description="a smaller size must suffice this long before scaling down"
    )
    shadow_timeout_s: float = Field(120.0, gt=0.0, description="abandon a new engine not ready by then")
    drain_timeout_s: float = Field(
        300.0, gt=0.0, description="stop a draining engine after this, busy or not"
    )
    min_drain_s: float = Field(10.0, ge=0.0, description="a draining engine waits at least this long")
    host: str = Field("0.0.0.0", description="address of the coordinator's /healthz and /metrics")
    port: int = Field(9500, ge=0, le=65535, description="port of /healthz and /metrics")
    router_host: str = Field("127.0.0.1", description="local: address clients send requests to")
    router_port: int = Field(9100, ge=0, le=65535, description="local: the router's port")
    policy: str = Field("throttllem", description="local: the clock policy of every sidecar")
    namespace: str | None = Field(
        None, description="kubernetes: the engines' namespace; unset: the coordinator pod's own"
    )
    service: str = Field(
        DEFAULT_SERVICE, description="kubernetes: the Service whose selector moves between sizes"
    )
    deployment: str = Field(
        DEFAULT_DEPLOYMENT,
        description="kubernetes: the Deployment of each size, {size} standing for the TP degree",
    )
    lease_name: str = Field(
        "throttllem-coordinator", description="kubernetes: the Lease coordinators elect by"
    )
    lease_s: int = Field(30, ge=2, le=600, description="kubernetes: a lapsed Lease is taken over after this")
    identity: str | None = Field(
        None, description="kubernetes: this candidate's name; unset: the pod's HOSTNAME"
    )
    log_level: str = Field("INFO", description="DEBUG | INFO | WARNING | ERROR")

    @field_validator("models_dir", mode="before")
    @classmethod
    def _shipped_models_unless_given(cls, value: object) -> object:
        return SHIPPED_MODELS_DIR if value is None else value

    @field_validator("gpu", "model")
    @classmethod
    def _in_catalog(cls, value: str, info: ValidationInfo) -> str:
        return in_catalog(value, info)

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, value: str) -> str:
        return ",".join(str(s) for s in sorted(parse_sizes(value)))

    @field_validator("capacities")
    @classmethod
    def _capacities(cls, value: str | None) -> str | None:
        if value is not None:
            parse_capacities(value)
        return value

    @field_validator("service")
    @classmethod
    def _service(cls, value: str) -> str:
        if not _DNS_LABEL.fullmatch(value):
            raise ValueError("must be a Service name: lower-case letters, digits and '-', at most 63")
        return value

    @field_validator("deployment")
    @classmethod
    def _deployment(cls, value: str) -> str:
        try:
            names = {deployment_name(size, value) for size in (1, 2)}
        except (KeyError, IndexError, ValueError):
            raise ValueError("must name each size's Deployment with {size} and no other {field}") from None
        if len(names) != 2 or not all(_DNS_SUBDOMAIN.fullmatch(name) for name in names):
            raise ValueError(
                "must contain {size} and give Deployment names (lower-case letters, digits, '-' and '.')"
            )
        return value

    @field_validator("host", "router_host")
    @classmethod
    def _host(cls, value: str) -> str:
        return host_name(value)

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        return log_level(value)

    @property
    def tp_sizes(self) -> tuple[int, ...]:
        """The sizes, smallest first."""
        return tuple(int(part) for part in self.sizes.split(","))

    def deployment_of(self, size: int) -> str:
        """The Deployment of engine size `size`."""
        return deployment_name(size, self.deployment)

    @property
    def first_size(self) -> int:
        """The size started first."""
        return self.initial_size if self.initial_size is not None else self.tp_sizes[0]

    def problems(self) -> list[str]:
        """What stops the coordinator with these settings together; each names a variable."""
        problems = []
        if self.initial_size is not None and self.initial_size not in self.tp_sizes:
            problems.append(
                f"{coordinator_env('initial_size')}={self.initial_size}: must be one of {self.sizes}"
            )
        if self.capacities is not None:
            given = set(parse_capacities(self.capacities))
            if given != set(self.tp_sizes):
                problems.append(
                    f"{coordinator_env('capacities')}={self.capacities!r}: must give every size of "
                    f"{coordinator_env('sizes')}={self.sizes} and no other"
                )
        if self.backend == "kubernetes" and self.lease_s <= self.period_s:
            problems.append(
                f"{coordinator_env('lease_s')}={self.lease_s}: must exceed {coordinator_env('period_s')}="
                f"{self.period_s}, or the Lease lapses between renewals"
            )
        if self.min_drain_s > self.drain_timeout_s:
            problems.append(
                f"{coordinator_env('min_drain_s')}={self.min_drain_s}: must not exceed "
                f"{coordinator_env('drain_timeout_s')}={self.drain_timeout_s}"
            )
        return problems


def parse_sizes(text: str) -> tuple[int, ...]:
    """Comma-separated TP degrees, in the order given; ValueError says what is wrong."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError("must be comma-separated TP degrees, e.g. 1,2,4") from None
    if any(s < 1 for s in sizes) or len(set(sizes)) != len(sizes):
        raise ValueError("must be distinct TP degrees >= 1")
    return sizes


def parse_capacities(text: str) -> dict[int, float]:
    """`size:rps,...` as {size: rps}; ValueError says what is wrong."""
    capacities: dict[int, float] = {}
    for part in text.split(","):
        size, sep, rps = part.partition(":")
        try:
            tp, rate = int(size), float(rps)
        except ValueError:
            raise ValueError(f"must be size:rps,... (e.g. 1:2.5,2:6), got {part!r}") from None
        if not sep or tp < 1 or not rate > 0 or tp in capacities:
            raise ValueError(f"must be distinct sizes >= 1 with rates > 0, got {part!r}")
        capacities[tp] = rate
    return capacities


def load_coordinator_settings(overrides: Mapping[str, Any] | None = None) -> CoordinatorSettings:
    """Read and validate the environment; ConfigError names every variable to change."""
    settings = read_settings(CoordinatorSettings, COORDINATOR_PREFIX, overrides)
    problems = settings.problems()
    if problems:
        raise ConfigError("; ".join(problems))
    return settings


def coordinator_table_markdown() -> str:
    """The README's table of the coordinator's variables."""
    return settings_table_markdown(CoordinatorSettings, COORDINATOR_PREFIX)
