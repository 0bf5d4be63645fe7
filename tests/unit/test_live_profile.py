"""The live profile without a live engine: a point's requests, which iterations are the point's, and
the refusals (missing URLs; no clock permission, before any load) and resets (a failing point)."""

import asyncio
import http.server
import json
import math
import threading
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import replace

import aiohttp
import pytest

from agent.catalog import gpu_spec, model_spec
from agent.cli import main
from agent.domain import EngineStats
from agent.gpus import PermissionDeniedError
from agent.gpus.base import PERMISSION_ADVICE
from agent.modeling import live_profile
from agent.modeling.dataset import Row
from agent.modeling.live_points import (
    TOKEN_IDS,
    PointEnvelope,
    point_requests,
    rows_from_iterations,
    rows_from_snapshots,
)
from agent.modeling.live_profile import LiveConfig, LiveProfileError, _LiveSession
from agent.modeling.profile import ProfileLimits, TwinProfileTarget
from agent.twin.server.protocol import parse_generate
from agent.twin.setup import TwinSetup

TPB = 64
TWIN = TwinProfileTarget(TwinSetup(gpu_spec("a100-sxm4-80gb"), model_spec("llama3-8b")))


def stats(
    iteration: int,
    *,
    batch: int,
    kv: int,
    ctx: int = 0,
    active: int | None = None,
    t: float | None = None,
    latency_ms: float | None = 20.0,
    tpb: int = TPB,
) -> EngineStats:
    return EngineStats(
        timestamp_s=1000.0 + iteration * 0.02 if t is None else t,
        iteration=iteration,
        active_requests=batch if active is None else active,
        queued_requests=0,
        scheduled_requests=batch,
        context_requests=1 if ctx else 0,
        generation_requests=batch - (1 if ctx else 0),
        paused_requests=0,
        context_tokens=ctx,
        kv_blocks_used=kv,
        kv_blocks_max=1000,
        tokens_per_block=tpb,
        iteration_latency_s=None if latency_ms is None else latency_ms / 1000.0,
    )


def as_stats(row: Row, iteration: int) -> EngineStats:
    """A twin row as the engine would report that iteration."""
    return stats(
        iteration, batch=row.batch, kv=row.kv_blocks, ctx=row.prefill_tokens, latency_ms=row.iteration_ms
    )


# ---------------------------------------------------------------------------------------------
# A point's requests


def test_triton_requests_ask_for_exact_sizes_and_the_twin_reads_them_so():
    requests = point_requests("triton", "ensemble", [1000, 7], [30, 1], point=3, seed=0)
    assert [r.path for r in requests] == ["/v2/models/ensemble/generate"] * 2
    parsed = [parse_generate(json.dumps(r.body).encode(), "ensemble") for r in requests]
    assert [(p.prompt_tokens, p.output_tokens, p.max_tokens, p.stream) for p in parsed] == [
        (1000, 30, 30, False),
        (7, 1, 1, False),
    ]
    body = requests[0].body
    assert body["min_tokens"] == 30  # a real Triton may not stop at the end token before that
    assert body["exclude_input_in_output"] is True and body["text_input"] == "tok " * 1000


def test_openai_requests_send_exact_token_ids_that_share_no_prefix():
    requests = point_requests("openai", "llama", [500, 500, 500], [20, 20, 20], point=3, seed=0)
    bodies = [r.body for r in requests]
    assert {r.path for r in requests} == {"/v1/completions"}
    assert all(len(b["prompt"]) == 500 for b in bodies)
    assert all(TOKEN_IDS[0] <= min(b["prompt"]) and max(b["prompt"]) < TOKEN_IDS[1] for b in bodies)
    assert len({b["prompt"][0] for b in bodies}) == 3  # a prefix cache cannot share their blocks
    assert all(
        (b["max_tokens"], b["min_tokens"], b["ignore_eos"], b["stream"]) == (20, 20, True, False)
        for b in bodies
    )
    # trtllm-serve refuses unknown keys (extra="forbid"): no twin-only ones here.
    assert set(bodies[0]) == {"model", "prompt", "max_tokens", "min_tokens", "ignore_eos", "stream"}
    assert (
        point_requests("openai", "llama", [500] * 3, [20] * 3, point=3, seed=0) == requests
    )  # re-runs match
    assert point_requests("openai", "llama", [500] * 3, [20] * 3, point=4, seed=0)[0] != requests[0]
    with pytest.raises(ValueError, match="one output length per prompt"):
        point_requests("openai", "llama", [5, 6], [1], point=0, seed=0)
    with pytest.raises(ValueError, match="unknown API"):
        point_requests("grpc", "llama", [5], [1], point=0, seed=0)


# ---------------------------------------------------------------------------------------------
# Which iterations are the point's


