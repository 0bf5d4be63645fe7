"""SLO presets: the shipped files, the loader's errors, E2E resolution and attainment."""

import math
from pathlib import Path

import numpy as np
import pytest

from agent.catalog import MODELS
from agent.domain import Slo
from agent.shipped import SHIPPED_POLICIES_DIR
from agent.slo_presets import (
    SloPresetError,
    attainment,
    e2e_budget_s,
    load_slo_preset,
    meets_slo,
    resolve_e2e,
)

POLICIES = SHIPPED_POLICIES_DIR
SHIPPED = ("mlperf-server", "mlperf-interactive", "paper")


def load(name: str, model: str):
    return load_slo_preset(name, model, policies_dir=POLICIES)


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_preset_covers_every_catalog_model(name: str, model: str) -> None:
    preset = load(name, model)
    assert (preset.name, preset.model, preset.percentile) == (name, model, 99.0)
    assert preset.tpot_s > 0
    assert preset.source
    if name == "paper":
        assert preset.e2e_rule == "max-p99-saturated"
        assert preset.slo is None
        assert preset.ttft_s is None
    else:
        assert preset.e2e_rule == "ttft+tpot"
        assert preset.slo == Slo(ttft_s=preset.ttft_s, tbt_s=preset.tpot_s, e2e_s=None)


@pytest.mark.parametrize(
    ("name", "model", "ttft_s", "tpot_s"),
    [
        ("mlperf-server", "llama2-70b", 2.0, 0.2),
        ("mlperf-server", "llama3-70b", 2.0, 0.2),
        ("mlperf-server", "llama3-8b", 2.0, 0.1),
        ("mlperf-server", "llama2-13b", 2.0, 0.1),
        ("mlperf-interactive", "llama2-70b", 0.45, 0.04),
        ("mlperf-interactive", "llama3-70b", 0.45, 0.04),
        ("mlperf-interactive", "llama3-8b", 0.5, 0.03),
        ("mlperf-interactive", "llama2-13b", 0.5, 0.03),
        ("paper", "llama2-13b", None, 0.2),
    ],
)
def test_known_numbers(name: str, model: str, ttft_s: float | None, tpot_s: float) -> None:
    preset = load(name, model)
    assert preset.ttft_s == ttft_s
    assert preset.tpot_s == pytest.approx(tpot_s)


def test_borrowed_targets_say_where_they_come_from() -> None:
    assert "llama3_1-8b" in load("mlperf-server", "llama2-13b").source
    assert "llama2-70b" in load("mlperf-interactive", "llama3-70b").source
    assert "001712e9" in load("mlperf-server", "llama3-8b").source


def test_name_resolves_against_the_current_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(POLICIES.parent)
    assert load_slo_preset("mlperf-server", "llama3-8b").tpot_s == pytest.approx(0.1)


def test_an_explicit_path_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no policies/ here
    preset = load_slo_preset(str(POLICIES / "paper.toml"), "llama3-8b")
    assert preset.name == "paper"


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(SloPresetError, match="unknown SLO preset 'mlperf-offline'") as err:
        load("mlperf-offline", "llama3-8b")
    for name in SHIPPED:
        assert name in str(err.value)


def test_unknown_model_lists_the_preset_models() -> None:
    with pytest.raises(SloPresetError, match="no targets for model 'mixtral'") as err:
        load("mlperf-server", "mixtral")
    for model in MODELS:
        assert model in str(err.value)


def test_malformed_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('name = "broken"\npercentile = = 99\n')
    with pytest.raises(SloPresetError, match="malformed TOML") as err:
        load_slo_preset(str(path), "llama3-8b")
    assert str(path) in str(err.value)


def write_preset(tmp_path: Path, body: str) -> str:
    path = tmp_path / "custom.toml"
    path.write_text('name = "custom"\nsource = "test"\n' + body)
    return str(path)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('percentile = 101\ne2e = "none"\n[models.m]\ntpot_s = 0.1\n', "percentile"),
        ('percentile = 99\ne2e = "p99"\n[models.m]\ntpot_s = 0.1\n', "e2e must be one of"),
        ('percentile = 99\ne2e = "none"\n[models.m]\ntpot_s = "fast"\n', "tpot_s must be a number"),
        ('percentile = 99\ne2e = "none"\n[models.m]\nttft_s = 1.0\n', "tpot_s must be a positive"),
        ('percentile = 99\ne2e = "ttft+tpot"\n[models.m]\ntpot_s = 0.1\n', "needs a ttft_s"),
        ('percentile = 99\ne2e = "none"\n[models.m]\ntpot_s = 0.1\ntbt_s = 0.1\n', "unknown keys"),
        ('percentile = 99\ne2e = "none"\npercentil = 9\n[models.m]\ntpot_s = 0.1\n', "unknown keys"),
    ],
)
def test_invalid_presets_are_refused_with_the_file(tmp_path: Path, body: str, message: str) -> None:
    path = write_preset(tmp_path, body)
    with pytest.raises(SloPresetError, match=message) as err:
        load_slo_preset(path, "m")
    assert path in str(err.value)


