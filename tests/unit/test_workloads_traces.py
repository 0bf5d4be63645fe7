import hashlib
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from agent.workloads import SHIPPED_TRACES, TraceFormatError, load_trace
from agent.workloads import columns as columns_module

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
BURSTGPT_HEADER = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
BURSTGPT_ROWS = [
    # (timestamp, model, request, response, log type)
    (5, "ChatGPT", 100, 20, "Conversation log"),
    (7, "GPT-4", 300, 0, "Conversation log"),  # failed
    (7, "GPT-4", 50, 10, "API log"),
    (9, "ChatGPT", 0, 40, "API log"),
    (12, "GPT-4", 80, 30, "Conversation log"),
]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def burstgpt_file(path: Path, with_session_columns: bool) -> Path:
    if not with_session_columns:
        lines = [f"{t},{m},{q},{r},{q + r},{k}\n" for t, m, q, r, k in BURSTGPT_ROWS]
        return write(path, BURSTGPT_HEADER + "".join(lines))
    header = "Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
    lines = [
        f"{t},s{i},{i * 1.5},{m},{q},{r},{q + r},{k}\n" for i, (t, m, q, r, k) in enumerate(BURSTGPT_ROWS)
    ]
    return write(path, header + "".join(lines))


# --- the shipped Azure 2023 traces -------------------------------------------------------------


def test_shipped_conv_trace_matches_its_published_statistics() -> None:
    conv = load_trace("azure-conv")
    stats = conv.describe()
    assert conv.name == "azure-conv"
    assert len(conv) == 19_366
    assert conv.duration_s == pytest.approx(3_502, abs=1)
    assert conv.mean_rate_rps == pytest.approx(5.53, abs=0.01)
    assert (stats["prompt_p50"], stats["output_p50"]) == (1020, 129)
    assert (stats["prompt_p99"], stats["output_p99"]) == (4142, 601)
    assert (conv.prompt_tokens.max(), conv.output_tokens.max()) == (14_050, 1_000)
    assert stats["interarrival_cv"] == pytest.approx(1.1, abs=0.05)


def test_shipped_code_trace_matches_its_published_statistics() -> None:
    code = load_trace("azure-code")
    stats = code.describe()
    assert len(code) == 8_819
    assert code.duration_s == pytest.approx(3_436, abs=1)
    assert (stats["prompt_p50"], stats["output_p50"]) == (1469, 13)
    assert (code.prompt_tokens.max(), code.output_tokens.max()) == (7_437, 1_899)
    assert stats["interarrival_cv"] == pytest.approx(13, abs=0.5)


def test_shipped_trace_arrivals_keep_the_sub_millisecond_digits() -> None:
    # First rows: 18:15:46.6805900, 18:15:50.9951690, 18:15:51.2224670.
    conv = load_trace("azure-conv")
    assert conv.arrival_s[:3].tolist() == pytest.approx([0.0, 4.314579, 4.541877], abs=1e-9)
    assert (conv.prompt_tokens[:2].tolist(), conv.output_tokens[:2].tolist()) == ([374, 396], [44, 109])


