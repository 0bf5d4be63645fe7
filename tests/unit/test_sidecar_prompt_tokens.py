"""Prompt token counters: the tokenizer when available, else a reconcilable estimate."""

import logging
import sys

import pytest

from agent.sidecar.prompt_tokens import EstimateCounter, TokenizerCounter, build_prompt_counter


def test_the_estimate_is_characters_over_the_ratio_rounded_up():
    counter = EstimateCounter()
    assert [counter.count(t) for t in ("", "a", "abcd", "abcde")] == [0, 1, 1, 2]
    assert EstimateCounter(chars_per_token=2.5).count("x" * 10) == 4


def test_observe_moves_the_ratio_toward_what_was_measured():
    counter = EstimateCounter(chars_per_token=4.0, smoothing=0.1)
    counter.observe(estimated_tokens=100, measured_tokens=50)  # 400 chars were 50 tokens: 8 per token
    assert counter.chars_per_token == pytest.approx(4.4)
    for _ in range(200):
        counter.observe(estimated_tokens=1000, measured_tokens=round(1000 * counter.chars_per_token / 8))
    assert counter.chars_per_token == pytest.approx(8.0, rel=0.01)
    counter.observe(0, 10)
    counter.observe(10, 0)
    assert counter.chars_per_token == pytest.approx(8.0, rel=0.01)


def test_observe_keeps_the_ratio_in_bounds():
    counter = EstimateCounter(smoothing=1.0)
    counter.observe(estimated_tokens=1000, measured_tokens=1)
    assert counter.chars_per_token == 16.0


@pytest.mark.parametrize("kwargs", [{"chars_per_token": 0.5}, {"smoothing": 0.0}, {"smoothing": 1.5}])
def test_nonsense_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        EstimateCounter(**kwargs)


def test_without_a_path_the_estimate_is_used_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert isinstance(build_prompt_counter(None), EstimateCounter)
    assert "no tokenizer.json configured" in caplog.text


def test_without_the_package_the_estimate_is_used_and_the_warning_says_what_to_install(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with caplog.at_level(logging.WARNING):
        counter = build_prompt_counter(tmp_path / "tokenizer.json")
    assert isinstance(counter, EstimateCounter)
    assert "pip install tokenizers" in caplog.text


def test_an_unreadable_tokenizer_falls_back_to_the_estimate(tmp_path, caplog):
    pytest.importorskip("tokenizers")
    with caplog.at_level(logging.WARNING):
        counter = build_prompt_counter(tmp_path / "missing.json")
    assert isinstance(counter, EstimateCounter)
    assert "cannot load tokenizer" in caplog.text


def test_a_tokenizer_json_counts_exact_tokens(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    counter = build_prompt_counter(path)
    assert isinstance(counter, TokenizerCounter)
    assert counter.count("hello world hello, unknown") == 5  # ',' and 'unknown' are [UNK]
    assert counter.count("") == 0
