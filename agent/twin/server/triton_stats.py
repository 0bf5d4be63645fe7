"""Triton's statistics extension (`GET v2/models[/<m>[/versions/<v>]]/stats`), counted as the twin serves.

The document is `TRITONSERVER_ServerModelStatistics`'s (`core:src/tritonserver.cc`): per model
and version `last_inference` (ms since the epoch), `inference_count`, `execution_count`, then
`inference_stats` (success, fail, queue, compute_input/infer/output, cache_hit/miss: each a
count and nanoseconds), `response_stats`, `batch_stats` and `memory_usage`, models sorted by
name. The HTTP handlers feed it: each request the engine took, once its last response is out
(or its client left), and each request the engine refused.

Times are twin time on the twin clock's epoch, as the response's perf-metric outputs are:

    success        arrival -> last token           queue    arrival -> first scheduled iteration
    compute_infer  first scheduled -> last token   compute_input / compute_output: 0 ns

`ensemble` and `tensorrt_llm` carry the same figures, as their `nv_inference_*` metrics do
(one execution of batch size 1 per request, as the TensorRT-LLM backend reports each request).
The twin gives tokenization no time: `preprocessing` executes once per request the engine saw,
`postprocessing` once per response the engine sent (one per token when streamed), in 0 ns.
Failures count with their time from arrival; no response is cached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.twin.server.metrics import TRT_LLM_MODEL
from agent.twin.server.protocol import MODEL_VERSION
from agent.twin.server.triton_config import POSTPROCESSING_MODEL, PREPROCESSING_MODEL, repository_models

NANOS_PER_MS = 1_000_000


@dataclass(frozen=True, slots=True)
class ServedRequest:
    """How one request ended, in nanoseconds since the epoch (twin time on the twin clock)."""

    arrival_ns: int
    first_scheduled_ns: int | None  # None: never scheduled (refused, or stopped while queued)
    end_ns: int  # last response, or the error that ended it
    failed: bool
    responses: int  # responses the engine sent without error (one per token when streamed)


@dataclass(slots=True)
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def document(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass(slots=True)
class _ModelStats:
    """One model version's counters, as Triton's `InferenceStatsAggregator` keeps them."""

    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute_input: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    compute_output: _Duration = field(default_factory=_Duration)

    def succeeded(
        self, *, end_ns: int, request_ns: int, queue_ns: int, infer_ns: int, executions: int = 1
    ) -> None:
        """`executions` executions of batch size 1 that together took these durations."""
        self.last_inference_ms = max(self.last_inference_ms, end_ns // NANOS_PER_MS)
        self.inference_count += executions
        self.execution_count += executions
        self.success.add(request_ns, executions)
        self.queue.add(queue_ns, executions)
        self.compute_input.add(0, executions)
        self.compute_infer.add(infer_ns, executions)
        self.compute_output.add(0, executions)

    def document(self, name: str) -> dict[str, Any]:
        batch_stats = [
            {
                "batch_size": 1,
                "compute_input": self.compute_input.document(),
                "compute_infer": self.compute_infer.document(),
                "compute_output": self.compute_output.document(),
            }
        ]
        return {
            "name": name,
            "version": MODEL_VERSION,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.document(),
                "fail": self.fail.document(),
                "queue": self.queue.document(),
                "compute_input": self.compute_input.document(),
                "compute_infer": self.compute_infer.document(),
                "compute_output": self.compute_output.document(),
                "cache_hit": _Duration().document(),
                "cache_miss": _Duration().document(),
            },
            "response_stats": {},
            "batch_stats": batch_stats if self.execution_count else [],
            "memory_usage": [],
        }


class TritonStatistics:
    """Every repository model's statistics, for one served ensemble name."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self._models = {name: _ModelStats() for name in repository_models(model_name)}

    def models(self) -> list[str]:
        """The models with statistics, sorted by name."""
        return list(self._models)

    def record(self, served: ServedRequest) -> None:
        """Count one request the engine took or refused."""
        arrival, end = served.arrival_ns, served.end_ns
        self._models[PREPROCESSING_MODEL].succeeded(end_ns=arrival, request_ns=0, queue_ns=0, infer_ns=0)
        if served.responses:
            self._models[POSTPROCESSING_MODEL].succeeded(
                end_ns=end, request_ns=0, queue_ns=0, infer_ns=0, executions=served.responses
            )
        for name in dict.fromkeys((self.model_name, TRT_LLM_MODEL)):  # one model when named alike
            stats = self._models[name]
            if served.failed:
                stats.fail.add(end - arrival)
                continue
            scheduled = arrival if served.first_scheduled_ns is None else served.first_scheduled_ns
            stats.succeeded(
                end_ns=end, request_ns=end - arrival, queue_ns=scheduled - arrival, infer_ns=end - scheduled
            )

    def document(self, names: list[str]) -> dict[str, Any]:
        """The statistics document for `names` (each one of `models()`)."""
        return {"model_stats": [self._models[name].document(name) for name in names]}
