"""The twin server's Triton API as NVIDIA's `tritonclient.http` sees it, over real HTTP on loopback.

The server runs on its own event loop in a background thread; the (synchronous) client runs in
the test's thread. Two servers: the assembled one `twin serve` runs (`running_server`: a decoupled
ensemble, so HTTP infer is refused as Triton refuses it), and the same Triton app over a model
that is not decoupled, where infer runs a generation.

The twin-only `prompt_tokens` / `output_tokens` go to infer as request parameters (`parameters=`),
where a real Triton passes them to the model, which ignores them.
"""

import asyncio
import http.client
import io
import json
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager, suppress

import numpy as np
import pytest
import tritonclient.http as triton_http
from aiohttp import web
from tritonclient.utils import InferenceServerException

from agent.catalog import gpu_spec, model_spec
from agent.sidecar.llm_protocol import TRACKED_ROUTES, Kind, ResponseTokens, read_request
from agent.sidecar.prompt_tokens import EstimateCounter
from agent.twin.server.app import ServeConfig, running_server
from agent.twin.server.gpu_control import GpuControl, gpu_uuids
from agent.twin.server.http_api import triton_app
from agent.twin.server.protocol import ENSEMBLE_INPUTS, ENSEMBLE_OUTPUTS, SERVER_METADATA
from agent.twin.server.realtime import RealtimeTwin, TwinClock
from agent.twin.setup import TwinSetup

SETUP = TwinSetup(gpu_spec("a100-sxm4-80gb"), model_spec("llama3-8b"))
TIME_SCALE = 50.0
START_TIMEOUT_S = 10.0
# model_config.proto's names, written out here rather than derived the way the server derives them
CONFIG_TYPES = {
    "BYTES": "TYPE_STRING",
    "BOOL": "TYPE_BOOL",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "UINT64": "TYPE_UINT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
}
MODELS = ["ensemble", "postprocessing", "preprocessing", "tensorrt_llm"]
DECOUPLED_ERROR = "HTTP end point doesn't support models with decoupled transaction policy"


@asynccontextmanager
async def assembled_server() -> AsyncIterator[int]:
    """The server `throttllem twin serve` runs; yields its HTTP port."""
    config = ServeConfig(http_port=0, metrics_port=0, time_scale=TIME_SCALE)
    async with running_server(SETUP, config, io.StringIO()) as server:
        yield server.http_port


@asynccontextmanager
async def not_decoupled_server() -> AsyncIterator[int]:
    """The Triton app over an ensemble whose tensorrt_llm is not decoupled; yields its port."""
    runtime = RealtimeTwin(SETUP, TwinClock(TIME_SCALE))
    app = triton_app(runtime, "ensemble", GpuControl(runtime, gpu_uuids(SETUP)), decoupled=False)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    engine = asyncio.create_task(runtime.run())
    try:
        while not runtime.running:
            await asyncio.sleep(0)
        yield runner.addresses[0][1]
    finally:
        engine.cancel()
        with suppress(asyncio.CancelledError):
            await engine
        await runner.cleanup()


@contextmanager
def on_a_thread(server: Callable[[], AbstractAsyncContextManager[int]]) -> Iterator[str]:
    """Run `server` on an event loop in a background thread; yields "127.0.0.1:<port>"."""
    started = threading.Event()
    state: dict[str, object] = {}
    loop = asyncio.new_event_loop()

    async def main() -> None:
        stop = asyncio.Event()
        state["stop"] = stop
        try:
            async with server() as port:
                state["port"] = port
                started.set()
                await stop.wait()
        except BaseException as exc:
            state["error"] = exc
            started.set()
            raise

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(START_TIMEOUT_S), "server did not start"
    assert "error" not in state, state["error"]
    try:
        yield f"127.0.0.1:{state['port']}"
    finally:
        stop = state["stop"]
        assert isinstance(stop, asyncio.Event)
        loop.call_soon_threadsafe(stop.set)
        thread.join(START_TIMEOUT_S)
        loop.close()
        assert "error" not in state, state["error"]


