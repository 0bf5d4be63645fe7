"""Workloads to replay: production traces (Azure 2023/2024, BurstGPT) and synthetic arrivals."""

from agent.workloads.columns import TraceFormatError
from agent.workloads.synthetic import (
    ArrivalProcess,
    GammaArrivals,
    LogNormalLengths,
    PoissonArrivals,
    synthetic_from_spec,
    synthetic_workload,
)
from agent.workloads.timestamps import parse_timestamps_ns
from agent.workloads.traces import SHIPPED_TRACES, load_trace
from agent.workloads.workload import Workload

__all__ = [
    "SHIPPED_TRACES",
    "ArrivalProcess",
    "GammaArrivals",
    "LogNormalLengths",
    "PoissonArrivals",
    "TraceFormatError",
    "Workload",
    "load_trace",
    "parse_timestamps_ns",
    "synthetic_from_spec",
    "synthetic_workload",
]
