"""The import contracts hold, and each breaks, by name, on every wrong import it exists to stop.

A copy of agent/ and pyproject.toml is linted as it is (it must pass), then with one wrong import
appended per line of WRONG_IMPORTS; each must be reported by its contract, under the rule it
breaks, as a direct import at the line it was appended (the same import also shows up in
longer chains to other modules; those do not count). Taking a module out of a contract's list,
or dropping a contract, fails this test.
The standard library is covered too: with include_external_packages, `import asyncio` in the
core is a forbidden import like any other.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

LAYERS = "Each layer imports only the layers below it"
CORE = "The functional core does no I/O and knows no shell"
TWIN = "The twin is the world: it knows no controller and no shell"
LIVE = "The live path never imports the twin"
CONTRACTS = (LAYERS, CORE, TWIN, LIVE)

# (contract, file under agent/, the wrong import, the module it imports as import-linter names it)
WRONG_IMPORTS = [
    (CORE, "control/slo.py", "import asyncio", "asyncio"),
    (CORE, "control/guard.py", "import prometheus_client", "prometheus_client"),
    (CORE, "control/admission.py", "import opentelemetry.trace", "opentelemetry"),
    (CORE, "control/scoreboard.py", "import aiohttp", "aiohttp"),
    (CORE, "predict/ips.py", "import pynvml", "pynvml"),
    (CORE, "predict/timing.py", "import lightgbm", "lightgbm"),
    (CORE, "predict/lengths.py", "import onnxmltools", "onnxmltools"),
    (CORE, "control/projection.py", "from agent import sidecar", "agent.sidecar"),
    (CORE, "control/scaling.py", "from agent.bench import replay", "agent.bench.replay"),
    (CORE, "control/policies.py", "from agent.sim import loop", "agent.sim.loop"),
    (CORE, "predict/__init__.py", "from agent.twin import latency", "agent.twin.latency"),
    (CORE, "control/frequency.py", "from agent.engines import base", "agent.engines.base"),
    (CORE, "predict/ips.py", "from agent.gpus import nvml", "agent.gpus.nvml"),
    (CORE, "control/__init__.py", "from agent import config", "agent.config"),
    (CORE, "predict/timing.py", "from agent.cli import main", "agent.cli"),
    (CORE, "predict/lengths.py", "from agent.workloads import traces", "agent.workloads.traces"),
    (CORE, "control/slo.py", "from agent.modeling import train", "agent.modeling.train"),
    (TWIN, "twin/latency.py", "from agent.control import policies", "agent.control.policies"),
    (TWIN, "twin/engine.py", "from agent.predict import lengths", "agent.predict.lengths"),
    (TWIN, "twin/gpu.py", "from agent import policy_registry", "agent.policy_registry"),
    (TWIN, "twin/memory.py", "from agent import slo_presets", "agent.slo_presets"),
    (TWIN, "twin/setup.py", "from agent.sim import loop", "agent.sim.loop"),
    (TWIN, "twin/step.py", "from agent.sidecar import loop", "agent.sidecar.loop"),
    (TWIN, "twin/server/app.py", "from agent.bench import report", "agent.bench.report"),
    (TWIN, "twin/server/http_api.py", "from agent.modeling import dataset", "agent.modeling.dataset"),
    (TWIN, "twin/power.py", "from agent.cli import common", "agent.cli.common"),
    (TWIN, "twin/frequency.py", "from agent.config import Settings", "agent.config"),
    (LIVE, "sidecar/energy.py", "from agent.twin import gpu", "agent.twin.gpu"),
    (LIVE, "sidecar/watchdog.py", "from agent.sim import capacity", "agent.sim.capacity"),
    (LIVE, "config.py", "from agent.twin import memory", "agent.twin.memory"),
    (LIVE, "telemetry.py", "from agent.sim import results", "agent.sim.results"),
    (LIVE, "policy_registry.py", "from agent.sim import exact_model", "agent.sim.exact_model"),
    (LIVE, "engines/base.py", "from agent.twin import engine", "agent.twin.engine"),
    (LIVE, "gpus/base.py", "from agent.sim import policies", "agent.sim.policies"),
    (LIVE, "coordinator/service.py", "from agent.sim import pool", "agent.sim.pool"),
    (CORE, "control/scaling.py", "from agent.coordinator import service", "agent.coordinator.service"),
    (LAYERS, "coordinator/load.py", "from agent.sidecar import loop", "agent.sidecar.loop"),
    (LAYERS, "sim/capacity.py", "from agent.sidecar import tracker", "agent.sidecar.tracker"),
    (LAYERS, "sidecar/sse.py", "from agent.modeling import dataset", "agent.modeling.dataset"),
    (LAYERS, "modeling/train.py", "from agent.bench import scrape", "agent.bench.scrape"),
    (LAYERS, "bench/report.py", "from agent.cli import common", "agent.cli.common"),
    (LAYERS, "config.py", "from agent import telemetry", "agent.telemetry"),
    (LAYERS, "policy_registry.py", "from agent.config import Settings", "agent.config"),
    (LAYERS, "workloads/traces.py", "from agent.gpus import dryrun", "agent.gpus.dryrun"),
    (LAYERS, "engines/http.py", "from agent import policy_registry", "agent.policy_registry"),
    (LAYERS, "slo_presets.py", "from agent import catalog", "agent.catalog"),
    (LAYERS, "control/guard.py", "from agent.predict import ips", "agent.predict.ips"),
    (LAYERS, "domain.py", "from agent import catalog", "agent.catalog"),
]


def module_name(path: str) -> str:
    """`control/slo.py` -> `agent.control.slo`; a package's __init__ is the package."""
    parts = ["agent", *Path(path).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120
    )


def package(module: str) -> str:
    """What a contract names: a top-level package of agent, or an external package."""
    return ".".join(module.split(".")[:2]) if module.startswith("agent.") else module


def direct_imports(output: str) -> set[tuple[str, str, str]]:
    """(contract, "X is not allowed to import Y", chain) for every one-import chain reported broken."""
    _, _, broken = output.partition("Broken contracts\n----------------\n")
    found, contract, rule = set(), "", ""
    lines = broken.splitlines()
    for i, line in enumerate(lines):
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if line in CONTRACTS and following == "-" * len(line):
            contract = line
        elif " is not allowed to import " in line and line.endswith(":"):
            rule = line.removesuffix(":")
        elif line.startswith("- ") and not following[:1].isspace():  # a chain of one line: one import
            found.add((contract, rule, line.lstrip("- ")))
    return found


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """agent/ (its Python: no data tables) and the contracts, where a test may break them."""
    shutil.copytree(ROOT / "agent", tmp_path / "agent", ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_code_as_it_is_keeps_every_contract(copy):
    result = lint_imports(copy)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in CONTRACTS:
        assert f"{name} KEPT" in result.stdout


def test_every_wrong_import_breaks_its_contract(copy):
    expected = []
    for contract, path, statement, imported in WRONG_IMPORTS:
        source = copy / "agent" / path
        lines = source.read_text().splitlines()
        source.write_text("\n".join([*lines, statement]) + "\n")
        importer = module_name(path)
        rule = f"{package(importer)} is not allowed to import {package(imported)}"
        expected.append((contract, rule, f"{importer} -> {imported} (l.{len(lines) + 1})"))
    result = lint_imports(copy)
    assert result.returncode == 1, result.stdout + result.stderr
    missing = set(expected) - direct_imports(result.stdout)
    assert not missing, result.stdout
