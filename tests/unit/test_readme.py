"""The README stays true: its configuration tables are the ones the settings generate."""

from pathlib import Path

from agent.config import Settings, env_name, settings_table_markdown

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_the_configuration_table_is_the_generated_one():
    assert settings_table_markdown() in README, (
        "regenerate it: python -c 'from agent.config import *; print(settings_table_markdown())'"
    )


def test_every_setting_is_documented():
    missing = [env_name(field) for field in Settings.model_fields if env_name(field) not in README]
    assert not missing


def test_the_node_agent_table_is_the_generated_one():
    from agent.node.settings import node_table_markdown

    assert node_table_markdown() in README, (
        "regenerate it: python -c 'from agent.node.settings import *; print(node_table_markdown())'"
    )
