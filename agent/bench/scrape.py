"""Reading live processes over HTTP: Prometheus pages and JSON documents, tolerant of a process gone.

A demo or benchmark polls processes that may be starting, stopping or killed; a failed read is
`None`, never an exception, so one bad poll costs one sample and not the run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from agent.engines.prometheus_text import Samples, samples_by_name, value

POLL_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class MetricsPage:
    """One scrape: every sample by sample name, read as the engine adapters read them."""

    samples: Samples

    @classmethod
    def parse(cls, text: str) -> MetricsPage:
        """Parse Prometheus text exposition (ValueError when it is not)."""
        return cls(samples_by_name(text))

    def value(self, name: str, **labels: str) -> float | None:
        """The first sample called `name` carrying `labels` (others may differ); None if absent."""
        return value(self.samples, name, labels)

    def buckets(self, histogram: str) -> list[tuple[float, float]]:
        """(upper bound, cumulative count) of a histogram's buckets, by bound."""
        rows = [
            (float(s.labels["le"]), float(s.value))
            for s in self.samples.get(f"{histogram}_bucket", ())
            if "le" in s.labels
        ]
        return sorted(rows)

    def histogram_quantile(self, histogram: str, q: float) -> float | None:
        """The q-quantile (0..1) estimated from buckets as Prometheus does (see `bucket_quantile`)."""
        return bucket_quantile(self.buckets(histogram), q)


def bucket_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """Prometheus' `histogram_quantile`: linear within the bucket holding the rank.

    An estimate, not a measurement: the answer lies somewhere in that bucket. A rank in the +Inf
    bucket answers the highest finite bound. None when the histogram is empty.
    """
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


async def get_page(session: aiohttp.ClientSession, url: str) -> MetricsPage | None:
    """The Prometheus page at `url`, or None when it cannot be read or parsed."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=POLL_TIMEOUT_S)) as response:
            if response.status != 200:
                return None
            return MetricsPage.parse(await response.text())
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    """The JSON object at `url`, or None when it cannot be read."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=POLL_TIMEOUT_S)) as response:
            if response.status != 200:
                return None
            document = await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    return document if isinstance(document, dict) else None
