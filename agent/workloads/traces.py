"""Load production request traces (Azure LLM inference 2023/2024, BurstGPT) as Workloads.

Traces only give lengths, never texts: a request is replayed with a synthetic prompt of the traced
length and generates the traced number of tokens. A zero in a trace cannot be replayed (an engine
needs at least one prompt token and always emits at least one token), so zero prompt and output
lengths are raised to 1 token.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from os import PathLike
from pathlib import Path
from typing import TextIO

import numpy as np

from agent.workloads.columns import Converter, TraceFormatError, read_columns, read_header
from agent.workloads.timestamps import NS_PER_S, parse_timestamps_ns
from agent.workloads.workload import Workload

SHIPPED_TRACES = {
    "azure-conv": "AzureLLMInferenceTrace_conv.csv",
    "azure-code": "AzureLLMInferenceTrace_code.csv",
}
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
# Newer BurstGPT files add "Session ID" and "Elapsed time"; columns are found by name.
BURSTGPT_COLUMNS = ("Timestamp", "Model", "Request tokens", "Response tokens", "Log Type")
BURSTGPT_MODELS = ("ChatGPT", "GPT-4")
BURSTGPT_LOG_TYPES = ("Conversation log", "API log")


def load_trace(
    name_or_path: str | PathLike[str],
    *,
    model: str | None = None,
    log_type: str | None = None,
    keep_failed: bool = False,
) -> Workload:
    """Load a shipped trace by name (see SHIPPED_TRACES) or a trace file, detecting its format.

    Azure files (2023 and the 2024 week-long ones) need the columns AZURE_COLUMNS. BurstGPT files
    need BURSTGPT_COLUMNS and can be filtered by `model` and `log_type`; their failed requests
    (0 response tokens) are dropped unless `keep_failed`. BurstGPT timestamps are whole seconds,
    so requests logged in the same second arrive together.
    """
    if isinstance(name_or_path, str) and name_or_path in SHIPPED_TRACES:
        file: Path | Traversable = resources.files("agent.workloads") / "data" / SHIPPED_TRACES[name_or_path]
        name = name_or_path
    else:
        file = Path(name_or_path)
        name = file.stem
    source = str(file)
    try:
        with file.open("r", encoding="utf-8-sig") as stream:
            return _read_any(stream, source, name, model, log_type, keep_failed)
    except FileNotFoundError:
        shipped = ", ".join(SHIPPED_TRACES)
        raise FileNotFoundError(f"{source}: no such trace file (shipped traces: {shipped})") from None
    except UnicodeDecodeError:
        raise TraceFormatError(f"{source}: not a UTF-8 text file") from None


def _read_any(
    stream: TextIO, source: str, name: str, model: str | None, log_type: str | None, keep_failed: bool
) -> Workload:
    """Detect the format from the header and read the rows."""
    header = read_header(stream, source)
    if set(AZURE_COLUMNS) <= set(header):
        if model is not None or log_type is not None:
            raise ValueError(f"{source} is an Azure trace: model and log_type filter BurstGPT traces only")
        return _read_azure(stream, source, header, name)
    if set(BURSTGPT_COLUMNS) <= set(header):
        return _read_burstgpt(stream, source, header, name, model, log_type, keep_failed)
    raise TraceFormatError(
        f"{source}: unrecognised trace header {header}; expected the Azure columns {list(AZURE_COLUMNS)}"
        f" or the BurstGPT columns {list(BURSTGPT_COLUMNS)}"
    )


def _read_azure(stream: TextIO, source: str, header: list[str], name: str) -> Workload:
    """Azure rows: arrival timestamp, prompt (context) and generated token counts."""
    columns = read_columns(
        stream,
        source,
        header,
        {"TIMESTAMP": parse_timestamps_ns, "ContextTokens": _token_counts, "GeneratedTokens": _token_counts},
    )
    ns = columns["TIMESTAMP"]
    arrival_s = (ns - ns.min()) / NS_PER_S if len(ns) else np.zeros(0)  # subtract in int: keep the ns
    return _workload(name, arrival_s, columns["ContextTokens"], columns["GeneratedTokens"])


def _read_burstgpt(
    stream: TextIO,
    source: str,
    header: list[str],
    name: str,
    model: str | None,
    log_type: str | None,
    keep_failed: bool,
) -> Workload:
    """BurstGPT rows, filtered by model, log type and success."""
    filters = {"Model": model, "Log Type": log_type}
    wanted = {column: value for column, value in filters.items() if value is not None}
    converters = {
        "Timestamp": _seconds,
        "Request tokens": _token_counts,
        "Response tokens": _token_counts,
        **{column: _equals(value) for column, value in wanted.items()},
    }
    columns = read_columns(stream, source, header, converters)
    keep = np.ones(len(columns["Timestamp"]), dtype=bool)
    for column in wanted:
        keep &= columns[column]
    if not keep_failed:
        keep &= columns["Response tokens"] > 0
    if len(keep) and not keep.any():
        raise ValueError(
            f"{source}: no request left with model={model!r}, log_type={log_type!r},"
            f" keep_failed={keep_failed}; BurstGPT models are {list(BURSTGPT_MODELS)},"
            f" log types {list(BURSTGPT_LOG_TYPES)}"
        )
    label = ", ".join(wanted.values())
    return _workload(
        f"{name}[{label}]" if label else name,
        columns["Timestamp"][keep],
        columns["Request tokens"][keep],
        columns["Response tokens"][keep],
    )


def _workload(name: str, arrival_s: np.ndarray, prompt: np.ndarray, output: np.ndarray) -> Workload:
    """Build a Workload, raising zero lengths to one token (see the module docstring)."""
    return Workload.from_arrivals(name, arrival_s, np.maximum(prompt, 1), np.maximum(output, 1))


def _token_counts(values: list[str]) -> np.ndarray:
    """Non-negative integer token counts."""
    counts = np.fromiter(map(int, values), np.int64, len(values))
    if not np.all(counts >= 0):
        raise ValueError(f"negative token count {values[int(np.argmin(counts >= 0))]!r}")
    return counts


def _seconds(values: list[str]) -> np.ndarray:
    """Finite, non-negative timestamps in seconds."""
    seconds = np.fromiter(map(float, values), np.float64, len(values))
    valid = np.isfinite(seconds) & (seconds >= 0)
    if not valid.all():
        raise ValueError(f"not a finite number of seconds >= 0: {values[int(np.argmin(valid))]!r}")
    return seconds


def _equals(wanted: str) -> Converter:
    """Make a converter telling which values of a text column equal `wanted`."""

    def convert(values: list[str]) -> np.ndarray:
        return np.array(values, dtype=str) == wanted

    return convert