@pytest.mark.parametrize(
    ("name", "sha256"),
    [
        ("azure-code", "54e9a6d2a4bd06ba1e060304b900abbc74cbea53de96506e60fe5bb4f2277fb6"),
        ("azure-conv", "2f1e5b666d4e3055fdbba98598ce2ec307767b9064e03e2fa46676dbcc7d0bf8"),
    ],
)
def test_shipped_files_are_the_upstream_bytes(name: str, sha256: str) -> None:
    data = (resources.files("agent.workloads") / "data" / SHIPPED_TRACES[name]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == sha256


def test_shipped_data_carries_its_attribution() -> None:
    readme = (resources.files("agent.workloads") / "data" / "README.md").read_text(encoding="utf-8")
    for needle in ("CC-BY 4.0", "Splitwise", "ISCA 2024", "790921015d50dd6aae7f7e47f39ba0e235ad6b08"):
        assert needle in readme


# --- Azure files ---------------------------------------------------------------------------------


def test_azure_2024_file_with_mixed_timestamps(tmp_path: Path) -> None:
    path = write(
        tmp_path / "AzureLLMInferenceTrace_conv_1week.csv",
        AZURE_HEADER
        + "2024-05-10 00:00:00+00:00,10,1\n"
        + "2024-05-10 00:00:00.250+00:00,20,2\n"
        + "2024-05-10 00:00:01.000001+00:00,30,3\n"
        + "2024-05-10 00:00:02.123456789+00:00,40,4\n",
    )
    trace = load_trace(path)
    assert trace.name == "AzureLLMInferenceTrace_conv_1week"
    assert trace.arrival_s.tolist() == pytest.approx([0, 0.25, 1.000001, 2.123456789], abs=1e-12)
    assert trace.prompt_tokens.tolist() == [10, 20, 30, 40]
    assert trace.output_tokens.tolist() == [1, 2, 3, 4]
    assert trace.duration_s == pytest.approx(2.123456789, abs=1e-12)


def test_accepts_a_string_path_crlf_a_bom_and_blank_lines(tmp_path: Path) -> None:
    text = "\ufeff" + AZURE_HEADER + "2023-11-16 18:00:00.0000000,5,6\n\n2023-11-16 18:00:03.5000000,7,8\n\n"
    path = tmp_path / "t.csv"
    path.write_bytes(text.replace("\n", "\r\n").encode("utf-8"))
    trace = load_trace(str(path))
    assert trace.arrival_s.tolist() == [0.0, 3.5]
    assert trace.prompt_tokens.tolist() == [5, 7]


def test_zero_lengths_become_one_token(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", AZURE_HEADER + "2023-11-16 18:00:00,0,5\n2023-11-16 18:00:01,9,0\n")
    trace = load_trace(path)
    assert trace.prompt_tokens.tolist() == [1, 9]
    assert trace.output_tokens.tolist() == [5, 1]


def test_unsorted_rows_are_sorted_stably(tmp_path: Path) -> None:
    path = write(
        tmp_path / "t.csv",
        AZURE_HEADER + "2023-11-16 18:00:05,1,1\n2023-11-16 18:00:01,2,2\n2023-11-16 18:00:05,3,3\n",
    )
    trace = load_trace(path)
    assert trace.arrival_s.tolist() == [0.0, 4.0, 4.0]
    assert trace.prompt_tokens.tolist() == [2, 1, 3]


def test_header_only_file_is_an_empty_workload(tmp_path: Path) -> None:
    trace = load_trace(write(tmp_path / "t.csv", AZURE_HEADER))
    assert len(trace) == 0
    assert trace.duration_s == 0


def test_filters_are_refused_for_azure_traces() -> None:
    with pytest.raises(ValueError, match="BurstGPT"):
        load_trace("azure-conv", model="GPT-4")


# --- BurstGPT files ------------------------------------------------------------------------------


@pytest.mark.parametrize("with_session_columns", [False, True])
def test_burstgpt_drops_failed_requests(tmp_path: Path, with_session_columns: bool) -> None:
    trace = load_trace(burstgpt_file(tmp_path / "BurstGPT_1.csv", with_session_columns))
    assert trace.name == "BurstGPT_1"
    assert trace.arrival_s.tolist() == [0, 2, 4, 7]
    assert trace.prompt_tokens.tolist() == [100, 50, 1, 80]  # the 0-token prompt is raised to 1
    assert trace.output_tokens.tolist() == [20, 10, 40, 30]


@pytest.mark.parametrize("with_session_columns", [False, True])
def test_burstgpt_filters_by_model_and_log_type(tmp_path: Path, with_session_columns: bool) -> None:
    path = burstgpt_file(tmp_path / "b.csv", with_session_columns)
    gpt4 = load_trace(path, model="GPT-4")
    assert gpt4.name == "b[GPT-4]"
    assert (gpt4.prompt_tokens.tolist(), gpt4.arrival_s.tolist()) == ([50, 80], [0, 5])
    api = load_trace(path, log_type="API log")
    assert api.prompt_tokens.tolist() == [50, 1]
    both = load_trace(path, model="GPT-4", log_type="Conversation log", keep_failed=True)
    assert both.name == "b[GPT-4, Conversation log]"
    assert both.prompt_tokens.tolist() == [300, 80]
    assert both.output_tokens.tolist() == [1, 30]  # the failed request's 0 output is raised to 1


def test_burstgpt_keep_failed(tmp_path: Path) -> None:
    trace = load_trace(burstgpt_file(tmp_path / "b.csv", False), keep_failed=True)
    assert len(trace) == len(BURSTGPT_ROWS)


def test_burstgpt_filter_matching_nothing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no request left with model='gpt-4'.*'GPT-4'"):
        load_trace(burstgpt_file(tmp_path / "b.csv", False), model="gpt-4")


def test_burstgpt_quoted_fields(tmp_path: Path) -> None:
    path = write(
        tmp_path / "b.csv", BURSTGPT_HEADER + '3,"GPT-4",10,20,30,"API log"\n4,ChatGPT,1,2,3,API log\n'
    )
    trace = load_trace(path, log_type="API log")
    assert trace.prompt_tokens.tolist() == [10, 1]


# --- errors --------------------------------------------------------------------------------------


def test_unknown_header_names_the_file_and_the_expected_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "other.csv", "time,prompt,output\n1,2,3\n")
    with pytest.raises(TraceFormatError) as info:
        load_trace(path)
    message = str(info.value)
    assert str(path) in message
    assert "'TIMESTAMP', 'ContextTokens', 'GeneratedTokens'" in message
    assert "'Request tokens'" in message


def test_missing_file_lists_the_shipped_traces(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="azure-conv, azure-code"):
        load_trace(tmp_path / "azure-cnov")


def test_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00\xff\xfe")
    with pytest.raises(TraceFormatError, match=f"{re.escape(str(path))}: not a UTF-8 text file"):
        load_trace(path)


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path / "empty.csv", "")
    with pytest.raises(TraceFormatError, match=f"{re.escape(str(path))}: empty file"):
        load_trace(path)


