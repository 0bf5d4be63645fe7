"""The gateway's THROTTLLEM_GATEWAY_* settings: defaults, and errors that name the variable."""

from __future__ import annotations

import pytest

from agent.config import ConfigError, load_settings
from agent.sidecar.gateway import GatewayLimits


def test_defaults_match_the_gateways_own():
    settings = load_settings({})
    limits = GatewayLimits()
    assert settings.gateway_max_body_bytes == limits.max_body_bytes == 16 * 1024 * 1024
    assert settings.gateway_body_buffer_bytes == limits.body_buffer_bytes
    assert settings.gateway_body_timeout_s == limits.body_timeout_s
    assert settings.gateway_header_timeout_s == limits.header_timeout_s
    assert settings.gateway_idle_timeout_s == limits.idle_timeout_s
    assert settings.gateway_max_connections is None and settings.gateway_allow_paths is None


def test_a_buffer_smaller_than_the_largest_body_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("THROTTLLEM_GATEWAY_MAX_BODY_BYTES", "2000000")
    monkeypatch.setenv("THROTTLLEM_GATEWAY_BODY_BUFFER_BYTES", "1000000")
    with pytest.raises(
        ConfigError, match=r"THROTTLLEM_GATEWAY_BODY_BUFFER_BYTES=.*at least THROTTLLEM_GATEWAY_MAX"
    ):
        load_settings()
    with pytest.raises(ValueError, match="must not exceed body_buffer_bytes"):
        GatewayLimits(max_body_bytes=2, body_buffer_bytes=1)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("THROTTLLEM_GATEWAY_ALLOW_PATHS", "v1/embeddings"),
        ("THROTTLLEM_GATEWAY_ALLOW_PATHS", " , "),
        ("THROTTLLEM_GATEWAY_MAX_CONNECTIONS", "0"),
        ("THROTTLLEM_GATEWAY_HEADER_TIMEOUT_S", "-1"),
        ("THROTTLLEM_GATEWAY_MAX_BODY_BYTES", "10"),
    ],
)
def test_bad_values_name_their_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        load_settings()


def test_allow_paths_are_normalised(monkeypatch):
    monkeypatch.setenv("THROTTLLEM_GATEWAY_ALLOW_PATHS", " /v2/models/*/stats , /v1/embeddings ")
    assert load_settings().gateway_allow_paths == "/v2/models/*/stats,/v1/embeddings"
