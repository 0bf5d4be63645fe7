"""The frequency response is held to the Perseus measurements it is built from."""

import csv
from importlib import resources

import numpy as np
import pytest

from agent.twin.frequency import PERSEUS_FILES, frequency_response, perseus_curve


def _raw_forward(clock: int) -> tuple[float, float]:
    """Independent recomputation from the raw CSVs: mean time and power ratios at `clock`."""
    times, powers = [], []
    for name in PERSEUS_FILES:
        rows = list(
            csv.DictReader(resources.files("agent.twin").joinpath("data", name).read_text().splitlines())
        )
        by_stage: dict[str, dict[int, tuple[float, float]]] = {}
        for r in rows:
            if r["instruction"] == "forward":
                t = float(r["time"])
                by_stage.setdefault(r["stage"], {})[int(r["frequency"])] = (t, float(r["energy"]) / t)
        for curve in by_stage.values():
            times.append(curve[clock][0] / curve[1410][0])
            powers.append(curve[clock][1] / curve[1410][1])
    return float(np.mean(times)), float(np.mean(powers))


@pytest.mark.parametrize("clock", [855, 1005, 1050, 1200, 1305])
def test_curve_matches_raw_perseus(clock):
    t_rel, p_rel = _raw_forward(clock)
    response = frequency_response(1410, 210)
    assert response.slowdown_at(clock) == pytest.approx(t_rel, rel=0.01)
    assert response.power_rel_at(clock) == pytest.approx(p_rel, rel=0.02)


def test_perseus_key_numbers():
    # shared/data/calibration/README.md: GPT-3 forward, 1050 MHz: time x1.27, power 275 W of 473 W.
    curve = perseus_curve()
    i = list(curve.clock_mhz).index(1050)
    assert curve.time_rel[i] == pytest.approx(1.27, abs=0.02)


def test_compute_bound_energy_minimum_between_1000_and_1110():
    response = frequency_response(1410, 210)
    clocks = np.arange(210, 1411, 15)
    energy = [response.slowdown_at(f) * response.power_rel_at(f) for f in clocks]
    best = clocks[int(np.argmin(energy))]
    assert 1000 <= best <= 1110


def test_energy_rises_again_below_the_sweet_spot():
    response = frequency_response(1410, 210)
    energy = lambda f: response.slowdown_at(f) * response.power_rel_at(f)  # noqa: E731
    assert energy(600) > energy(1050)
    assert energy(210) > energy(600)


def test_monotone_everywhere():
    for max_clock in (1410, 1980):
        r = frequency_response(max_clock, 210)
        assert np.all(np.diff(r.slowdown) <= 1e-12)
        assert np.all(np.diff(r.power_rel) >= -1e-12)
        assert r.slowdown_at(max_clock) == 1.0 and r.power_rel_at(max_clock) == 1.0


def test_h100_reuses_the_curve_on_the_normalised_clock():
    a100, h100 = frequency_response(1410, 210), frequency_response(1980, 210)
    assert h100.slowdown_at(1980 * 1050 / 1410) == pytest.approx(a100.slowdown_at(1050), rel=0.01)
