"""Profiling sweeps on the twin and the datasets they write: ranges, physics, determinism, resume."""

import hashlib
import json
import math
from dataclasses import replace

import numpy as np
import pytest

from agent.catalog import gpu_spec, model_spec
from agent.domain import IPS_FEATURES
from agent.modeling.dataset import (
    COLUMNS,
    DatasetError,
    DatasetMismatchError,
    DatasetWriter,
    Row,
    file_sha256,
    read_dataset,
)
from agent.modeling.profile import (
    SweepConfig,
    TwinProfileTarget,
    run_sweep,
    sweep_meta,
    sweep_point,
    sweep_points,
)
from agent.twin.gpu import UnsupportedClockError
from agent.twin.memory import EngineConfig
from agent.twin.setup import TwinSetup

SETUP = TwinSetup(gpu_spec("a100-sxm4-80gb"), model_spec("llama3-8b"), noise=0.02, seed=3)
TARGET = TwinProfileTarget(SETUP)
EXACT = TwinProfileTarget(replace(SETUP, noise=0.0))
TIGHT = TwinProfileTarget(TwinSetup(gpu_spec("a100-sxm4-40gb"), model_spec("llama2-13b")))  # 249 KV blocks
CONFIG = SweepConfig(seed=5)
ROWS = 400


def sweep(path, rows=ROWS, target=TARGET, config=CONFIG):
    with DatasetWriter(path, sweep_meta(target, config)) as writer:
        return run_sweep(target, writer, config, rows=rows)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "profile.csv"
    return path, sweep(path)


def test_rows_have_the_right_types_and_ranges(swept):
    path, progress = swept
    data = read_dataset(path)
    limits = TARGET.limits()
    assert len(data) == progress.rows >= ROWS
    assert (
        progress.rows - np.sum(data["point"] == data["point"][-1]) < ROWS
    )  # stopped after the point that got there
    for name in COLUMNS:
        assert data[name].dtype == (np.float64 if name in ("iteration_ms", "ips") else np.int64), name
    assert np.array_equal(np.unique(data["point"]), np.arange(progress.points))
    assert np.all(np.diff(data["point"]) >= 0)
    assert set(data["tp"]) == {1} and set(data["tokens_per_block"]) == {64}
    assert data["batch"].min() >= 1 and data["batch"].max() <= limits.max_batch_size
    assert data["kv_blocks"].min() >= 0 and data["kv_blocks"].max() <= limits.kv_blocks
    assert data["prefill_tokens"].max() <= limits.max_num_tokens
    assert set(data["clock_mhz"]) <= set(SETUP.gpu.sm_clocks_mhz)
    assert data["clock_mhz"].min() >= 600 and len(set(data["clock_mhz"])) > 1
    np.testing.assert_array_equal(data["ips"], 1000.0 / data["iteration_ms"])
    prefill = data["prefill_tokens"] > 0
    assert 0 < prefill.sum() < len(data)  # both prefill and decode iterations
    assert data.features().shape == (len(data), len(IPS_FEATURES))
    np.testing.assert_array_equal(data.features()[:, IPS_FEATURES.index("kv_blocks")], data["kv_blocks"])


