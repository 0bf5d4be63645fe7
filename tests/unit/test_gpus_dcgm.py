"""DcgmMeter against a fake dcgm-exporter on loopback, serving lines as the real one prints them."""

import asyncio
import socket

import pytest
from aiohttp import web

from agent.gpus import (
    DcgmMeter,
    GpuNotFoundError,
    NotSupportedError,
    TransientGpuError,
    build_meter,
)

UUID0 = "GPU-22dbdd79-f55a-92a8-aa39-322198e72ed6"
UUID7 = "GPU-b60b817a-..."  # elided as in interfaces.md §5
LABELS0 = (
    f'gpu="0",UUID="{UUID0}",pci_bus_id="00000000:53:00.0",device="nvidia0",'
    'modelName="NVIDIA H100 80GB HBM3",Hostname="ip-100-64-171-120.ec2.internal",'
    'DCGM_FI_DRIVER_VERSION="580.105.08"'
)
LABELS7 = (
    f'gpu="7",UUID="{UUID7}",pci_bus_id="00000000:CA:00.0",device="nvidia7",'
    'modelName="NVIDIA H100 80GB HBM3",Hostname="ip-100-64-171-120.ec2.internal",'
    'DCGM_FI_DRIVER_VERSION="580.105.08"'
)
# Verbatim from interfaces.md §5 (real output, driver 580).
POWER_LINE = (
    'DCGM_FI_DEV_POWER_USAGE{gpu="0",UUID="GPU-22dbdd79-f55a-92a8-aa39-322198e72ed6",'
    'pci_bus_id="00000000:53:00.0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",'
    'Hostname="ip-100-64-171-120.ec2.internal",DCGM_FI_DRIVER_VERSION="580.105.08"} 67.351000'
)
TEMP_LINE = (
    'DCGM_FI_DEV_GPU_TEMP{gpu="7",UUID="GPU-b60b817a-...",pci_bus_id="00000000:CA:00.0",'
    'device="nvidia7",modelName="NVIDIA H100 80GB HBM3",Hostname="ip-100-64-171-120.ec2.internal",'
    'DCGM_FI_DRIVER_VERSION="580.105.08"} 28'
)
NOT_SUPPORTED = 9223372036854775794  # DCGM_INT64_NOT_SUPPORTED, as in dcgm-exporter's README


def exposition(energy0_mj: int, energy7_mj: int = 7_000_000, with_energy: bool = True) -> str:
    lines = [
        "# HELP DCGM_FI_DEV_GPU_TEMP GPU temperature (in C).",
        "# TYPE DCGM_FI_DEV_GPU_TEMP gauge",
        TEMP_LINE,
        "# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).",
        "# TYPE DCGM_FI_DEV_POWER_USAGE gauge",
        POWER_LINE,
        f"DCGM_FI_DEV_POWER_USAGE{{{LABELS7}}} 301.250000",
    ]
    if with_energy:
        lines += [
            "# HELP DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION Total energy consumption since boot (in mJ).",
            "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter",
            f"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{LABELS0}}} {energy0_mj}",
            f"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{LABELS7}}} {energy7_mj}",
        ]
    return "\n".join(lines) + "\n"


class FakeExporter:
    def __init__(self) -> None:
        self.text = exposition(123_456_789)
        self.status = 200
        self.scrapes = 0

    async def metrics(self, request: web.Request) -> web.Response:
        self.scrapes += 1
        return web.Response(text=self.text, status=self.status, content_type="text/plain")


async def serve(fake: FakeExporter) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/metrics", fake.metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}/metrics"


def with_exporter(fake: FakeExporter, body):
    """Run `body(url)` with the fake exporter up, tearing it down whatever happens."""

    async def scenario():
        runner, url = await serve(fake)
        try:
            return await body(url)
        finally:
            await runner.cleanup()

    return asyncio.run(scenario())


