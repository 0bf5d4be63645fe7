"""Meter that scrapes dcgm-exporter's `/metrics`, for clusters where NVML is not in the pod.

Families (interfaces.md §5, default-counters.csv): `DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION`, a
counter in mJ, and `DCGM_FI_DEV_POWER_USAGE`, a gauge in W, one series per GPU labelled
`gpu="<NVML index>"` and `UUID="GPU-..."`. The exporter refreshes them every collect interval
(30 s by default; `-c 1000` for per-second energy), so energy moves in steps of that size.

DCGM prints "blank" sentinels instead of values it does not have (dcgm_structs.h:
DCGM_INT64_BLANK = 0x7ffffffffffffff0, DCGM_FP64_BLANK = 2**47; +1 not found, +2 not
supported, +3 no permission).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from agent.gpus.base import (
    EnergyAccumulator,
    GpuControlError,
    GpuNotFoundError,
    NotSupportedError,
    TransientGpuError,
)

log = logging.getLogger(__name__)

DEFAULT_URL = "http://localhost:9400/metrics"
DEFAULT_TIMEOUT_S = 5.0
ENERGY_FAMILY = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
POWER_FAMILY = "DCGM_FI_DEV_POWER_USAGE"
INT64_BLANK = 0x7FFFFFFFFFFFFFF0  # integer fields (energy)
FP64_BLANK = 2.0**47  # float fields (power)
NOT_SUPPORTED_OFFSET = 2  # BLANK + 2: DCGM_*_NOT_SUPPORTED


@dataclass(frozen=True, slots=True)
class GpuSelector:
    """Which GPU's series to read: by UUID label (preferred) or by `gpu` index label."""

    uuid: str | None
    index: int | None

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether a series belongs to the selected GPU."""
        if self.uuid is not None:
            return labels.get("UUID") == self.uuid
        return labels.get("gpu") == str(self.index)

    def __str__(self) -> str:
        return f"UUID={self.uuid}" if self.uuid is not None else f"gpu={self.index}"


def read_family(text: str, family: str, blank: float, gpu: GpuSelector, source: str) -> float:
    """The value of `family` for the selected GPU in one exposition text.

    Families are matched by name, not by sample name: the parser names a counter's samples
    `<family>_total` although dcgm-exporter prints them without the suffix. With MIG, several
    series carry the same GPU; device-level fields are equal on all, so the first is taken.
    """
    try:
        families = {f.name: f for f in text_string_to_metric_families(text)}
    except ValueError as err:
        raise GpuControlError(f"{source} sent metrics that do not parse: {err}") from err
    if family not in families:
        raise NotSupportedError(
            f"{source} exports no {family}: enable it in the exporter's counters CSV "
            "(-f / DCGM_EXPORTER_COLLECTORS; default-counters.csv includes it)"
        )
    samples = families[family].samples
    for sample in samples:
        if gpu.matches(sample.labels):
            return _check_blank(sample.value, blank, family, gpu, source)
    listed = sorted({f"UUID={s.labels.get('UUID')} gpu={s.labels.get('gpu')}" for s in samples})
    raise GpuNotFoundError(f"{source} has no {family} series for {gpu}; it lists: {', '.join(listed)}")


def _check_blank(value: float, blank: float, family: str, gpu: GpuSelector, source: str) -> float:
    """Reject DCGM's sentinels; `value` stays an int for integer fields, so offsets are exact."""
    if value < blank:
        return float(value)
    what = f"{source} reports no value for {family} of {gpu} (DCGM blank {value:.0f})"
    if value - blank == NOT_SUPPORTED_OFFSET:
        raise NotSupportedError(f"{what}: this GPU does not support it")
    raise TransientGpuError(f"{what}: the exporter may still be starting; retry later")


class DcgmMeter:
    """Energy and power of one GPU from dcgm-exporter."""

    def __init__(
        self, session: aiohttp.ClientSession, url: str, gpu: GpuSelector, accumulator: EnergyAccumulator
    ) -> None:
        self._session = session
        self._url = url
        self._gpu = gpu
        self._energy = accumulator

    @classmethod
    async def open(
        cls,
        url: str = DEFAULT_URL,
        *,
        uuid: str | None = None,
        index: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> DcgmMeter:
        """Scrape once, check both families and the GPU are there; energy is counted from here."""
        if (uuid is None) == (index is None):
            raise ValueError("select the GPU by exactly one of uuid (preferred) or index")
        gpu = GpuSelector(uuid, index)
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s))
        meter = cls(session, url, gpu, EnergyAccumulator(f"dcgm:{gpu}"))
        try:
            text = await meter._scrape()
            read_family(text, POWER_FAMILY, FP64_BLANK, gpu, meter._source)
            meter._energy.update(read_family(text, ENERGY_FAMILY, INT64_BLANK, gpu, meter._source) / 1000.0)
        except BaseException:
            await session.close()
            raise
        log.info("dcgm meter on %s at %s", gpu, url)
        return meter

    @property
    def name(self) -> str:
        """Backend and GPU selector."""
        return f"dcgm:{self._gpu}"

    @property
    def _source(self) -> str:
        return f"dcgm-exporter at {self._url}"

    async def energy_j(self) -> float:
        """Joules since open, from the exporter's copy of the driver's energy counter."""
        text = await self._scrape()
        return self._energy.update(
            read_family(text, ENERGY_FAMILY, INT64_BLANK, self._gpu, self._source) / 1000.0
        )

    async def power_w(self) -> float:
        """Board power as of the exporter's last collection."""
        return read_family(await self._scrape(), POWER_FAMILY, FP64_BLANK, self._gpu, self._source)

    async def close(self) -> None:
        """Close the HTTP session."""
        await self._session.close()

    async def _scrape(self) -> str:
        """One scrape; an unreachable or failing exporter is transient (it restarts)."""
        try:
            async with self._session.get(self._url) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as err:
            raise TransientGpuError(
                f"{self._source} is unreachable ({err!r}): check that dcgm-exporter runs and the URL is right"
            ) from err
        if status != 200:
            raise TransientGpuError(f"{self._source} answered HTTP {status}: {text[:200]!r}")
        return text
