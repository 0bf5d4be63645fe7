"""The fault suite, run as `bench faults` runs it: every fault injected into real processes on
loopback (twin, node agent, sidecar), each judged against its targets. One run serves every test."""

import asyncio
from pathlib import Path

import pytest

from agent.bench.faults.stack import StackConfig
from agent.bench.faults.suite import SuiteConfig, planned_runs, run_suite
from agent.catalog import GPUS, MODELS
from agent.twin.setup import TwinSetup

SETUP = TwinSetup(GPUS["a100-sxm4-80gb"], MODELS["llama3-8b"])
RUNS = planned_runs(SuiteConfig(StackConfig(SETUP, Path("unused"))))
pytestmark = pytest.mark.timeout(900)  # the first test runs the whole suite (about four minutes)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    config = SuiteConfig(StackConfig(SETUP, tmp_path_factory.mktemp("faults")))
    return {(r.fault, r.node_agent): r for r in asyncio.run(run_suite(config))}


@pytest.mark.parametrize(
    ("name", "node_agent"), RUNS, ids=[f"{n}-{'agent' if a else 'alone'}" for n, a in RUNS]
)
def test_each_fault_holds_its_targets(results, name, node_agent):
    result = results[(name, node_agent)]
    assert result.held, result.as_json()


def test_every_sidecar_death_leaves_the_gpu_at_stock_with_the_node_agent(results):
    deaths = [r for (name, agent), r in results.items() if agent and name.startswith("sidecar-")]
    assert len(deaths) == 4
    assert all(r.clock_2s == "stock" for r in deaths), [r.as_json() for r in deaths]


def test_without_the_node_agent_a_killed_sidecar_leaves_its_lock(results):
    """The premise of the agent: the suite really locks the GPU and really kills the sidecar."""
    killed = results[("sidecar-sigkill", False)]
    assert killed.clock_2s.startswith("locked"), killed.as_json()
