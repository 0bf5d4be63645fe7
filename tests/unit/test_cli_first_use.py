"""What a new user meets first: --version, help on every option, file arguments, `run`'s flags."""

import argparse
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

import agent.cli.run as run_command
from agent.cli import build_parser, main
from agent.config import Settings, env_name

# A value for every `run` flag, none of them the default, that fits together for the sidecar.
RUN_VALUES = {
    "engine": "trtllm-serve",
    "engine_url": "http://127.0.0.1:18000",
    "engine_metrics_url": "http://127.0.0.1:18000/metrics",
    "gpu": "h100-sxm5-80gb",
    "model": "llama2-7b",
    "tp": "2",
    "max_batch_size": "128",
    "max_num_tokens": "4096",
    "actuator": "twin",
    "meter": "twin",
    "twin_url": "http://127.0.0.1:18001",
    "policy": "reactive",
    "slo": "paper",
    "models_dir": "/tmp",
    "gateway_host": "127.0.0.1",
    "gateway_port": "19000",
    "sidecar_host": "127.0.0.1",
    "sidecar_port": "19401",
    "log_level": "DEBUG",
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(env_name(name), raising=False)


@pytest.fixture
def started(monkeypatch) -> list[Settings]:
    """The settings `run` would start the sidecar with, instead of starting it."""
    calls: list[Settings] = []
    monkeypatch.setattr(run_command, "run_sidecar", lambda settings: calls.append(settings) or 0)
    monkeypatch.setattr(run_command, "configure_logging", lambda level, json_lines: None)
    return calls


def flag(field: str) -> str:
    return f"--{field.replace('_', '-')}"


def test_version_is_the_installed_distributions():
    script = Path(sys.executable).with_name("throttllem")  # the console script, as a user runs it
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"throttllem {version('throttllem')}"


def options_without_help(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += options_without_help(sub, (*path, name))
        elif action.option_strings and not action.help:
            missing.append(f"{' '.join(path)} {action.option_strings[-1]}")
    return missing


def test_every_option_has_help():
    assert options_without_help(build_parser()) == []


def test_run_has_a_flag_for_what_a_hand_started_stack_needs(capsys):
    needed = {"twin_url", "meter", "actuator", "engine", "engine_url", "engine_metrics_url", "policy", "slo"}
    assert needed <= set(run_command.FLAG_SETTINGS) == set(RUN_VALUES)
    with pytest.raises(SystemExit) as exited:
        main(["run", "--help"])
    assert exited.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    for field in run_command.FLAG_SETTINGS:
        assert f"{flag(field)} " in help_text and env_name(field) in help_text, field


def test_run_flags_set_what_their_variables_set(monkeypatch, started):
    defaults = Settings()
    assert all(str(getattr(defaults, field)) != value for field, value in RUN_VALUES.items())
    for field, value in RUN_VALUES.items():
        monkeypatch.setenv(env_name(field), value)
    assert main(["run"]) == 0
    for field in RUN_VALUES:
        monkeypatch.delenv(env_name(field))
    assert main(["run", *[arg for field, value in RUN_VALUES.items() for arg in (flag(field), value)]]) == 0
    from_env, from_flags = started
    assert from_flags == from_env
    assert (from_flags.twin_url, from_flags.sidecar_port) == ("http://127.0.0.1:18001", 19401)


def test_run_flags_win_over_variables(monkeypatch, started):
    monkeypatch.setenv("THROTTLLEM_ACTUATOR", "twin")
    monkeypatch.setenv("THROTTLLEM_TWIN_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("THROTTLLEM_POLICY", "reactive")
    assert main(["run", "--twin-url", "http://127.0.0.1:2", "--policy", "max"]) == 0
    (settings,) = started
    assert (settings.actuator, settings.twin_url, settings.policy) == ("twin", "http://127.0.0.1:2", "max")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--sidecar-port", "70000"], "--sidecar-port='70000': must be less than or equal to 65535"),
        (["run", "--tp", "two"], "--tp='two': must be a valid integer"),
        (["run", "--meter", "watts"], "--meter='watts': must be 'nvml', 'dcgm', 'twin' or 'none'"),
        (["run", "--actuator", "twin"], "THROTTLLEM_TWIN_URL is unset: needed when THROTTLLEM_ACTUATOR=twin"),
    ],
)
def test_run_refuses_a_bad_flag_in_one_line_through_the_settings(capsys, started, argv, message):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("throttllem: error: ") and message in err and "\n" not in err
    assert started == []


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("profile") / "profile.csv"
    assert main(["profile", "--samples", "200", "--out", str(path), "--json"]) == 0
    return path


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("throttllem: error: ") and "\n" not in err
    return err


def test_train_names_a_missing_dataset_and_how_to_make_one(tmp_path, capsys):
    missing = tmp_path / "missing.csv"
    err = one_line_error(capsys, ["train", "--data", str(missing), "--out", str(tmp_path / "m")])
    assert f"--data {missing}: no such file" in err
    assert f"throttllem profile --gpu G --model M --tp N --out {missing}" in err
    assert "sidecar" not in err and ".json" not in err


def test_train_names_a_dataset_without_its_description(tmp_path, capsys):
    alone = tmp_path / "alone.csv"
    alone.write_text("point\n")
    err = one_line_error(capsys, ["train", "--data", str(alone), "--out", str(tmp_path / "m")])
    assert f"--data {alone} has no {alone}.json beside it" in err and "throttllem profile" in err


def test_train_refuses_a_directory_as_data(tmp_path, capsys):
    err = one_line_error(capsys, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "m")])
    assert f"--data {tmp_path} is a directory" in err


@pytest.mark.parametrize("command", ["train", "train-lengths"])
def test_a_model_out_that_is_a_file_is_refused_before_training(tmp_path, capsys, dataset, command):
    taken = tmp_path / "taken"
    taken.write_text("")
    data = ["--data", str(dataset)] if command == "train" else []
    err = one_line_error(capsys, [command, *data, "--out", str(taken)])
    assert f"--out {taken} is a file" in err
    assert not list(tmp_path.glob("*.onnx"))


def test_profile_refuses_a_directory_as_out(tmp_path, capsys):
    err = one_line_error(capsys, ["profile", "--samples", "10", "--out", str(tmp_path)])
    assert f"--out {tmp_path} is a directory" in err