@pytest.fixture
def twin() -> Iterator[str]:
    with on_a_thread(assembled_server) as address:
        yield address


@pytest.fixture
def twin_not_decoupled() -> Iterator[str]:
    with on_a_thread(not_decoupled_server) as address:
        yield address


@contextmanager
def client(address: str) -> Iterator[triton_http.InferenceServerClient]:
    c = triton_http.InferenceServerClient(address, network_timeout=10.0)
    try:
        yield c
    finally:
        c.close()


def post(
    address: str, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """A raw POST: status, headers, body."""
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("POST", path, body=body, headers=headers or {})
        resp = connection.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        connection.close()


def get(address: str, path: str) -> int:
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", path)
        resp = connection.getresponse()
        resp.read()
        return resp.status
    finally:
        connection.close()


def generate(address: str, payload: dict) -> tuple[int, dict]:
    status, _, raw = post(address, "/v2/models/ensemble/generate", json.dumps(payload).encode())
    return status, json.loads(raw)


def infer_inputs(text: str, max_tokens: int, *, binary: bool = True, **flags: bool) -> list:
    inputs = [
        triton_http.InferInput("text_input", [1, 1], "BYTES").set_data_from_numpy(
            np.array([[text.encode()]], dtype=object), binary_data=binary
        ),
        triton_http.InferInput("max_tokens", [1, 1], "INT32").set_data_from_numpy(
            np.array([[max_tokens]], dtype=np.int32), binary_data=binary
        ),
    ]
    for name, value in flags.items():
        flag = triton_http.InferInput(name, [1, 1], "BOOL")
        inputs.append(flag.set_data_from_numpy(np.array([[value]], dtype=bool), binary_data=binary))
    return inputs


def test_health_metadata_and_model_config_as_tritonclient_reads_them(twin):
    with client(twin) as c:
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("ensemble")
        assert c.get_server_metadata() == SERVER_METADATA
        metadata = c.get_model_metadata("ensemble")
        assert metadata["platform"] == "ensemble" and metadata["versions"] == ["1"]
        config = c.get_model_config("ensemble")
        assert c.get_model_config("ensemble", "1") == config
        with pytest.raises(InferenceServerException, match="Request for unknown model: 'llama' is not found"):
            c.get_model_config("llama")

    assert list(config)[:6] == ["name", "platform", "backend", "runtime", "version_policy", "max_batch_size"]
    assert (config["name"], config["platform"]) == ("ensemble", "ensemble")
    assert config["max_batch_size"] == SETUP.engine.max_batch_size
    assert config["version_policy"] == {"latest": {"num_versions": 1}}
    assert config["model_transaction_policy"] == {"decoupled": True}  # it streams: tensorrt_llm is decoupled
    assert [(i["name"], i["data_type"], i["dims"], i["optional"]) for i in config["input"]] == [
        (name, CONFIG_TYPES[datatype], list(dims), name not in ("text_input", "max_tokens"))
        for name, datatype, dims in ENSEMBLE_INPUTS
    ]
    assert [(o["name"], o["data_type"], o["dims"]) for o in config["output"]] == [
        (name, CONFIG_TYPES[datatype], list(dims)) for name, datatype, dims in ENSEMBLE_OUTPUTS
    ]
    assert all(i["format"] == "FORMAT_NONE" and i["is_shape_tensor"] is False for i in config["input"])
    assert {i["name"] for i in config["input"] if i["allow_ragged_batch"]} == {
        "lora_weights",
        "lora_config",
        "guided_decoding_guide_type",
        "guided_decoding_guide",
    }
    for empty_list in ("batch_input", "batch_output", "instance_group", "model_warmup"):
        assert config[empty_list] == []
    for empty_map in ("cc_model_filenames", "metric_tags", "parameters"):
        assert config[empty_map] == {}

    # The steps form a pipeline Triton would accept: each ensemble input feeds a step, each
    # tensor a step reads was produced before it, and every ensemble output is produced.
    steps = config["ensemble_scheduling"]["step"]
    assert [s["model_name"] for s in steps] == ["preprocessing", "tensorrt_llm", "postprocessing"]
    assert all(s["model_version"] == -1 for s in steps)
    available = {name for name, _, _ in ENSEMBLE_INPUTS}
    consumed: set[str] = set()
    for step in steps:
        assert set(step["input_map"].values()) <= available, step["model_name"]
        consumed |= set(step["input_map"].values())
        available |= set(step["output_map"].values())
    assert {name for name, _, _ in ENSEMBLE_INPUTS} <= consumed
    assert {name for name, _, _ in ENSEMBLE_OUTPUTS} <= available
    assert steps[1]["input_map"]["streaming"] == "stream"
    assert steps[2]["output_map"] == {"OUTPUT": "text_output"}


def test_the_repository_index_lists_the_ensemble_and_its_composing_models(twin):
    with client(twin) as c:
        index = c.get_model_repository_index()
        with pytest.raises(InferenceServerException, match="explicit model load / unload is not allowed"):
            c.load_model("ensemble")
        with pytest.raises(InferenceServerException, match="explicit model load / unload is not allowed"):
            c.unload_model("ensemble", unload_dependents=True)
    assert index == [{"name": name, "version": "1", "state": "READY"} for name in MODELS]
    status, _, raw = post(twin, "/v2/repository/index", b'{"ready": true}')
    assert status == 200 and json.loads(raw) == index
    status, _, raw = post(twin, "/v2/repository/index", b'{"ready": "yes"}')
    assert status == 400 and json.loads(raw) == {"error": "Invalid value for 'ready': expected a boolean"}
    status, _, raw = post(twin, "/v2/repository/index", b"{oops")
    assert status == 400 and "failed to parse the request JSON buffer" in json.loads(raw)["error"]
    status, _, _ = post(twin, "/v2/repository/models/ensemble/unload", b"")
    assert status == 503  # what Triton answers with its default model control mode


def test_statistics_count_what_the_twin_served(twin):
    with client(twin) as c:
        before = c.get_inference_statistics()
    assert [m["name"] for m in before["model_stats"]] == MODELS
    fresh = before["model_stats"][0]
    assert list(fresh) == [
        "name",
        "version",
        "last_inference",
        "inference_count",
        "execution_count",
        "inference_stats",
        "response_stats",
        "batch_stats",
        "memory_usage",
    ]
    assert (fresh["inference_count"], fresh["execution_count"], fresh["last_inference"]) == (0, 0, 0)
    assert fresh["inference_stats"]["success"] == {"count": 0, "ns": 0} and fresh["batch_stats"] == []

    served = []  # (arrival_ns, last_token_ns) of each answered request, from its perf metrics
    for tokens in (7, 3):
        status, body = generate(twin, {"text_input": "hi", "max_tokens": tokens, "return_perf_metrics": True})
        assert status == 200
        served.append((body["arrival_time_ns"], body["last_token_time_ns"]))
    streamed = 5
    status, _, raw = post(
        twin,
        "/v2/models/ensemble/generate_stream",
        json.dumps(
            {"text_input": "hi", "max_tokens": streamed, "stream": True, "return_perf_metrics": True}
        ).encode(),
    )
    events = [json.loads(line[len(b"data: ") :]) for line in raw.split(b"\n\n") if line]
    assert status == 200 and len(events) == streamed
    served.append((events[-1]["arrival_time_ns"], events[-1]["last_token_time_ns"]))
    status, _ = generate(twin, {"text_input": "x", "max_tokens": 500, "prompt_tokens": 8000})
    assert status == 400  # refused by the engine: a failure

    with client(twin) as c:
        after = {m["name"]: m for m in c.get_inference_statistics()["model_stats"]}
        assert c.get_inference_statistics("ensemble") == {"model_stats": [after["ensemble"]]}
        assert c.get_inference_statistics("tensorrt_llm", "1")["model_stats"] == [after["tensorrt_llm"]]
        with pytest.raises(InferenceServerException, match="requested model 'llama' is not available"):
            c.get_inference_statistics("llama")
        with pytest.raises(InferenceServerException, match="requested model version is not available"):
            c.get_inference_statistics("ensemble", "2")

    answered = len(served)
    for name in ("ensemble", "tensorrt_llm"):
        model = after[name]
        stats = model["inference_stats"]
        assert (model["inference_count"], model["execution_count"]) == (answered, answered)
        assert stats["success"] == {"count": answered, "ns": sum(last - first for first, last in served)}
        assert stats["fail"]["count"] == 1
        assert stats["queue"]["count"] == stats["compute_infer"]["count"] == answered
        assert stats["queue"]["ns"] + stats["compute_infer"]["ns"] == stats["success"]["ns"]
        assert stats["compute_infer"]["ns"] > 0 and stats["compute_input"] == {"count": answered, "ns": 0}
        assert model["last_inference"] == max(last for _, last in served) // 1_000_000
        assert model["batch_stats"] == [
            {
                "batch_size": 1,
                "compute_input": stats["compute_input"],
                "compute_infer": stats["compute_infer"],
                "compute_output": stats["compute_output"],
            }
        ]
    assert after["preprocessing"]["execution_count"] == answered + 1  # the refused one was tokenized
    assert after["postprocessing"]["execution_count"] == 2 + streamed  # one per response


def test_infer_on_the_decoupled_ensemble_is_refused_as_triton_refuses_it(twin):
    with client(twin) as c:
        with pytest.raises(InferenceServerException) as refused:
            c.infer("ensemble", infer_inputs("hi", 4))
        with pytest.raises(InferenceServerException, match="Request for unknown model: 'llama' is not found"):
            c.infer("llama", infer_inputs("hi", 4))
        stats = c.get_inference_statistics("ensemble")["model_stats"][0]
    assert refused.value.status() == "501" and refused.value.message() == DECOUPLED_ERROR
    assert stats["inference_stats"]["success"]["count"] == 0 == stats["inference_stats"]["fail"]["count"]


def test_tritonclient_infer_runs_one_generation_with_binary_tensors(twin_not_decoupled):
    with client(twin_not_decoupled) as c:
        assert c.get_model_config("ensemble")["model_transaction_policy"] == {"decoupled": False}
        before = c.get_inference_statistics("ensemble")["model_stats"][0]
        inputs = infer_inputs(
            "Hello",
            25,
            return_num_input_tokens=True,
            return_num_output_tokens=True,
            return_perf_metrics=True,
        )
        result = c.infer("ensemble", inputs, parameters={"prompt_tokens": 700, "output_tokens": 5})
        with pytest.raises(
            InferenceServerException, match="only supported if model is deployed using decoupled"
        ):
            c.infer("ensemble", infer_inputs("hi", 3, stream=True))
        after = c.get_inference_statistics("ensemble")["model_stats"][0]

    response = result.get_response()
    assert (response["model_name"], response["model_version"]) == ("ensemble", "1")
    assert response["parameters"] == {"sequence_end": False, "sequence_id": 0, "sequence_start": False}
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])  # tritonclient's default
    assert result.as_numpy("text_output").tolist() == [[b"Hello" + b" tok" * 5]]
    assert result.as_numpy("num_output_tokens").tolist() == [[5]]
    assert result.as_numpy("num_input_tokens").tolist() == [[700]]
    assert result.as_numpy("output_log_probs").shape == (1, 1, 5)
    assert result.as_numpy("num_output_tokens").dtype == np.int32
    arrival = int(result.as_numpy("arrival_time_ns")[0, 0])
    last = int(result.as_numpy("last_token_time_ns")[0, 0])
    assert arrival < int(result.as_numpy("first_token_time_ns")[0, 0]) < last
    assert after["inference_count"] == before["inference_count"] + 1
    gained = after["inference_stats"]["success"]["ns"] - before["inference_stats"]["success"]["ns"]
    assert gained == last - arrival
    assert after["inference_stats"]["fail"]["count"] == before["inference_stats"]["fail"]["count"] + 1