def test_rule_none_has_no_e2e_target(tmp_path: Path) -> None:
    path = write_preset(tmp_path, 'percentile = 95\ne2e = "none"\n[models.m]\ntpot_s = 0.1\n')
    preset = load_slo_preset(path, "m")
    assert preset.slo == Slo(ttft_s=None, tbt_s=0.1, e2e_s=None)
    assert np.all(np.isinf(e2e_budget_s(preset, np.array([1, 10]))))


def test_resolve_e2e_sets_the_measured_p99() -> None:
    preset = load("paper", "llama3-8b")
    assert resolve_e2e(preset, 19.8) == Slo(ttft_s=None, tbt_s=0.2, e2e_s=19.8)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_resolve_e2e_refuses_a_bad_measurement(bad: float) -> None:
    with pytest.raises(SloPresetError, match="positive"):
        resolve_e2e(load("paper", "llama3-8b"), bad)


def test_resolve_e2e_refuses_presets_that_need_no_measurement() -> None:
    with pytest.raises(SloPresetError, match="needs no measurement"):
        resolve_e2e(load("mlperf-server", "llama3-8b"), 10.0)


def test_an_unresolved_preset_cannot_judge_requests() -> None:
    one = np.array([1.0])
    with pytest.raises(SloPresetError, match="resolve_e2e"):
        attainment(load("paper", "llama3-8b"), one, one, one, one)


def test_mlperf_e2e_budget_is_ttft_plus_tpot_per_later_token() -> None:
    preset = load("mlperf-server", "llama2-70b")  # 2 s, 0.2 s
    budget = e2e_budget_s(preset, np.array([1, 2, 101]))
    np.testing.assert_allclose(budget, [2.0, 2.2, 22.0])


def test_attainment_mlperf_by_hand() -> None:
    preset = load("mlperf-server", "llama2-70b")  # TTFT 2 s, TPOT 0.2 s, E2E 2 + 0.2 (n - 1)
    ttft = np.array([1.0, 2.5, 1.0, 1.0, 1.9, np.nan, 1.0])
    tpot = np.array([0.2, 0.1, 0.25, np.nan, np.nan, 0.1, 0.1])
    tokens = np.array([11, 11, 11, 1, 1, 11, 11])
    e2e = np.array([3.0, 3.5, 3.5, 1.0, 1.9, np.nan, np.nan])
    # met: exactly at TPOT; TTFT miss; TPOT miss; 1 token (TPOT n/a); 1 token; no first token; unfinished
    expected = [True, False, False, True, True, False, False]
    assert meets_slo(preset, ttft, tpot, e2e, tokens).tolist() == expected
    assert attainment(preset, ttft, tpot, e2e, tokens) == pytest.approx(3 / 7)


def test_attainment_paper_by_hand() -> None:
    slo = resolve_e2e(load("paper", "llama2-13b"), 20.0)  # TPOT 0.2 s, E2E 20 s, TTFT free
    ttft = np.array([30.0, 0.5, 0.5, np.nan, 0.5])
    tpot = np.array([0.01, 0.21, 0.1, 0.1, np.nan])
    e2e = np.array([19.0, 10.0, 20.5, 5.0, 1.0])
    tokens = np.array([50, 50, 50, 50, 1])
    # TTFT is no target; TPOT miss; E2E miss; TTFT not measured; 1-token request within E2E
    assert meets_slo(slo, ttft, tpot, e2e, tokens).tolist() == [True, False, False, False, True]
    assert attainment(slo, ttft, tpot, e2e, tokens) == pytest.approx(0.4)


def test_attainment_of_no_requests_is_nan() -> None:
    empty = np.array([])
    assert math.isnan(attainment(load("mlperf-server", "llama3-8b"), empty, empty, empty, empty))


def test_attainment_checks_its_inputs() -> None:
    preset = load("mlperf-server", "llama3-8b")
    with pytest.raises(ValueError, match="one length"):
        attainment(preset, np.ones(2), np.ones(3), np.ones(2), np.ones(2))
    with pytest.raises(ValueError, match="at least 1"):
        attainment(preset, np.ones(2), np.ones(2), np.ones(2), np.array([1, 0]))