@pytest.mark.parametrize(
    ("row", "complaint"),
    [
        ("2023-11-16 18:00:02,x,5", "'ContextTokens'.*'x'"),
        ("2023-11-16 18:00:02,4,-5", "'GeneratedTokens'.*negative token count '-5'"),
        ("2023-11-16 18:00:02,4", "expected 3 fields, found 2"),
        ("2023-11-16 18:00:02,4,5,6", "expected 3 fields, found 4"),
        ("2023-11-16 25:00:02,4,5", "'TIMESTAMP'.*not a timestamp"),
    ],
)
def test_malformed_row_names_the_file_and_line(tmp_path: Path, row: str, complaint: str) -> None:
    good = "2023-11-16 18:00:01,1,1\n"
    path = write(tmp_path / "bad.csv", AZURE_HEADER + good + "\n" + good + row + "\n" + good)
    with pytest.raises(TraceFormatError, match=complaint) as info:
        load_trace(path)
    assert str(info.value).startswith(f"{path}:5: ")  # header, good, blank, good, then the bad row


def test_burstgpt_malformed_timestamp(tmp_path: Path) -> None:
    path = write(tmp_path / "b.csv", BURSTGPT_HEADER + "1,GPT-4,1,1,2,API log\nsoon,GPT-4,1,1,2,API log\n")
    with pytest.raises(TraceFormatError, match=f"{re.escape(str(path))}:3: column 'Timestamp'.*'soon'"):
        load_trace(path)


def test_line_numbers_count_across_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(columns_module, "CHUNK_BYTES", 64)  # a few rows per chunk
    rows = [f"2023-11-16 18:00:{s:02d},{s + 1},1\n" for s in range(40)]
    rows[29] = "2023-11-16 18:00:29,oops,1\n"
    path = write(tmp_path / "t.csv", AZURE_HEADER + "".join(rows))
    with pytest.raises(TraceFormatError, match=f"{re.escape(str(path))}:31: column 'ContextTokens'"):
        load_trace(path)
    rows[29] = "2023-11-16 18:00:29,30,1\n"
    trace = load_trace(write(path, AZURE_HEADER + "".join(rows)))
    assert trace.prompt_tokens.tolist() == list(range(1, 41))
    assert trace.arrival_s.tolist() == list(np.arange(40.0))