@pytest.mark.parametrize("target", [TARGET, TIGHT], ids=["a100-80gb-llama3-8b", "a100-40gb-llama2-13b"])
def test_points_fit_the_engine(target):
    limits = target.limits()
    for point in sweep_points(limits, target.supported_clocks_mhz(), 300, seed=1):
        prompts, outputs = np.array(point.prompts), np.array(point.outputs)
        assert 1 <= len(prompts) == len(outputs) <= limits.max_batch_size
        assert point.clock_mhz in target.supported_clocks_mhz() and point.clock_mhz >= 600
        assert prompts.min() >= 1 and prompts.max() <= limits.max_num_tokens
        assert outputs.min() >= 8 and (prompts + outputs).max() <= limits.max_seq_len
        blocks = np.sum(-(-(prompts + outputs) // limits.tokens_per_block))
        assert blocks <= 0.95 * limits.kv_blocks  # the whole batch fits at once under guaranteed_no_evict


def test_points_cover_the_space():
    limits = TARGET.limits()
    points = sweep_points(limits, SETUP.gpu.sm_clocks_mhz, 300, seed=1)
    batches = np.array([len(p.prompts) for p in points])
    blocks = [np.sum(-(-np.add(p.prompts, p.outputs) // limits.tokens_per_block)) for p in points]
    occupancy = np.array(blocks) / limits.kv_blocks
    assert occupancy.min() < 0.05 and occupancy.max() > 0.85
    assert batches.min() == 1 and batches.max() >= 128
    assert np.median(batches) < 64  # log-uniform: small batches are common
    clocks = np.array([p.clock_mhz for p in points])
    assert clocks.min() < 700 and clocks.max() > 1300
    assert sweep_point(limits, SETUP.gpu.sm_clocks_mhz[::-1], 1, 17) == points[17]  # alone, any clock order
    assert sweep_point(limits, SETUP.gpu.sm_clocks_mhz, 2, 17) != points[17]


def test_a_point_records_every_iteration_at_the_locked_clock():
    rows = EXACT.run_point(1050, [1000, 500], [10, 10], point=4)
    assert len(rows) == 10  # one prefill iteration (first token), then 9 decode iterations
    first = rows[0]
    assert (first.point, first.batch, first.prefill_tokens, first.clock_mhz) == (4, 2, 1500, 1050)
    assert first.kv_blocks == math.ceil(1001 / 64) + math.ceil(501 / 64)  # prompt + first token
    expected = SETUP.latency_model().iteration(1050, 0, 0, [(1000, 0), (500, 0)]).time_s * 1000
    assert first.iteration_ms == pytest.approx(expected, abs=1e-6)  # the lock was in force already
    assert all(r.prefill_tokens == 0 and r.batch == 2 for r in rows[1:])
    assert rows[-1].kv_blocks == 0  # blocks in use after the iteration: both requests finished


def test_a_higher_clock_is_never_slower_for_the_same_batch():
    prompts, outputs = [3000, 2500, 1800, 700, 64, 4000], [40, 30, 20, 60, 50, 12]
    slow = EXACT.run_point(900, prompts, outputs, point=0)
    fast = EXACT.run_point(1410, prompts, outputs, point=0)
    assert [(r.batch, r.kv_blocks, r.prefill_tokens) for r in slow] == [
        (r.batch, r.kv_blocks, r.prefill_tokens) for r in fast
    ]
    assert all(f.ips >= s.ips for s, f in zip(slow, fast, strict=True))
    assert all(f.ips > 1.1 * s.ips for s, f in zip(slow, fast, strict=True) if s.prefill_tokens)


def test_jitter_is_seeded_per_point():
    def times(target, point):
        return np.array([r.iteration_ms for r in target.run_point(1200, [500] * 8, [20] * 8, point=point)])

    assert np.array_equal(times(TARGET, 7), times(TARGET, 7))
    assert not np.array_equal(times(TARGET, 7), times(TARGET, 8))
    ratio = times(TARGET, 7) / times(EXACT, 7)
    assert 0.9 < ratio.min() < 1.0 < ratio.max() < 1.1


def test_the_same_seed_gives_the_same_file(swept, tmp_path):
    path, _ = swept
    again = tmp_path / "again.csv"
    sweep(again)
    assert again.read_bytes() == path.read_bytes()
    meta, meta_again = (json.loads((p.parent / (p.name + ".json")).read_text()) for p in (path, again))
    assert {k: v for k, v in meta.items() if k != "created"} == {
        k: v for k, v in meta_again.items() if k != "created"
    }
    other = tmp_path / "other.csv"
    sweep(other, config=SweepConfig(seed=6))
    assert other.read_bytes() != path.read_bytes()


def test_resume_finishes_with_the_same_rows_as_one_run(swept, tmp_path):
    path, full = swept
    part = tmp_path / "part.csv"
    first = sweep(part, rows=ROWS // 3)
    assert 0 < first.points < full.points
    with DatasetWriter(part, sweep_meta(TARGET, CONFIG)) as writer:
        # The last point may have been cut short by a kill: it is dropped and run again.
        assert writer.completed_points == frozenset(range(first.points - 1))
        resumed = run_sweep(TARGET, writer, CONFIG, rows=ROWS)
    assert resumed.new_points == full.points - first.points + 1
    assert part.read_bytes() == path.read_bytes()


def test_resume_after_a_kill_in_the_middle_of_a_line(swept, tmp_path):
    path, _ = swept
    content = path.read_bytes()
    torn = tmp_path / "torn.csv"
    torn.write_bytes(content[: len(content) // 2])
    (tmp_path / "torn.csv.json").write_text((path.parent / (path.name + ".json")).read_text())
    assert not torn.read_bytes().endswith(b"\n")
    sweep(torn)
    assert torn.read_bytes() == content


def test_a_different_setup_is_refused(swept, tmp_path):
    path, _ = swept
    other = TwinProfileTarget(TwinSetup(SETUP.gpu, model_spec("llama2-13b"), noise=0.05, seed=3))
    with pytest.raises(
        DatasetMismatchError, match=r"model: file has 'llama3-8b', asked for 'llama2-13b'"
    ) as err:
        DatasetWriter(path, sweep_meta(other, CONFIG))
    assert "noise: file has 0.02, asked for 0.05" in str(err.value) and "seed: " not in str(err.value)
    with pytest.raises(DatasetMismatchError, match=r"seed: file has 5, asked for 6"):
        DatasetWriter(path, sweep_meta(TARGET, SweepConfig(seed=6)))
    content = path.read_bytes()
    with (
        DatasetWriter(path, sweep_meta(TARGET, CONFIG)) as writer,
        pytest.raises(DatasetMismatchError, match="min_clock_mhz"),
    ):
        run_sweep(TARGET, writer, SweepConfig(seed=5, min_clock_mhz=900), rows=ROWS)
    assert path.read_bytes() == content  # opening to resume does not touch the file
    orphan = tmp_path / "orphan.csv"
    orphan.write_bytes(path.read_bytes())
    with pytest.raises(DatasetError, match="without its sidecar"):
        DatasetWriter(orphan, sweep_meta(TARGET, CONFIG))


def test_unsupported_clocks_are_refused(tmp_path):
    with pytest.raises(UnsupportedClockError, match=r"\[1051\]"):
        SweepConfig(clocks_mhz=(1050, 1051)).clocks(TARGET)
    with pytest.raises(UnsupportedClockError, match="1051 MHz"):
        TARGET.run_point(1051, [100], [10], point=0)
    with pytest.raises(ValueError, match="no clock at or above 2000"):
        SweepConfig(min_clock_mhz=2000).clocks(TARGET)
    config = SweepConfig(seed=1, clocks_mhz=(1050, 900, 450))
    assert config.clocks(TARGET) == (900, 1050)  # the floor still applies
    sweep(tmp_path / "two.csv", rows=100, config=config)
    assert set(read_dataset(tmp_path / "two.csv")["clock_mhz"]) == {900, 1050}


def test_points_limit_and_writer_checks(tmp_path):
    path = tmp_path / "p.csv"
    with DatasetWriter(path, sweep_meta(TARGET, CONFIG)) as writer:
        with pytest.raises(ValueError, match="rows or points"):
            run_sweep(TARGET, writer, CONFIG)
        seen = []
        done = run_sweep(TARGET, writer, CONFIG, points=3, progress=seen.append)
        assert writer.completed_points == {0, 1, 2} and done.new_points == 3
        assert [p.points for p in seen] == [1, 2, 3] and seen[-1] == done
        row = Row(3, 1, 1, 1, 64, 0, 1410, 10.0)
        with pytest.raises(ValueError, match="one point index"):
            writer.write_point([row, replace(row, point=4)])
        with pytest.raises(ValueError, match="already"):
            writer.write_point([replace(row, point=2)])
    with pytest.raises(ValueError, match="iteration_ms"):
        Row(0, 1, 1, 1, 64, 0, 1410, 0.0)


def test_read_dataset_concatenates_files_of_any_tp(swept, tmp_path):
    path, progress = swept
    tp2 = TwinProfileTarget(replace(SETUP, tp=2))
    other = tmp_path / "tp2.csv"
    extra = sweep(other, rows=100, target=tp2)
    data = read_dataset([path, other])
    assert len(data) == progress.rows + extra.rows
    assert list(np.unique(data["tp"])) == [1, 2]
    assert [m["tp"] for m in data.meta] == [1, 2] and data.files == (path, other)
    blocks32 = TwinProfileTarget(replace(SETUP, engine=EngineConfig(tokens_per_block=32)))
    small = tmp_path / "tpb32.csv"
    sweep(small, rows=50, target=blocks32)
    with pytest.raises(DatasetError, match="tokens_per_block 32"):
        read_dataset([path, small])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda lines: lines.__setitem__(4, lines[4].replace(",", ",x", 1)), r":5: tp is not a number"),
        (lambda lines: lines.__setitem__(6, lines[6] + ",1"), r":7: expected 9 fields, got 10"),
        (lambda lines: lines.__setitem__(2, lines[2].rsplit(",", 1)[0] + ",1.5"), r":3: ips 1.5 is not"),
        (lambda lines: lines.__setitem__(3, "0,1,0,1,64,0,1410,10.0,100.0"), r":4: row out of range"),
        (lambda lines: lines.__setitem__(0, "point,tp"), r":1: header must be"),
        (lambda lines: lines.pop(), r":\d+: last line is not terminated"),
        (lambda lines: lines.__delitem__(slice(1, None)), r":1: header must be the line"),
    ],
)
def test_malformed_files_name_the_line(swept, tmp_path, edit, message):
    path, _ = swept
    bad = tmp_path / "bad.csv"
    lines = path.read_text().split("\n")
    edit(lines)
    bad.write_text("\n".join(lines))
    (tmp_path / "bad.csv.json").write_text((path.parent / (path.name + ".json")).read_text())
    with pytest.raises(DatasetError, match=message):
        read_dataset(bad)


def test_sha256_pins_the_content(swept, tmp_path):
    path, _ = swept
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    changed = tmp_path / "changed.csv"
    changed.write_bytes(path.read_bytes() + b"\n")
    assert file_sha256(changed) != file_sha256(path)


def test_the_whole_batch_of_a_point_runs_together(swept, tmp_path):
    path, progress = swept
    tight = tmp_path / "tight.csv"
    for target, file, done in [(TARGET, path, progress), (TIGHT, tight, sweep(tight, 300, TIGHT))]:
        data = read_dataset(file)
        limits, clocks = target.limits(), target.supported_clocks_mhz()
        for index, point in enumerate(sweep_points(limits, clocks, done.points, CONFIG.seed)):
            rows = data["point"] == index
            assert data["batch"][rows].max() == len(point.prompts), index
            assert data["clock_mhz"][rows][0] == point.clock_mhz
