"""Run the faults in turn on one stack and print the table (`throttllem bench faults`).

One twin and its proxies serve the whole run; each fault starts its own sidecar (and node agent)
and `Stack.clear` stops them and puts the twin back at stock before the next, so no two
controllers ever steer the twin at once. The run is bounded: each fault has its own time limit,
and a fault that breaks the suite itself (a process that will not start) is a row that failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from agent.bench.faults.scenarios import FAULTS, FaultResult
from agent.bench.faults.stack import StackConfig, open_stack
from agent.bench.processes import ProcessGroup, ProcessStartError

FAULT_TIMEOUT_S = 90.0
Progress = Callable[[float], None]


@dataclass(frozen=True, slots=True)
class SuiteConfig:
    """Which faults, with or without the node agent, on which stack."""

    stack: StackConfig
    faults: Sequence[str] = tuple(FAULTS)
    node_agent: bool = True  # also run the faults that have a node-agent variant with it
    without_node_agent: bool = True  # and without it


def planned_runs(config: SuiteConfig) -> list[tuple[str, bool]]:
    """(fault, with node agent) in the order they run."""
    unknown = [name for name in config.faults if name not in FAULTS]
    if unknown:
        raise ValueError(f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    wanted = {False: config.without_node_agent, True: config.node_agent}
    runs = []
    for name in config.faults:
        _, variants = FAULTS[name]
        if len(variants) == 1:  # a fault that exists one way only runs that way
            runs.append((name, variants[0]))
        else:
            runs += [(name, agent) for agent in variants if wanted[agent]]
    return runs


async def run_suite(config: SuiteConfig, progress: Progress = lambda _: None) -> list[FaultResult]:
    """Every planned fault's result; every process started is stopped on the way out."""
    runs = planned_runs(config)
    results = []
    async with ProcessGroup(config.stack.log_dir) as group, open_stack(config.stack, group) as stack:
        for done, (name, node_agent) in enumerate(runs):
            fault, _ = FAULTS[name]
            try:
                result = await asyncio.wait_for(fault(stack, node_agent), FAULT_TIMEOUT_S)
            except (TimeoutError, RuntimeError, ProcessStartError) as exc:
                result = FaultResult(node_agent, targets={"fault ran": False}, note=_first_line(exc))
            results.append(replace(result, fault=name))
            await stack.clear()
            progress((done + 1) / len(runs))
    return results


def _first_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300]


COLUMNS = ("fault", "agent", "clock 2 s later", "stock after s", "sent", "answered", "rejected", "lost",
           "RSS peak MiB", "recovery s", "held")  # fmt: skip


def table_rows(results: Sequence[FaultResult]) -> list[tuple[str, ...]]:
    """The rows of the printed table, as strings."""

    def number(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    rows = []
    for r in results:
        failed = [name for name, met in r.targets.items() if not met]
        held = "n/a" if not r.targets else ("yes" if not failed else "NO: " + ", ".join(failed))
        rows.append(
            (
                r.fault,
                "yes" if r.node_agent else "no",
                r.clock_2s,
                number(r.stock_after_s),
                str(r.traffic.sent),
                str(r.traffic.answered),
                str(r.traffic.rejected),
                str(r.traffic.lost),
                number(r.rss_peak_mb, 0),
                number(r.recovery_s),
                held,
            )
        )
    return rows


def table_markdown(results: Sequence[FaultResult]) -> str:
    """The table as Markdown (README and closing notes)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return "\n".join(lines) + "\n"
