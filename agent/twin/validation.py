"""The twin against public measurements it was not fitted to: each one replayed, then compared.

Every source below timed a real engine; each of its rows is turned into the experiment that was
run (a batch's prefill, a mean decode step, or a whole static batch: prefill then every decode
step) and replayed on the twin's latency model for the same GPU, model, TP degree and engine
runtime. Rows a source itself shows to be invalid are left out, each rule saying why.

| source | engine | GPUs | models | TP |
|---|---|---|---|---|
| `trtllm-docs` | TensorRT-LLM v0.5-v0.9, fp16 | A100-SXM4-80GB | Llama-2-7B, -70B | 1, 2, 4, 8 |
| `alcf` | TensorRT-LLM 0.11, fp16 | A100-SXM4-40GB, H100-SXM5-80GB | Llama-2, -3: 7/8B, 70B | 1, 2, 4 |
| `splitwise` | vLLM (2023 internal branch), fp16 | A100-SXM4-80GB, H100-SXM5-80GB | Llama-2-70B | 2, 4, 8 |

- `trtllm-docs`: NVIDIA/TensorRT-LLM `docs/source/performance.md` (Apache-2.0), the A100 fp16
  tables of v0.5, v0.6.1 (@77d24b5), v0.8.0 and v0.9.0, transcribed; their H100 tables are fp8
  and not used. First-token latency is one prefill at batch 1; "peak throughput" (output tokens
  per second, per GPU from v0.6.1 on) is a static batch, so its total time is batch x output
  tokens / throughput (v0.5's figure is the engine's: per GPU it would beat the HBM floor).
  Only v0.8.0 and v0.9.0 are compared (`TRTLLM_RELEASES` says why).
- `alcf`: argonne-lcf/LLM-Inference-Bench@4211f5d (BSD-3-Clause), `Plots/All_results.csv` and
  `Plots/Fig_22/all_results_TTFT_ITL.csv`, TensorRT-LLM rows on "Nvidia A100 GPU" and "Nvidia
  H100 GPU". Latency is one static batch of equal input and output lengths; TTFT a batch of 16
  prompts of 1,024 tokens. The A100 is the 40 GB part: batches stop fitting its KV cache where a
  40 GB part's would (Llama-2-7B, 32 x 2,048 tokens). Rows whose batch did not fit the KV cache
  ran in waves, not as one batch, and are left out (`_alcf_batches` says how they are found).
- `splitwise`: Mutinifni/splitwise-sim@3780880 `data/perf_model.csv` (MIT), the profiles behind
  Splitwise (Patel et al., ISCA 2024), measured on DGX-A100 and DGX-H100 with vLLM. `prompt_time`
  is the batch's prefill, `token_time` one decode iteration. Left out: `h100-80gb-pcap` (a
  scaled copy, not a measurement), TP2 at batch 64 (its KV cache held only a few of the 64
  prompts: prefill time drops, end-to-end time explodes), outputs of 1,024 tokens or more
  (their end-to-end times stop growing: the generation was cut short), and prefills of more
  than one prompt: they take as long as that many separate prefills (A100 TP4: 4 x 512 tokens
  571 ms, one prompt of 2,048 tokens 403 ms), so that engine did not prefill a batch in one
  iteration, as TensorRT-LLM's batching (the twin's) does.
"""

from __future__ import annotations

import csv
import functools
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources

import numpy as np

from agent.catalog import gpu_spec, model_spec
from agent.twin.latency import TRTLLM, VLLM_2023, EngineRuntime, LatencyModel, engine_runtime

SPLITWISE_FILE = "splitwise__perf_model.csv"
ALCF_FILE = "alcf__All_results.csv"
ALCF_TTFT_FILE = "alcf__all_results_TTFT_ITL.csv"
TRTLLM_FILE = "trtllm__performance_md__a100_fp16.csv"
MAX_DECODE_MAPE = 0.10  # the bar: decode within 10%, prefill within 15% (MAPE per group)
MAX_PREFILL_MAPE = 0.15


