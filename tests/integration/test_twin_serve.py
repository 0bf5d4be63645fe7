"""`throttllem twin serve` as a real process on loopback, checked with NVIDIA's own Triton client."""

import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
import tritonclient.http as triton_http
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from agent.cli import main
from agent.twin.iteration_stats import parse_executor_json

START_TIMEOUT_S = 60.0


@dataclass
class Served:
    proc: subprocess.Popen[str]
    lines: "queue.Queue[str | None]"  # stdout after the listening line; None at EOF
    http: str
    metrics: str

    def post(self, path: str, payload: object) -> tuple[int, dict]:
        request = urllib.request.Request(
            self.http + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())


def launch(*args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "agent.cli", "twin", "serve", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@contextmanager
def serve(*args: str) -> Iterator[Served]:
    """Start the server on free ports; stdout is drained by a thread so the pipe never fills."""
    proc = launch("--http-port", "0", "--metrics-port", "0", *args)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        first = lines.get(timeout=START_TIMEOUT_S)
        assert first is not None, proc.communicate()[1]
        announced = json.loads(first)
        assert announced["event"] == "listening"
        yield Served(
            proc,
            lines,
            f"http://127.0.0.1:{announced['http_port']}",
            f"http://127.0.0.1:{announced['metrics_port']}",
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stop(served: Served, signum: int) -> tuple[int, str]:
    served.proc.send_signal(signum)
    code = served.proc.wait(timeout=15)
    assert served.proc.stderr is not None
    return code, served.proc.stderr.read()


def test_tritonclient_sees_a_triton_server_and_sigterm_exits_cleanly():
    with serve("--time-scale", "50") as served:
        client = triton_http.InferenceServerClient(served.http.removeprefix("http://"))
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("ensemble")
        assert client.is_model_ready("ensemble", "1")
        assert not client.is_model_ready("llama")
        metadata = client.get_server_metadata()
        assert metadata["name"] == "triton" and "statistics" in metadata["extensions"]
        model = client.get_model_metadata("ensemble")
        assert model["platform"] == "ensemble" and model["versions"] == ["1"]
        assert {"name": "max_tokens", "datatype": "INT32", "shape": [-1, 1]} in model["inputs"]
        with pytest.raises(InferenceServerException, match="Request for unknown model: 'llama'"):
            client.get_model_metadata("llama")
        client.close()

        status, body = served.post(
            "/v2/models/ensemble/generate",
            {"text_input": "What is a GPU?", "max_tokens": 12, "return_num_output_tokens": True},
        )
        assert status == 200 and body["num_output_tokens"] == 12
        status, state = served.post("/twin/v1/gpu/locked_clocks", {"min_mhz": 1005, "max_mhz": 1005})
        assert status == 200 and state["locked_clock_mhz"] == 1005
        with urllib.request.urlopen(served.metrics + "/metrics", timeout=10) as resp:
            families = {f.name for f in text_string_to_metric_families(resp.read().decode())}
        assert {
            "nv_trt_llm_request_metrics",
            "nv_gpu_power_usage",
            "nv_inference_request_success",
        } <= families

        code, stderr = stop(served, signal.SIGTERM)
        assert code == 0, stderr


def test_not_decoupled_the_served_ensemble_answers_tritonclient_infer():
    """`--decoupled-mode false` is TRT-LLM's non-decoupled ensemble: KServe infer runs a generation."""
    with serve("--time-scale", "50", "--decoupled-mode", "false") as served:
        client = triton_http.InferenceServerClient(served.http.removeprefix("http://"))
        assert client.get_model_config("ensemble")["model_transaction_policy"] == {"decoupled": False}
        text = triton_http.InferInput("text_input", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"What is a GPU?"]], dtype=object))
        max_tokens = triton_http.InferInput("max_tokens", [1, 1], "INT32")
        max_tokens.set_data_from_numpy(np.array([[7]], dtype=np.int32))
        result = client.infer("ensemble", [text, max_tokens], parameters={"output_tokens": 3})
        assert result.as_numpy("text_output").tolist() == [[b"What is a GPU?" + b" tok" * 3]]
        stats = client.get_inference_statistics("ensemble")["model_stats"][0]
        assert stats["inference_stats"]["success"]["count"] == 1
        client.close()
        code, stderr = stop(served, signal.SIGTERM)
        assert code == 0, stderr


def test_iteration_stats_on_stdout_and_sigint_exits_cleanly():
    with serve("--time-scale", "50", "--iteration-stats-stdout", "--model-name", "llm") as served:
        status, _ = served.post("/v2/models/llm/generate", {"text_input": "x", "max_tokens": 5})
        assert status == 200
        records = [parse_executor_json(served.lines.get(timeout=10))[0] for _ in range(5)]
        assert [r.iter for r in records] == [0, 1, 2, 3, 4]
        assert records[0].inflight_batching_stats.num_context_requests == 1
        assert records[-1].num_completed_requests == 1
        code, stderr = stop(served, signal.SIGINT)
        assert code == 0, stderr


def test_a_taken_port_is_one_readable_error_line_and_exit_1(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code = main(["twin", "serve", "--http-port", str(taken.getsockname()[1]), "--metrics-port", "0"])
    assert code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("throttllem: error:") and "address already in use" in lines[0]
    )
