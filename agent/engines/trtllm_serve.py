"""trtllm-serve: `EngineStats` from the executor iteration stats its `GET /metrics` returns.

The endpoint answers a JSON array of TRT-LLM `IterationStats` records and *drains* them: each
record is returned once (reference/interfaces.md §1.6). So every record is a new iteration, with
its measured latency (`iterLatencyMS`) and executor queue length — the richest source we read.
`poll()` keeps only the newest; `poll_all()` returns them all.

- An empty array means no iteration since the last poll (None, healthy). If it never holds
  records, the PyTorch backend was started without `enable_iter_perf_stats: true`.
- A record that does not parse, lacks what `EngineStats` needs (timestamp, KV-cache or
  in-flight batching stats) or holds implausible counts (`agent.engines.base.plausible`), is
  skipped and logged; when no record of a non-empty array is
  usable the format is not what we read, and the poll raises `MalformedMetricsError`.
- An iteration counter that goes backwards is an engine restart (logged, counted); a repeated
  record (same counter and timestamp) is dropped.
- Timestamps are read as UTC, like the twin writes them (see `agent.engines.trtllm_stats`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Unpack

from agent.domain import EngineStats
from agent.engines.base import IterationChange, MalformedMetricsError, plausible
from agent.engines.http import HttpOptions, HttpPollingAdapter
from agent.engines.trtllm_stats import parse_executor_record, to_engine_stats


@dataclass(frozen=True, slots=True)
class ServeBatch:
    """The records of one `/metrics` answer: those `EngineStats` can be built from, and why not the rest."""

    stats: tuple[EngineStats, ...]  # usable records, in the order the engine returned them
    rejected: tuple[str, ...]  # one reason per skipped record


def parse_serve_metrics(text: str) -> ServeBatch:
    """Read a trtllm-serve `/metrics` body record by record, so one bad record loses only itself."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedMetricsError(
            f"iteration stats are not JSON ({exc}); check the URL is trtllm-serve's /metrics"
            " (not /prometheus/metrics)"
        ) from exc
    if not isinstance(data, list):
        raise MalformedMetricsError(
            f"iteration stats must be a JSON array, got {type(data).__name__}; check the URL is"
            " trtllm-serve's /metrics"
        )
    stats: list[EngineStats] = []
    rejected: list[str] = []
    for i, obj in enumerate(data):
        where = f"record {i}"
        try:
            parsed = parse_executor_record(obj, where)  # its errors name the record already
        except ValueError as exc:
            rejected.append(str(exc))
            continue
        try:
            stats.append(plausible(to_engine_stats(parsed)))
        except (ValueError, MalformedMetricsError) as exc:
            rejected.append(f"{where}: {exc}")
    if rejected and not stats:
        raise MalformedMetricsError(f"no usable iteration stats record; first problem: {rejected[0]}")
    return ServeBatch(stats=tuple(stats), rejected=tuple(rejected))


class TrtllmServeAdapter(HttpPollingAdapter):
    """Polls trtllm-serve's iteration stats (same port as its OpenAI API, default 8000).

    `http`: timeout and session, see `HttpPollingAdapter`. Polling drains the engine's queue, so
    only one reader may poll an engine.
    """

    kind = "trtllm-serve"
    accept = "application/json"

    def __init__(self, url: str, **http: Unpack[HttpOptions]) -> None:
        super().__init__(url, **http)
        self.skipped_records = 0  # records dropped as malformed since start

    def _ingest(self, body: str) -> list[EngineStats]:
        batch = parse_serve_metrics(body)
        if batch.rejected:
            self.skipped_records += len(batch.rejected)
            self._log.warning(
                "%s: skipped %d malformed iteration stats record(s): %s",
                self.name,
                len(batch.rejected),
                "; ".join(batch.rejected),
            )
        return [
            s for s in batch.stats if self._observe(s.iteration, s.timestamp_s) is not IterationChange.SAME
        ]