def test_every_iteration_the_twin_runs_for_a_point_fits_its_envelope_and_little_more_does():
    prompts, outputs = [3000, 2500, 1800, 700, 64, 4000], [40, 30, 20, 60, 50, 12]
    rows = TWIN.run_point(1050, prompts, outputs, point=0)
    envelope = PointEnvelope.of(prompts, outputs, TPB)
    records = [as_stats(row, i) for i, row in enumerate(rows)]
    assert all(envelope.holds(s) for s in records)
    exact_blocks = sum(math.ceil((p + o) / TPB) for p, o in zip(prompts, outputs, strict=True))
    assert exact_blocks <= envelope.kv_blocks <= 1.15 * exact_blocks  # tokenizer slack, no more
    assert sum(prompts) <= envelope.prefill_tokens <= 1.15 * sum(prompts)
    busiest = max(records, key=lambda s: s.kv_blocks_used)
    for stranger in (
        replace(busiest, scheduled_requests=7, active_requests=7),  # a request the profile did not send
        replace(busiest, active_requests=7),  # one waiting outside the batch
        replace(busiest, kv_blocks_used=envelope.kv_blocks + 1),
        replace(busiest, context_tokens=envelope.prefill_tokens + 1),
        replace(busiest, tokens_per_block=32),  # another engine
        replace(busiest, scheduled_requests=0),  # nothing ran
    ):
        assert not envelope.holds(stranger)


def test_iteration_records_become_rows_when_they_fit_the_point():
    envelope = PointEnvelope.of([1000, 500], [10, 10], TPB)
    records = [
        stats(10, batch=2, kv=24, ctx=1500, latency_ms=80.0),  # prefill of both
        stats(11, batch=2, kv=24),
        stats(12, batch=3, kv=30),  # a request the profile did not send
        stats(13, batch=2, kv=24, latency_ms=None),  # no latency: not a row
        stats(14, batch=1, kv=8, tpb=32),  # another engine's block size
        stats(15, batch=1, kv=8, latency_ms=19.5),
    ]
    matched = rows_from_iterations(records, envelope, point=7, tp=2, clock_mhz=1050)
    assert [
        (
            r.point,
            r.tp,
            r.batch,
            r.kv_blocks,
            r.tokens_per_block,
            r.prefill_tokens,
            r.clock_mhz,
            r.iteration_ms,
        )
        for r in matched.rows
    ] == [
        (7, 2, 2, 24, TPB, 1500, 1050, 80.0),
        (7, 2, 2, 24, TPB, 0, 1050, 20.0),
        (7, 2, 1, 8, TPB, 0, 1050, 19.5),
    ]
    assert matched.dropped == 3


def test_triton_snapshots_give_decode_windows_of_fixed_requests_only():
    envelope = PointEnvelope.of([1000, 500, 300], [40, 40, 40], TPB)
    snapshots = [
        stats(90, batch=1, kv=16, t=9.800),  # the first request alone: the others are on their way
        stats(95, batch=1, kv=16, t=9.900),  # so this window is not kept: someone may join
        stats(100, batch=3, kv=30, ctx=1800, t=10.000),  # they join: all three are in from here
        stats(104, batch=3, kv=30, t=10.100),  # the window from a prefill is not decode-only
        stats(109, batch=3, kv=31, t=10.200),  # decode window: 5 iterations in 100 ms
        stats(113, batch=2, kv=20, t=10.290),  # a request finished in between
        stats(117, batch=2, kv=20, t=10.370),  # decode window: 4 iterations in 80 ms
        stats(121, batch=1, kv=20, active=2, t=10.450),  # one active request is not in the batch
        stats(125, batch=1, kv=20, active=2, t=10.530),
        stats(5, batch=1, kv=20, t=10.600),  # the engine restarted
    ]
    matched = rows_from_snapshots(snapshots, envelope, point=1, tp=1, clock_mhz=900)
    assert [(r.batch, r.kv_blocks, r.prefill_tokens, r.clock_mhz, r.iteration_ms) for r in matched.rows] == [
        (3, 31, 0, 900, 20.0),
        (2, 20, 0, 900, 20.0),
    ]
    assert matched.dropped == 7
    # Snapshots too far apart: the others joined and left between two views of the first request alone.
    missed = [stats(90, batch=1, kv=16, t=9.8), stats(140, batch=1, kv=17, t=10.8)]
    assert rows_from_snapshots(missed, envelope, point=1, tp=1, clock_mhz=900).rows == ()
    assert rows_from_snapshots(snapshots[:1], envelope, point=1, tp=1, clock_mhz=900).dropped == 0


# ---------------------------------------------------------------------------------------------
# Refusals and resets