def test_infer_with_json_tensors_and_listed_outputs_is_an_answer_the_gateway_reads(twin_not_decoupled):
    outputs = [
        triton_http.InferRequestedOutput("num_output_tokens", binary_data=False),
        triton_http.InferRequestedOutput("text_output", binary_data=False),
    ]
    inputs = infer_inputs("Hi", 6, binary=False, return_num_output_tokens=True)
    with client(twin_not_decoupled) as c:
        result = c.infer("ensemble", inputs, outputs=outputs, request_id="r1")
    response = result.get_response()
    assert list(response) == ["id", "model_name", "model_version", "parameters", "outputs"]
    assert response["id"] == "r1"
    assert response["outputs"] == [
        {"name": "text_output", "datatype": "BYTES", "shape": [1, 1], "data": ["Hi" + " tok" * 6]},
        {"name": "num_output_tokens", "datatype": "INT32", "shape": [1, 1], "data": [6]},
    ]

    # The same request and answer as the sidecar's gateway sizes them.
    body, _ = triton_http.InferenceServerClient.generate_request_body(inputs, outputs=outputs)
    route = next(r for r in TRACKED_ROUTES if r.kind is Kind.INFER)
    facts = read_request(route, body, "ensemble", EstimateCounter(), default_max_tokens=99)
    assert (facts.parsed, facts.max_tokens) == (True, 6)
    status, _, raw = post(twin_not_decoupled, "/v2/models/ensemble/infer", body)
    assert status == 200
    assert ResponseTokens(route, facts, EstimateCounter()).body(raw) == 6