class Phase(StrEnum):
    """Which part of the iteration-time model a measurement mostly tests."""

    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True, slots=True)
class Experiment:
    """What was timed: `batch` requests of `prompt_tokens` each, generating `output_tokens`.

    kind "prefill": the one iteration that prefills the whole batch; "decode_step": the mean
    decode iteration while the batch generates `output_tokens`; "static_batch": the prefill plus
    every decode iteration up to the last token.
    """

    kind: str
    batch: int
    prompt_tokens: int
    output_tokens: int = 1


@dataclass(frozen=True, slots=True)
class Measurement:
    """One published timing and the setup that produced it."""

    source: str
    gpu: str  # catalog name
    model: str  # catalog name
    tp: int
    runtime: str  # the engine runtime (`agent.twin.latency.RUNTIMES`) that was timed
    experiment: Experiment
    measured_ms: float
    origin: str  # the row it came from


@dataclass(frozen=True, slots=True)
class Comparison:
    """A measurement beside the twin's replay of it."""

    measurement: Measurement
    twin_ms: float
    phase: Phase

    @property
    def error(self) -> float:
        """Relative error of the twin (positive: the twin is slower)."""
        return self.twin_ms / self.measurement.measured_ms - 1.0


def _rows(name: str) -> list[dict[str, str]]:
    text = resources.files("agent.twin").joinpath("data", name).read_text()
    return [row for row in csv.DictReader(line for line in text.splitlines() if line.strip())]


SPLITWISE_GPUS = {"a100-80gb": "a100-sxm4-80gb", "h100-80gb": "h100-sxm5-80gb"}


def splitwise() -> Iterator[Measurement]:
    """Splitwise's Llama-2-70B profiles: median of the repetitions of each configuration."""
    groups: dict[tuple[str, int, int, int, int], list[dict[str, str]]] = defaultdict(list)
    for row in _rows(SPLITWISE_FILE):
        if row["model"] != "llama2-70b" or row["hardware"] not in SPLITWISE_GPUS:
            continue
        key = (row["hardware"], int(row["tensor_parallel"]), int(row["batch_size"]))
        groups[(*key, int(row["prompt_size"]), int(row["token_size"]))].append(row)
    for (hardware, tp, batch, prompt, output), rows in sorted(groups.items()):
        if (tp == 2 and batch == 64) or output >= 1024:
            continue
        origin = f"{hardware} tp{tp} batch {batch} prompt {prompt} tokens {output} ({len(rows)} runs)"
        gpu = SPLITWISE_GPUS[hardware]
        timed = [("token_time", Experiment("decode_step", batch, prompt, output))]
        if batch == 1:
            timed.append(("prompt_time", Experiment("prefill", batch, prompt)))
        for column, experiment in timed:
            value = float(np.median([float(r[column]) for r in rows]))
            yield Measurement("splitwise", gpu, "llama2-70b", tp, VLLM_2023, experiment, value, origin)


ALCF_GPUS = {"Nvidia A100 GPU": "a100-sxm4-40gb", "Nvidia H100 GPU": "h100-sxm5-80gb"}
ALCF_MODELS = {
    "meta-llama/Llama-2-7b-hf": "llama2-7b",
    "meta-llama/Llama-2-70b-hf": "llama2-70b",
    "meta-llama/Meta-Llama-3-8B": "llama3-8b",
    "meta-llama/Meta-Llama-3-70B": "llama3-70b",
}


def _alcf_engine(row: dict[str, str]) -> tuple[str, str, int] | None:
    """(GPU, model, TP) of a TensorRT-LLM row on a GPU and model the twin knows; None otherwise."""
    if (
        row["Framework"] != "TensorRT-LLM"
        or row["Hardware"] not in ALCF_GPUS
        or row["Model"] not in ALCF_MODELS
    ):
        return None
    return ALCF_GPUS[row["Hardware"]], ALCF_MODELS[row["Model"]], int(row["Num of Hardware"])


