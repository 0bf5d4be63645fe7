"""The fault suite's bookkeeping: which runs it plans, how a row is judged and printed, the CLI's errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from agent.bench.faults.scenarios import FAULTS, FaultResult
from agent.bench.faults.stack import StackConfig
from agent.bench.faults.suite import SuiteConfig, planned_runs, table_markdown, table_rows
from agent.bench.faults.traffic import Tally, tally
from agent.catalog import GPUS, MODELS
from agent.twin.setup import TwinSetup

STACK = StackConfig(TwinSetup(GPUS["a100-sxm4-80gb"], MODELS["llama3-8b"]), Path("logs"))


def test_sidecar_faults_run_without_then_with_the_node_agent_and_the_rest_once():
    runs = planned_runs(SuiteConfig(STACK, faults=("sidecar-sigkill", "slowloris")))
    assert runs == [("sidecar-sigkill", False), ("sidecar-sigkill", True), ("slowloris", False)]
    only_agent = planned_runs(SuiteConfig(STACK, faults=("sidecar-sigkill",), without_node_agent=False))
    assert only_agent == [("sidecar-sigkill", True)]
    assert len(planned_runs(SuiteConfig(STACK))) == sum(len(variants) for _, variants in FAULTS.values())
    agent_only = planned_runs(SuiteConfig(STACK, faults=("agent-sigkill",), node_agent=False))
    assert agent_only == [("agent-sigkill", True)]  # a fault of the agent itself runs with it, always


def test_an_unknown_fault_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown fault.*nope.*known: sidecar-sigterm"):
        planned_runs(SuiteConfig(STACK, faults=("nope",)))


def test_the_clock_stays_inside_the_calibrated_range_and_below_the_max():
    gpu = STACK.setup.gpu
    assert gpu.calibrated_clock_floor_mhz <= STACK.clock_mhz < gpu.max_clock_mhz
    assert STACK.clock_mhz in gpu.sm_clocks_mhz


def test_a_row_is_held_only_when_every_target_is_met_and_says_which_missed():
    met = FaultResult(False, "a", targets={"x": True})
    missed = FaultResult(
        True, "b", traffic=tally([("lost", 0), ("answered", 200)]), targets={"x": True, "y": False}
    )
    untargeted = FaultResult(False, "c")
    assert met.held and not missed.held and untargeted.held
    rows = table_rows([met, missed, untargeted])
    assert [row[-1] for row in rows] == ["yes", "NO: y", "n/a"]
    assert rows[1][4:8] == ("2", "1", "0", "1")
    assert table_markdown([met]).count("\n") == 3


def test_tallies_add_up_by_verdict_and_status():
    total = tally([("answered", 200), ("rejected", 503)]) + tally([("rejected", 503), ("lost", 0)])
    assert total == Tally(4, 1, 2, 1, ((0, 1), (200, 1), (503, 2)))


def test_the_cli_refuses_an_unknown_fault_in_one_line():
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "bench", "faults", "--fault", "nope"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "invalid choice: 'nope'" in done.stderr


def test_the_cli_runs_every_fault_both_ways_by_default_and_only_what_it_is_told_otherwise():
    from agent.cli import build_parser
    from agent.cli.bench import faults_config

    default = faults_config(build_parser().parse_args(["bench", "faults"]))
    assert default.faults == tuple(FAULTS) and default.node_agent and default.without_node_agent
    chosen = faults_config(
        build_parser().parse_args(["bench", "faults", "--fault", "slowloris", "--node-agent", "with"])
    )
    assert chosen.faults == ("slowloris",) and chosen.node_agent and not chosen.without_node_agent
