"""`throttllem load` as a user runs it: against a twin process, as JSON lines or one summary."""

import asyncio
import json

from agent.bench.processes import ProcessGroup, start_twin
from agent.catalog import gpu_spec, model_spec
from agent.cli import main
from agent.twin.setup import TwinSetup
from agent.workloads import load_trace

SETUP = TwinSetup(gpu_spec("a100-sxm4-80gb"), model_spec("llama3-8b"))
SCALE = "20"  # the twin and the replay both run 20x faster than the trace


def test_events_then_json_against_a_fast_twin(tmp_path):
    slice_args = ["--start", "600", "--duration", "10", "--max-tokens", "64", "--time-scale", SCALE]

    async def scenario():
        async with ProcessGroup(tmp_path) as group:
            twin = await start_twin(group, SETUP, time_scale=float(SCALE))
            lines: list[str] = []
            events = await group.start(
                "load-events",
                ["load", "--url", twin.http_url, "--events", *slice_args],
                announces=False,
                on_line=lines.append,
            )
            events_code = await events.wait(60)
            out: list[str] = []
            summary = await group.start(
                "load-json",
                ["load", "--url", twin.http_url, "--json", *slice_args],
                announces=False,
                on_line=out.append,
            )
            return events_code, lines, await summary.wait(60), out, group.children

    events_code, lines, json_code, out, children = asyncio.run(scenario())
    expected = len(load_trace("azure-conv").window(600, 10))
    assert events_code == 0, children[1].log_tail()
    parsed = [json.loads(line) for line in lines]
    assert parsed[0] == {"event": "start", "requests": expected, "url": parsed[0]["url"], "time_scale": 20.0}
    requests = [e for e in parsed if e["event"] == "request"]
    assert [e["done"] for e in requests] == list(range(1, expected + 1))
    assert sorted(e["id"] for e in requests) == list(range(expected))
    assert all(e["answered"] and e["status"] == 200 for e in requests)
    assert all(len(e["gaps_s"]) == e["output_tokens"] - 1 for e in requests)
    assert parsed[-1]["event"] == "summary" and parsed[-1]["answered"] == expected
    assert parsed[-1]["slo_attainment"] is not None and parsed[-1]["tbt_p99_s"] > 0
    assert json_code == 0
    summary = json.loads("".join(out))
    assert summary["requests"] == summary["answered"] == expected and summary["tbt_p99_s"] is None


def test_an_unreachable_url_is_one_error_line(capsys):
    assert main(["load", "--url", "http://127.0.0.1:1", "--duration", "5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("throttllem: error: cannot reach http://127.0.0.1:1")