WAVES_RATIO = 1.7  # a bigger static batch this much slower than the last ran as several batches


def _alcf_batches() -> Iterator[tuple[dict[str, str], bool]]:
    """TensorRT-LLM rows of the two GPUs, each with whether it ran in waves.

    A decode-bound static batch grows slowly with its size (at most 1.3x per listed step in these
    rows), so a step that takes 1.7x as long means the KV cache held only part of the batch and the
    rest waited: that row, and every larger batch of the same length, timed waves.
    """
    series: dict[tuple[str, str, str, str], list[dict[str, str]]] = defaultdict(list)
    for row in _rows(ALCF_FILE):
        if _alcf_engine(row) is not None:
            key = (row["Hardware"], row["Num of Hardware"], row["Model"], row["Input Output Length"])
            series[key].append(row)
    for rows in series.values():
        waves = False
        previous: float | None = None
        for row in sorted(rows, key=lambda r: int(r["Batch Size"])):
            latency = float(row["Latency"])
            waves = waves or (previous is not None and latency >= WAVES_RATIO * previous)
            previous = latency
            yield row, waves


def alcf() -> Iterator[Measurement]:
    """LLM-Inference-Bench's TensorRT-LLM static batches and batch-16 time to first token."""
    for row, waves in _alcf_batches():
        engine = _alcf_engine(row)
        if waves or engine is None:
            continue
        length, batch = int(row["Input Output Length"]), int(row["Batch Size"])
        origin = f"{row['Hardware']} x{engine[2]} {row['Model']} {length}/{length} batch {batch}"
        experiment = Experiment("static_batch", batch, length, length)
        yield Measurement("alcf", *engine, TRTLLM, experiment, float(row["Latency"]) * 1000.0, origin)
    for row in _rows(ALCF_TTFT_FILE):
        engine = _alcf_engine(row)
        if engine is None:
            continue
        batch, prompt = int(row["Batch Size"]), int(row["Input Length"])
        origin = f"{row['Hardware']} x{engine[2]} {row['Model']} TTFT, {batch} x {prompt} tokens"
        experiment = Experiment("prefill", batch, prompt)
        yield Measurement("alcf", *engine, TRTLLM, experiment, float(row["TTFT Latency"]) * 1000.0, origin)


TRTLLM_MODELS = {"LLaMA 7B": "llama2-7b", "LLaMA 70B": "llama2-70b"}
# v0.5 predates the XQA kernels Llama-70B's grouped-query attention decodes with from v0.6.1 on
# (its rows decode 1.3x slower than the same rows later); v0.6.1's A100 column is labelled once
# per engine and once per GPU. The two newest releases are unambiguous.
TRTLLM_RELEASES = ("v0.8.0", "v0.9.0")


def trtllm_docs() -> Iterator[Measurement]:
    """NVIDIA's published A100 fp16 tables: first-token latency and static-batch throughput."""
    for row in _rows(TRTLLM_FILE):
        if row["release"] not in TRTLLM_RELEASES:
            continue
        model, tp, batch = TRTLLM_MODELS[row["model"]], int(row["tp"]), int(row["batch"])
        prompt = int(row["input_len"])
        origin = f"{row['release']} {row['table']} {row['model']} tp{tp} batch {batch} input {prompt}"
        if row["table"] == "low_latency":
            experiment = Experiment("prefill", batch, prompt)
            yield Measurement(
                "trtllm-docs", "a100-sxm4-80gb", model, tp, TRTLLM, experiment, float(row["value"]), origin
            )
            continue
        output = int(row["output_len"])
        engine_tokens_s = float(row["value"]) * (tp if row["unit"] == "out tok/s/GPU" else 1)
        total_ms = 1000.0 * batch * output / engine_tokens_s
        experiment = Experiment("static_batch", batch, prompt, output)
        yield Measurement(
            "trtllm-docs", "a100-sxm4-80gb", model, tp, TRTLLM, experiment, total_ms, origin + f"/{output}"
        )


