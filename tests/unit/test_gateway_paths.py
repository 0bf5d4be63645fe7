"""Issue 12, item 3: only the inference API goes through, and the gateway says who it forwarded."""

from __future__ import annotations

import json

import pytest

from agent.sidecar.gateway import GatewayLimits
from agent.sidecar.paths import PathPolicy, Verdict
from tests.unit.test_sidecar_gateway import run, stack

INFERENCE_API = [
    ("POST", "/v2/models/ensemble/generate"),
    ("POST", "/v2/models/ensemble/versions/1/generate_stream"),
    ("POST", "/v2/models/ensemble/infer"),
    ("GET", "/v2/models/ensemble"),
    ("GET", "/v2/models/ensemble/versions/2"),
    ("GET", "/v2/models/ensemble/ready"),
    ("HEAD", "/v2/models/ensemble/versions/1/ready"),
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    ("GET", "/v2"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/llama3-8b"),
    ("GET", "/health"),
    ("GET", "/health_generate"),
    ("GET", "/ping"),
    ("GET", "/version"),
]
ADMIN_ROUTES = [
    ("POST", "/twin/v1/gpu/locked_clocks"),
    ("POST", "/v2/repository/models/ensemble/unload"),
    ("POST", "/v2/repository/index"),
    ("POST", "/v2/logging"),
    ("POST", "/v2/systemsharedmemory/region/x/register"),
    ("POST", "/v2/cudasharedmemory/region/x/register"),
    ("POST", "/v2/trace/setting"),
    ("GET", "/metrics"),
    ("GET", "/v2/models/ensemble/stats"),
    ("GET", "/v2/models/x/../../../twin/v1/gpu"),
    ("GET", "/v2/models/%2e%2e/ready"),
    ("GET", "/v2/models/a%2F..%2F..%2Flogging/ready"),  # an engine that decodes %2F would walk up
    ("POST", "/v1/completions/"),
]


@pytest.mark.parametrize(("method", "path"), INFERENCE_API)
def test_the_inference_api_is_forwarded(method, path):
    assert PathPolicy().verdict(method, path) is Verdict.FORWARD


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
def test_admin_and_unknown_routes_are_forbidden(method, path):
    assert PathPolicy().verdict(method, path) is Verdict.FORBIDDEN


def test_a_known_path_with_another_method_is_405_and_the_allow_list_extends_by_glob():
    policy = PathPolicy(["/v2/models/*/stats", "/v1/embeddings"])
    assert policy.verdict("DELETE", "/v2/health/ready") is Verdict.WRONG_METHOD
    assert policy.verdict("GET", "/v1/completions") is Verdict.WRONG_METHOD
    assert policy.allowed_methods("/v2/health/ready") == ["GET", "HEAD"]
    assert policy.verdict("GET", "/v2/models/ensemble/stats") is Verdict.FORWARD
    assert policy.verdict("POST", "/v1/embeddings") is Verdict.FORWARD
    assert policy.verdict("POST", "/v2/models/../logging/stats") is Verdict.FORBIDDEN


def test_forbidden_paths_are_403_in_the_routes_shape_and_never_reach_the_engine():
    async def scenario() -> None:
        async with stack(limits=GatewayLimits()) as s:
            for method, path in ADMIN_ROUTES[:8]:
                async with s.client.request(method, f"{s.url}{path}", json={"lock": 600}) as resp:
                    assert resp.status == 403, path
                    assert "not forwarded" in (await resp.json())["error"]
            async with s.client.get(f"{s.url}/v1/files") as resp:
                error = (await resp.json())["error"]
                assert resp.status == 403 and error["type"] == "forbidden" and error["code"] == 403
            async with s.client.delete(f"{s.url}/v2/health/ready") as resp:
                assert resp.status == 405 and resp.headers["Allow"] == "GET, HEAD"
            async with s.client.get(f"{s.url}/v2/health/ready") as resp:
                assert resp.status == 200
            assert [r[1] for r in s.engine.received] == ["/v2/health/ready"]
            assert s.gateway.stats.rejected[403] == 9 and s.gateway.stats.rejected[405] == 1

    run(scenario)


def test_the_peer_is_appended_to_x_forwarded_for_and_forwarded_and_host_and_proto_are_the_gateways():
    async def scenario() -> None:
        async with stack() as s:
            headers = {
                "X-Forwarded-For": "203.0.113.7",
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "victim.example",
                "Forwarded": "for=203.0.113.7",
            }
            async with s.client.get(f"{s.url}/echo", headers=headers) as resp:
                received = (await resp.json())["headers"]
            gateway_host = s.url.removeprefix("http://")
            assert received["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
            assert received["x-forwarded-proto"] == "http"
            assert received["x-forwarded-host"] == gateway_host
            assert received["forwarded"] == f'for=203.0.113.7, for=127.0.0.1;host="{gateway_host}";proto=http'
            async with s.client.get(f"{s.url}/echo") as resp:
                received = (await resp.json())["headers"]
            assert received["x-forwarded-for"] == "127.0.0.1"
            assert received["forwarded"].startswith("for=127.0.0.1;")

    run(scenario)


def test_a_body_on_an_allow_listed_path_goes_through_whole():
    async def scenario() -> None:
        async with stack() as s, s.client.post(f"{s.url}/echo/x", data=json.dumps({"a": 1})) as resp:
            assert json.loads((await resp.json())["body"]) == {"a": 1}  # the stack allow-lists /echo*

    run(scenario)
