"""Prometheus text exposition exactly as Triton writes it (prometheus-cpp 1.0.1 `TextSerializer`).

Triton does not use a Python client: its metrics port serialises one prometheus-cpp `Registry`
(reference/interfaces.md §9; `jupp0r/prometheus-cpp:core/src/registry.cc`,
`core/src/text_serializer.cc`). What that means for the bytes:

- families come out grouped by type: every counter family, then gauges, then histograms, each
  group in registration order; a family with no series is skipped;
- per family `# HELP <name> <help>` and `# TYPE <name> <type>`, then one line per series, no
  timestamps, no `_created`, counters keep their name (no `_total`);
- labels sorted by name (a `std::map`); a histogram prints `_count`, `_sum`, then one `_bucket`
  per bound with `le` appended after the sorted labels, then `le="+Inf"`;
- doubles print like `printf("%.16g")` (`6239`, `0.4875`, `1727911542275675`), NaN as `Nan`,
  infinities as `+Inf` / `-Inf`; histogram counts are integers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

Labels = tuple[tuple[str, str], ...]


class MetricType(StrEnum):
    """Family types in the order prometheus-cpp's registry collects them."""

    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


_TYPE_ORDER = {MetricType.COUNTER: 0, MetricType.GAUGE: 1, MetricType.HISTOGRAM: 2}


@dataclass(slots=True)
class Histogram:
    """Cumulative bucket counts over fixed upper bounds, plus count and sum of observations."""

    bounds: tuple[float, ...]  # upper bounds, ascending, without +Inf
    buckets: list[int] = field(default_factory=list)  # cumulative count per bound
    count: int = 0
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.buckets:
            self.buckets = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        """Add one observation."""
        self.count += 1
        self.total += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.buckets[i] += 1


@dataclass(slots=True)
class Series:
    """One labelled time series; `value` is a number or, in a histogram family, a `Histogram`."""

    labels: Labels  # (name, value) pairs; printed sorted by name
    value: float | Histogram = 0.0


@dataclass(slots=True)
class Family:
    """A metric family and its series, in the order they are printed."""

    name: str
    help: str
    type: MetricType
    series: list[Series] = field(default_factory=list)

    def add(self, labels: Iterable[tuple[str, str]], value: float | Histogram = 0.0) -> Series:
        """Register a series (its position is its place in the output)."""
        series = Series(tuple(labels), value)
        self.series.append(series)
        return series


def format_value(value: float) -> str:
    """A double as prometheus-cpp 1.0.1 writes it: `%.16g`, `Nan`, `+Inf`, `-Inf`."""
    if math.isnan(value):
        return "Nan"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return format(float(value), ".16g")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _head(name: str, labels: Labels, extra: tuple[str, str] | None = None) -> str:
    pairs = [f'{key}="{_escape_label(value)}"' for key, value in sorted(labels)]
    if extra is not None:
        pairs.append(f'{extra[0]}="{extra[1]}"')
    return f"{name}{{{','.join(pairs)}}} " if pairs else f"{name} "


def _histogram_lines(name: str, labels: Labels, hist: Histogram) -> list[str]:
    lines = [
        f"{_head(name + '_count', labels)}{hist.count}",
        f"{_head(name + '_sum', labels)}{format_value(hist.total)}",
    ]
    for bound, cumulative in zip(hist.bounds, hist.buckets, strict=True):
        lines.append(f"{_head(name + '_bucket', labels, ('le', format_value(bound)))}{cumulative}")
    lines.append(f"{_head(name + '_bucket', labels, ('le', '+Inf'))}{hist.count}")
    return lines


def render(families: Sequence[Family]) -> str:
    """The text of one scrape."""
    lines: list[str] = []
    for family in sorted(families, key=lambda f: _TYPE_ORDER[f.type]):  # stable: keeps registration order
        if not family.series:
            continue
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.type}")
        for series in family.series:
            if isinstance(series.value, Histogram):
                lines.extend(_histogram_lines(family.name, series.labels, series.value))
            else:
                lines.append(f"{_head(family.name, series.labels)}{format_value(series.value)}")
    return "".join(line + "\n" for line in lines)