def test_binary_outputs_follow_the_json_header_with_its_length(twin_not_decoupled):
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "text_input",
                    "datatype": "BYTES",
                    "shape": [1, 1],
                    "parameters": {"binary_data_size": 6},
                },
                {"name": "max_tokens", "datatype": "INT32", "shape": [1, 1], "data": [2]},
            ],
            "outputs": [{"name": "text_output", "parameters": {"binary_data": True}}],
        }
    ).encode()
    text = struct.pack("<I", 2) + b"ab"
    status, headers, raw = post(
        twin_not_decoupled,
        "/v2/models/ensemble/infer",
        header + text,
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert status == 200 and headers["Content-Type"] == "application/octet-stream"
    length = int(headers["Inference-Header-Content-Length"])
    answer = json.loads(raw[:length])
    payload = b"ab tok tok"
    assert answer["outputs"] == [
        {"name": "text_output", "datatype": "BYTES", "shape": [1, 1], "parameters": {"binary_data_size": 14}}
    ]
    assert raw[length:] == struct.pack("<I", len(payload)) + payload


def _tensor(name: str, datatype: str, shape: list[int], data: object = None, size: int | None = None) -> dict:
    tensor: dict = {"name": name, "datatype": datatype, "shape": shape}
    if size is None:
        tensor["data"] = data
    else:
        tensor["parameters"] = {"binary_data_size": size}
    return tensor


TEXT = _tensor("text_input", "BYTES", [1, 1], ["hi"])
MAX = _tensor("max_tokens", "INT32", [1, 1], [3])


def _request(*inputs: dict, **extra: object) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


@pytest.mark.parametrize(
    ("body", "header_length", "status", "message"),
    [
        (b"{oops", None, 400, "failed to parse the request JSON buffer"),
        (_request(TEXT, MAX), "x", 400, "Unable to parse Inference-Header-Content-Length, got: x"),
        (_request(TEXT, MAX), "100000", 400, "inference header size should be in range"),
        (
            _request(TEXT, MAX),
            "0",
            400,
            "Raw request must only have 1 input (found 1) to be deduced but got 36",
        ),
        (_request(TEXT), None, 400, "missing required input(s) ['max_tokens']"),
        (
            _request(TEXT, MAX, _tensor("prompt_tokens", "INT32", [1, 1], [9])),
            None,
            400,
            "unexpected inference input 'prompt_tokens'",
        ),
        (
            _request(TEXT, MAX, outputs=[{"name": "logits"}]),
            None,
            400,
            "unexpected inference output 'logits'",
        ),
        (
            _request(TEXT, _tensor("max_tokens", "INT64", [1, 1], [3])),
            None,
            400,
            "data-type is 'INT64', but model 'ensemble' expects 'INT32'",
        ),
        (
            _request(TEXT, _tensor("max_tokens", "INT32", [1, 2], [3, 4])),
            None,
            400,
            "unexpected shape for input 'max_tokens' for model 'ensemble'. Expected [-1,1], got [1,2]",
        ),
        (
            _request(TEXT, _tensor("max_tokens", "INT32", [1, 1], [3, 4])),
            None,
            400,
            "Shape does not match true shape",
        ),
        (
            _request(TEXT, _tensor("max_tokens", "INT32", [1, 1], [])),
            None,
            400,
            "shape does not match true shape",
        ),
        (_request(TEXT, _tensor("max_tokens", "INT32", [1, 1], [2**31])), None, 400, "is not a INT32 value"),
        (_request(TEXT, _tensor("max_tokens", "INT32", [1, 1], [[[[3]]]])), None, 200, None),
        (
            _request(
                TEXT,
                _tensor("max_tokens", "INT32", [1, 1], [3]),
                _tensor("temperature", "FP16", [1, 1], [0.5]),
            ),
            None,
            400,
            "receiving FP16 data via JSON is not supported",
        ),
        (
            _request(TEXT, {**MAX, "parameters": {"binary_data_size": 4}}),
            None,
            400,
            "Input must set only one of the following fields",
        ),
        (
            _request(
                TEXT,
                {
                    "name": "max_tokens",
                    "datatype": "INT32",
                    "shape": [1, 1],
                    "parameters": {"shared_memory_region": "r"},
                },
            ),
            None,
            404,
            "Unable to find shared memory region: 'r'",
        ),
        (
            _request(
                _tensor("text_input", "BYTES", [2, 1], ["a", "b"]),
                _tensor("max_tokens", "INT32", [2, 1], [3, 3]),
            ),
            None,
            400,
            "Batch size > 1 requires the tensorrt_llm backend",
        ),
        (
            _request(_tensor("text_input", "BYTES", [2, 1], ["a", "b"]), MAX),
            None,
            400,
            "batch size does not match other inputs",
        ),
        (_request(TEXT, MAX, parameters={"triton_x": 1}), None, 400, "reserved for Triton usage"),
        (b"[" * 100_000, None, 400, "failed to parse the request JSON buffer"),
        (
            _request(TEXT, _tensor("max_tokens", "INT32", [1, 1], json.loads("[" * 150 + "3" + "]" * 150))),
            None,
            400,
            "JSON nesting depth exceeds maximum allowed limit (100)",
        ),
        (
            _request(TEXT, MAX, parameters={"output_tokens": 0}),
            None,
            400,
            "'output_tokens' must be at least 1",
        ),
        (
            _request(TEXT, _tensor("max_tokens", "INT32", [1, 1], [500]), parameters={"prompt_tokens": 8000}),
            None,
            400,
            "exceeds max_seq_len",
        ),
        (
            _request(TEXT, MAX, _tensor("stream", "BOOL", [1, 1], [True])),
            None,
            400,
            "only supported if model is deployed using decoupled mode",
        ),
    ],
)
def test_bad_infer_requests_are_answered_like_triton(
    twin_not_decoupled, body, header_length, status, message
):
    headers = {} if header_length is None else {"Inference-Header-Content-Length": header_length}
    got, _, raw = post(twin_not_decoupled, "/v2/models/ensemble/infer", body, headers)
    answer = json.loads(raw)
    assert got == status, answer
    if message is not None:
        assert message in answer["error"]


@pytest.mark.parametrize(
    ("binary", "status", "message"),
    [
        (struct.pack("<i", 3), 200, None),
        (struct.pack("<i", 3) + b"!", 400, "unexpected additional input data for model 'ensemble'"),
        (b"\x03\x00", 400, "unexpected size for input 'max_tokens', expecting 2 additional bytes"),
    ],
)
def test_binary_input_sizes_must_match_the_body(twin_not_decoupled, binary, status, message):
    header = _request(TEXT, _tensor("max_tokens", "INT32", [1, 1], size=4))
    headers = {"Inference-Header-Content-Length": str(len(header))}
    got, _, raw = post(twin_not_decoupled, "/v2/models/ensemble/infer", header + binary, headers)
    assert got == status
    if message is not None:
        assert message in json.loads(raw)["error"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (struct.pack("<I", 2**32 - 1) + b"hi", "runs past the tensor data"),
        (struct.pack("<I", 1) + b"a" + struct.pack("<I", 1) + b"b", "unexpected number of string elements 2"),
        (b"\x01\x00", "incomplete string length indicator"),
        (b"", "expected 1 string elements for inference input 'text_input'"),
        (struct.pack("<I", 1) + b"\xff", "expected UTF-8 text"),
    ],
)
def test_binary_strings_are_checked_without_trusting_their_lengths(twin_not_decoupled, text, message):
    header = _request(_tensor("text_input", "BYTES", [1, 1], size=len(text)), MAX)
    headers = {"Inference-Header-Content-Length": str(len(header))}
    got, _, raw = post(twin_not_decoupled, "/v2/models/ensemble/infer", header + text, headers)
    assert got == 400 and message in json.loads(raw)["error"]