SOURCES = {"trtllm-docs": trtllm_docs, "alcf": alcf, "splitwise": splitwise}


@functools.cache
def _latency(gpu: str, model: str, tp: int, max_num_tokens: int, runtime: EngineRuntime) -> LatencyModel:
    return LatencyModel(gpu_spec(gpu), model_spec(model), tp, max_num_tokens, runtime)


def _prefill_ms(latency: LatencyModel, clock: int, batch: int, prompt: int) -> float:
    return 1000.0 * latency.iteration(clock, 0, 0, [(prompt, 0)] * batch).time_s


def _decode_steps_ms(latency: LatencyModel, clock: int, experiment: Experiment) -> np.ndarray:
    """Every decode iteration after the prefill, each sequence one token longer than the last."""
    steps = np.arange(1, experiment.output_tokens)
    context = experiment.batch * (experiment.prompt_tokens + steps)
    clocks = np.full(steps.shape, clock)
    return 1000.0 * latency.decode_time_s(clocks, np.full(steps.shape, experiment.batch), context)


def replay(measurement: Measurement, runtime: EngineRuntime | None = None) -> Comparison:
    """The twin's time for the measured experiment at stock (max) clock, on the measured runtime."""
    e = measurement.experiment
    tokens = max(e.batch * e.prompt_tokens, e.batch)
    gpu = gpu_spec(measurement.gpu)
    runtime = runtime or engine_runtime(measurement.runtime, gpu)
    latency = _latency(measurement.gpu, measurement.model, measurement.tp, tokens, runtime)
    clock = latency.gpu.max_clock_mhz
    if e.kind == "prefill":
        return Comparison(measurement, _prefill_ms(latency, clock, e.batch, e.prompt_tokens), Phase.PREFILL)
    decode = _decode_steps_ms(latency, clock, e)
    if e.kind == "decode_step":
        return Comparison(measurement, float(np.mean(decode)), Phase.DECODE)
    prefill = _prefill_ms(latency, clock, e.batch, e.prompt_tokens)
    total = prefill + float(np.sum(decode))
    return Comparison(measurement, total, Phase.DECODE if prefill < total / 2 else Phase.PREFILL)


def comparisons(sources: Iterable[str] = tuple(SOURCES)) -> list[Comparison]:
    """Every measurement of `sources` beside the twin's replay of it."""
    return [replay(m) for name in sources for m in SOURCES[name]()]


@dataclass(frozen=True, slots=True)
class GroupError:
    """How far the twin is from one source on one GPU, TP degree and phase."""

    source: str
    runtime: str
    gpu: str
    tp: int
    phase: Phase
    points: int
    mape: float
    max_error: float  # signed error of the worst point
    bias: float  # median signed error (negative: the twin is too fast)

    @property
    def limit(self) -> float:
        """The MAPE this group must stay under."""
        return MAX_DECODE_MAPE if self.phase is Phase.DECODE else MAX_PREFILL_MAPE

    @property
    def within_limit(self) -> bool:
        """Whether the group meets its bar."""
        return self.mape <= self.limit


def group_errors(results: Iterable[Comparison]) -> list[GroupError]:
    """MAPE per (source, runtime, GPU, TP, phase)."""
    groups: dict[tuple[str, str, str, int, Phase], list[float]] = defaultdict(list)
    for c in results:
        m = c.measurement
        groups[(m.source, m.runtime, m.gpu, m.tp, c.phase)].append(c.error)
    out = []
    for (source, runtime, gpu, tp, phase), errors in sorted(groups.items()):
        e = np.asarray(errors)
        worst = float(e[int(np.argmax(np.abs(e)))])
        mape, bias = float(np.mean(np.abs(e))), float(np.median(e))
        out.append(GroupError(source, runtime, gpu, tp, phase, len(e), mape, worst, bias))
    return out