@contextmanager
def recording_engine() -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """An HTTP server that answers 500 to everything and remembers what it was asked."""
    seen: list[tuple[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append((self.command, self.path))
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


class FakeActuator:
    """Records what it is asked; `deny` makes every lock and reset fail as NVML does without privilege."""

    name = "nvml:GPU-test"
    actuates = True

    def __init__(self, deny: bool = False) -> None:
        self.deny = deny
        self.calls: list[tuple[str, ...] | tuple[str, int]] = []

    async def supported_clocks_mhz(self) -> tuple[int, ...]:
        return (1410, 1050, 600)

    async def set_clock_mhz(self, mhz: int) -> None:
        self.calls.append(("set", mhz))
        if self.deny:  # worded as agent.gpus.nvml words it
            raise PermissionDeniedError(
                "NVML could not lock the SM clock on GPU-test (Insufficient Permissions): "
                f"{PERMISSION_ADVICE}"
            )

    async def reset(self) -> None:
        self.calls.append(("reset",))
        if self.deny:
            raise PermissionDeniedError("NVML could not reset the locked SM clock (Insufficient Permissions)")

    async def clock_mhz(self) -> int:
        return 1410

    async def close(self) -> None:
        self.calls.append(("close",))


def live(out, *flags: str) -> list[str]:
    return ["profile", "--target", "live", "--out", str(out), *flags]


URL = "http://127.0.0.1:9"


@pytest.mark.parametrize(
    "flags, message",
    [
        ((), "--target live needs --engine-url"),
        (("--engine-url", URL, "--engine", "triton"), "--engine triton needs --engine-metrics-url"),
        (("--engine-url", URL), "--api openai needs --model-name"),
        (("--engine-url", URL, "--api", "triton"), "--target live needs --actuator"),
        (("--engine-url", URL, "--api", "triton", "--actuator", "nvml"), "needs exactly one of --gpu-uuid"),
        (
            (
                "--engine-url",
                URL,
                "--api",
                "triton",
                "--actuator",
                "nvml",
                "--gpu-uuid",
                "GPU-1",
                "--gpu-index",
                "0",
            ),
            "needs exactly one of --gpu-uuid",
        ),
        (("--engine-url", URL, "--api", "triton", "--actuator", "twin"), "--actuator twin needs --twin-url"),
    ],
)
def test_a_live_profile_without_its_urls_is_refused(tmp_path, capsys, flags, message):
    assert main(live(tmp_path / "p.csv", *flags)) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


def test_live_flags_on_the_twin_target_are_refused(tmp_path, capsys):
    assert main(["profile", "--engine-url", URL, "--points", "3", "--out", str(tmp_path / "p.csv")]) == 1
    assert "--engine-url, --points only apply to --target live" in capsys.readouterr().err


def test_no_clock_permission_stops_the_profile_before_any_load(tmp_path, capsys, monkeypatch):
    actuator = FakeActuator(deny=True)

    async def build(kind: str, **_: object) -> FakeActuator:
        assert kind == "nvml"
        return actuator

    monkeypatch.setattr(live_profile, "open_engine_actuator", build)
    with recording_engine() as (url, seen):
        code = main(
            live(
                tmp_path / "p.csv",
                *("--engine-url", url, "--model-name", "llama", "--actuator", "nvml", "--gpu-index", "0"),
            )
        )
    err = capsys.readouterr().err
    assert code == 1
    assert "nvml:GPU-test refused a lock" in err and "Insufficient Permissions" in err
    assert err.count("CAP_SYS_ADMIN") == 1 and "--cap-add SYS_ADMIN" in err  # how to get the permission
    assert "THROTTLLEM_ACTUATOR=dryrun" not in err  # the sidecar's way out; no profile without clocks
    assert seen == []  # not one request, not even a stats read
    assert actuator.calls[0] == ("set", 1410) and actuator.calls[-1] == ("close",)
    assert not (tmp_path / "p.csv").exists()


class SilentAdapter:
    """A stats endpoint that never shows an iteration."""

    url = name = "fake stats"

    async def poll_all(self) -> list[EngineStats]:
        return []

    async def close(self) -> None:
        pass


def test_a_failing_point_resets_the_clock_it_locked_and_says_why():
    actuator = FakeActuator()

    async def scenario(url: str) -> None:
        config = LiveConfig(
            engine="trtllm-serve",
            engine_url=url,
            metrics_url=url,
            api="openai",
            model_name="llama",
            actuator="nvml",
            gpu_index=0,
            settle_s=0.0,
            poll_s=0.001,
        )
        async with aiohttp.ClientSession() as http:
            session = _LiveSession(
                config, AsyncExitStack(), actuator, (1410, 1050, 600), SilentAdapter(), http
            )
            session.limits = ProfileLimits(1, 256, 8192, TPB, 1000, 2048)
            with pytest.raises(
                LiveProfileError, match=r"point 3: 2 of 2 requests .* failed; first: .*HTTP 500"
            ):
                await session.run_point(1050, [100, 200], [10, 10], point=3)

    with recording_engine() as (url, seen):
        asyncio.run(scenario(url))
    assert actuator.calls == [("set", 1050), ("reset",)]
    assert sorted(seen) == [("POST", "/v1/completions")] * 2


def test_a_tp_engine_is_profiled_with_every_gpu_locked(tmp_path, capsys):
    argv = ("--engine-url", URL, "--model-name", "llama", "--actuator", "nvml", "--tp", "2")
    assert main(live(tmp_path / "p.csv", *argv, "--gpu-uuid", "GPU-a")) == 1
    assert "names 1 GPU(s) but --tp is 2" in capsys.readouterr().err