def test_every_advertised_extension_is_served(twin, twin_not_decoupled):
    probes = {  # extension -> routes that serve it: (method, path, body, server)
        "model_repository": [("POST", "/v2/repository/index", b"{}", twin)],
        "model_repository(unload_dependents)": [
            (
                "POST",
                "/v2/repository/models/ensemble/unload",
                b'{"parameters":{"unload_dependents":true}}',
                twin,
            )
        ],
        "model_configuration": [("GET", "/v2/models/ensemble/config", b"", twin)],
        "statistics": [
            ("GET", "/v2/models/stats", b"", twin),
            ("GET", "/v2/models/ensemble/stats", b"", twin),
        ],
        "binary_tensor_data": [
            ("POST", "/v2/models/ensemble/infer", _request(TEXT, MAX), twin_not_decoupled)
        ],
        "parameters": [
            (
                "POST",
                "/v2/models/ensemble/infer",
                _request(TEXT, MAX, parameters={"x": 1}),
                twin_not_decoupled,
            )
        ],
    }
    assert sorted(probes) == sorted(SERVER_METADATA["extensions"])
    for extension, routes in probes.items():
        for method, path, body, address in routes:
            status = get(address, path) if method == "GET" else post(address, path, body)[0]
            assert status != 404, (extension, path)
            assert status in (200, 503), (extension, path, status)


def test_a_body_past_the_size_limit_is_refused_in_tritons_error_shape(twin_not_decoupled):
    big = _request(_tensor("text_input", "BYTES", [1, 1], ["x" * 2_000_000]), MAX)
    status, headers, raw = post(twin_not_decoupled, "/v2/models/ensemble/infer", big)
    assert status == 413 and headers["Content-Type"].startswith("application/json")
    assert "request body too large" in json.loads(raw)["error"]
