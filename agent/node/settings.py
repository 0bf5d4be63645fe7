"""The node agent's settings, from THROTTLLEM_NODE_* environment variables; errors name the variable."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agent.config import ConfigError, log_level, read_settings, settings_table_markdown
from agent.gpus.node_agent import DEFAULT_SOCKET

NODE_PREFIX = "THROTTLLEM_NODE_"


def node_env(field: str) -> str:
    """The environment variable that sets `field`."""
    return f"{NODE_PREFIX}{field.upper()}"


class NodeSettings(BaseSettings):
    """Where the agent listens, which GPUs it steers, and how leases lapse."""

    model_config = SettingsConfigDict(env_prefix=NODE_PREFIX, extra="ignore", frozen=True)

    socket: Path = Field(DEFAULT_SOCKET, description="Unix socket the sidecars connect to")
    socket_gid: int | None = Field(
        None,
        ge=0,
        description="group owning the socket (mode 0660): sidecars need it as a supplemental group; "
        "unset: the agent's own group",
    )
    gpu_backend: Literal["nvml", "twin"] = Field(
        "nvml",
        description="nvml (every GPU of the node) | twin (the GPU endpoints of THROTTLLEM_NODE_TWIN_URLS)",
    )
    twin_urls: str | None = Field(
        None, description="twin base URLs, comma-separated, one GPU each (twin backend)"
    )
    lease_ttl_s: float = Field(
        1.0, gt=0.0, le=60.0, description="a lease with no request for this long lapses: the GPU is reset"
    )
    idle_timeout_s: float = Field(
        10.0, gt=0.0, le=3600.0, description="close a connection that sends no complete line for this long"
    )
    max_connections: int = Field(
        64, ge=1, le=4096, description="connections served at once; more are refused"
    )
    pod_check: Literal["kubelet", "none"] = Field(
        "kubelet",
        description="kubelet: a sidecar leases only its own pod's GPUs (pod-resources API) | none: a "
        "single host",
    )
    pod_resources_socket: Path = Field(
        Path("/var/lib/kubelet/pod-resources/kubelet.sock"), description="the kubelet's pod-resources socket"
    )
    pod_logs_dir: Path = Field(
        Path("/var/log/pods"),
        description="the kubelet's pod log directories (<namespace>_<name>_<uid>), read-only: ties a pod's "
        "name to its UID (kubelet check)",
    )
    proc_root: Path = Field(
        Path("/proc"), description="where peers' /proc/<pid>/cgroup are read (kubelet check)"
    )
    log_level: str = Field("INFO", description="DEBUG | INFO | WARNING | ERROR")

    @field_validator("twin_urls")
    @classmethod
    def _twin_urls(cls, value: str | None) -> str | None:
        if value is None:
            return None
        urls = [url.strip() for url in value.split(",")]
        if not all(url.startswith(("http://", "https://")) and len(url) > len("https://") for url in urls):
            raise ValueError("must be http(s) URLs of twins, comma-separated")
        return ",".join(urls)

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        return log_level(value)

    @property
    def twin_url_list(self) -> tuple[str, ...]:
        """The twin URLs, in order; empty when unset."""
        return () if self.twin_urls is None else tuple(self.twin_urls.split(","))

    def problems(self) -> list[str]:
        """What stops the agent with these settings together; each names a variable."""
        problems = []
        if self.gpu_backend == "twin" and self.twin_urls is None:
            problems.append(f"{node_env('twin_urls')}: must be set when {node_env('gpu_backend')}=twin")
        if self.idle_timeout_s <= self.lease_ttl_s:
            problems.append(
                f"{node_env('idle_timeout_s')}={self.idle_timeout_s}: must exceed "
                f"{node_env('lease_ttl_s')}={self.lease_ttl_s}"
            )
        return problems


def load_node_settings(overrides: Mapping[str, Any] | None = None) -> NodeSettings:
    """Read and validate the environment (then flags); ConfigError names every variable to change."""
    settings = read_settings(NodeSettings, NODE_PREFIX, overrides)
    problems = settings.problems()
    if problems:
        raise ConfigError("; ".join(problems))
    return settings


def node_table_markdown() -> str:
    """The table of the agent's variables (README, --help)."""
    return settings_table_markdown(NodeSettings, NODE_PREFIX)
