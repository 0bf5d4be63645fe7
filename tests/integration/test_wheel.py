"""The wheel a user installs: it holds every shipped data file, and the CLI works from it alone.

The wheel is built from a copy of the sources (a build in the checkout would write build/ there,
whose stale files end up in wheels), with pip's build isolation: the build requirements of
[build-system] are what a user's `pip install` gets, so they are what is checked. It is then
installed with --target into a temporary directory and run with that directory as PYTHONPATH,
from an empty working directory, with no THROTTLLEM_* variable: nothing of the checkout is used.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA_DIRS = ("agent/data", "agent/twin/data", "agent/workloads/data")  # package data, as in the repo
# The files a run cannot do without, named so an empty data directory cannot pass.
ESSENTIAL = (
    "agent/data/models/a100-sxm4-80gb/llama3-8b-tp1/ips.onnx",
    "agent/data/models/a100-sxm4-80gb/llama3-8b-tp1/card.json",
    "agent/data/models/a100-sxm4-40gb/llama2-13b-tp1/capacity.json",
    "agent/data/models/lengths/azure/length.onnx",
    "agent/data/models/lengths/azure/card.json",
    "agent/data/policies/mlperf-server.toml",
    "agent/data/policies/mlperf-interactive.toml",
    "agent/data/policies/paper.toml",
)
BUILD_TIMEOUT_S = 240


def repo_files(folder: str) -> set[str]:
    return {
        path.relative_to(REPO).as_posix()
        for path in (REPO / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "agent", source / "agent", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(root / "dist"), str(source)],
        check=True,
        capture_output=True,
        timeout=BUILD_TIMEOUT_S,
    )
    (built,) = (root / "dist").glob("throttllem-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    """(site directory, environment, empty working directory) of the wheel installed alone."""
    root = tmp_path_factory.mktemp("installed")
    site = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=BUILD_TIMEOUT_S,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("THROTTLLEM_", "PYTHON"))}
    env["PYTHONPATH"] = str(site)
    workdir = root / "empty"
    workdir.mkdir()
    return site, env, workdir


def run_cli(installed, *argv: str) -> subprocess.CompletedProcess:
    site, env, workdir = installed
    return subprocess.run(
        [str(site / "bin" / "throttllem"), *argv],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_wheel_holds_every_shipped_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set().union(*(repo_files(folder) for folder in DATA_DIRS))
    assert set(ESSENTIAL) <= expected
    assert expected - names == set()


def test_the_installed_package_is_the_one_imported(installed):
    site, env, workdir = installed
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import agent, agent.shipped as s; print(agent.__file__); print(s.SHIPPED_MODELS_DIR)",
        ],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    assert all(Path(line).is_relative_to(site.resolve()) for line in out[:2]), out


def test_version_from_the_installed_metadata(installed, wheel):
    result = run_cli(installed, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"throttllem {wheel.name.split('-')[1]}"


def test_simulate_with_the_shipped_models_and_presets(installed):
    """throttllem needs the IPS and length models and the mlperf-server preset: all from the wheel."""
    result = run_cli(installed, "simulate", "--policy", "throttllem", "--duration", "5", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert (out["policy"], out["slo"]) == ("throttllem", "mlperf-server")
    assert out["completed"] == out["requests"] > 0
    assert result.stderr == ""  # in particular no IPS range warning for the tables built at start


def test_run_help_names_the_settings_a_stack_needs(installed):
    result = run_cli(installed, "run", "--help")
    assert result.returncode == 0, result.stderr
    assert "--twin-url" in result.stdout and "THROTTLLEM_TWIN_URL" in result.stdout
