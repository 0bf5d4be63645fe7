"""THROTTLLEM_COORDINATOR_* settings: each bad value named at start; the README's table is generated."""

from pathlib import Path

import pytest

from agent.config import ConfigError
from agent.coordinator.settings import (
    CoordinatorSettings,
    coordinator_env,
    coordinator_table_markdown,
    load_coordinator_settings,
    parse_capacities,
)

README = (Path(__file__).parents[2] / "README.md").read_text()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for field in CoordinatorSettings.model_fields:
        monkeypatch.delenv(coordinator_env(field), raising=False)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("THROTTLLEM_COORDINATOR_BACKEND", "nomad", "must be 'local'"),
        ("THROTTLLEM_COORDINATOR_SIZES", "1,x", "comma-separated TP degrees"),
        ("THROTTLLEM_COORDINATOR_SIZES", "2,2", "distinct"),
        ("THROTTLLEM_COORDINATOR_CAPACITIES", "1:fast", "size:rps"),
        ("THROTTLLEM_COORDINATOR_CAPACITIES", "1:-2", "rates > 0"),
        ("THROTTLLEM_COORDINATOR_PERIOD_S", "0", "greater than 0"),
        ("THROTTLLEM_COORDINATOR_HEADROOM", "1.5", "less than or equal to 1"),
        ("THROTTLLEM_COORDINATOR_GPU", "tpu", "must be one of"),
        ("THROTTLLEM_COORDINATOR_PORT", "70000", "less than or equal to 65535"),
        ("THROTTLLEM_COORDINATOR_LOG_LEVEL", "LOUD", "must be one of DEBUG"),
    ],
)
def test_a_bad_value_names_its_variable(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_coordinator_settings()
    assert str(caught.value).startswith(f"{variable}=") and message in str(caught.value)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"THROTTLLEM_COORDINATOR_INITIAL_SIZE": "8"}, "THROTTLLEM_COORDINATOR_INITIAL_SIZE"),
        ({"THROTTLLEM_COORDINATOR_CAPACITIES": "1:2,2:5"}, "THROTTLLEM_COORDINATOR_CAPACITIES"),
        ({"THROTTLLEM_COORDINATOR_MIN_DRAIN_S": "400"}, "THROTTLLEM_COORDINATOR_MIN_DRAIN_S"),
    ],
)
def test_settings_that_do_not_fit_together_name_what_to_change(monkeypatch, env, variable):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"^{variable}="):
        load_coordinator_settings()


def test_defaults_and_flag_overrides():
    settings = load_coordinator_settings({"sizes": "4,1,2", "capacities": "1:0.2,2:1.8,4:5.4"})
    assert settings.tp_sizes == (1, 2, 4) and settings.first_size == 1
    assert parse_capacities(settings.capacities) == {1: 0.2, 2: 1.8, 4: 5.4}
    with pytest.raises(ConfigError, match=r"^--sizes="):
        load_coordinator_settings({"sizes": "0"})


def test_the_readme_lists_every_coordinator_variable():
    assert coordinator_table_markdown() in README, (
        "regenerate it: python -c 'from agent.coordinator.settings import *; "
        "print(coordinator_table_markdown())'"
    )