@pytest.mark.parametrize("selector", [{"uuid": UUID0}, {"index": 0}])
def test_energy_since_open_in_joules_and_power_in_watts(selector):
    fake = FakeExporter()

    async def body(url):
        meter = await DcgmMeter.open(url, **selector)
        fake.text = exposition(123_456_789 + 30_000)
        energy = await meter.energy_j()
        power = await meter.power_w()
        await meter.close()
        return meter, energy, power

    meter, energy, power = with_exporter(fake, body)
    assert energy == pytest.approx(30.0)
    assert power == pytest.approx(67.351)
    assert meter.name.startswith("dcgm:")
    assert fake.scrapes == 3


def test_the_other_gpus_series_are_not_mixed_in():
    fake = FakeExporter()

    async def body(url):
        meter = await DcgmMeter.open(url, uuid=UUID7)
        fake.text = exposition(999_999_999, energy7_mj=7_000_500)
        energy = await meter.energy_j()
        power = await meter.power_w()
        await meter.close()
        return energy, power

    assert with_exporter(fake, body) == pytest.approx((0.5, 301.25))


def test_counter_reset_is_accumulated_not_subtracted():
    fake = FakeExporter()

    async def body(url):
        meter = await DcgmMeter.open(url, uuid=UUID0)
        readings = []
        for counter_mj in (123_466_789, 4_000, 9_000):  # +10 J, reset to 4 J, +5 J
            fake.text = exposition(counter_mj)
            readings.append(await meter.energy_j())
        await meter.close()
        return readings

    assert with_exporter(fake, body) == pytest.approx([10.0, 14.0, 19.0])


def test_missing_energy_family_says_how_to_enable_it():
    fake = FakeExporter()
    fake.text = exposition(0, with_energy=False)

    async def body(url):
        await DcgmMeter.open(url, uuid=UUID0)

    with pytest.raises(NotSupportedError, match="exports no DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION") as info:
        with_exporter(fake, body)
    assert "counters CSV" in str(info.value) and "127.0.0.1" in str(info.value)


def test_unknown_gpu_lists_what_the_exporter_has():
    fake = FakeExporter()

    async def body(url):
        await DcgmMeter.open(url, index=3)

    with pytest.raises(GpuNotFoundError, match="gpu=3") as info:
        with_exporter(fake, body)
    assert f"UUID={UUID0} gpu=0" in str(info.value) and f"UUID={UUID7} gpu=7" in str(info.value)


def test_blank_sentinels_are_refused_not_counted():
    fake = FakeExporter()

    async def body(url):
        meter = await DcgmMeter.open(url, uuid=UUID0)
        errors = []
        for sentinel in (NOT_SUPPORTED, 0x7FFFFFFFFFFFFFF0):
            fake.text = exposition(sentinel)
            try:
                await meter.energy_j()
            except (NotSupportedError, TransientGpuError) as err:
                errors.append(type(err))
        fake.text = exposition(123_456_789 + 1_000)
        energy = await meter.energy_j()
        await meter.close()
        return errors, energy

    errors, energy = with_exporter(fake, body)
    assert errors == [NotSupportedError, TransientGpuError]
    assert energy == pytest.approx(1.0)


def test_exporter_failures_are_transient_and_name_the_url():
    fake = FakeExporter()

    async def body(url):
        meter = await DcgmMeter.open(url, uuid=UUID0)
        fake.status = 503
        try:
            with pytest.raises(TransientGpuError, match="HTTP 503"):
                await meter.energy_j()
        finally:
            await meter.close()

    with_exporter(fake, body)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/metrics"
    with pytest.raises(TransientGpuError, match=f"dcgm-exporter at {url} is unreachable"):
        asyncio.run(DcgmMeter.open(url, uuid=UUID0))


def test_factory_builds_the_dcgm_meter():
    fake = FakeExporter()

    async def body(url):
        meter = await build_meter("dcgm", dcgm_url=url, index=0)
        await meter.close()
        return meter

    assert isinstance(with_exporter(fake, body), DcgmMeter)
