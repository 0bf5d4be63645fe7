"""Prompt length in tokens, as the gateway counts it before a request reaches the engine.

The controller's KV and prefill projections need each request's prompt tokens when it arrives,
long before the engine reports anything. The exact answer needs the model's tokenizer (a
`tokenizer.json`, read with the optional `tokenizers` package); without it the gateway
estimates from the text's length, and the loop may reconcile that estimate with what the
engine's KV-block metrics show (`EstimateCounter.observe`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

DEFAULT_CHARS_PER_TOKEN = 4.0  # English text with a BPE vocabulary of 32k-128k entries
# Reconciled ratios stay in this range: anything outside is a measurement error, not a language.
MIN_CHARS_PER_TOKEN, MAX_CHARS_PER_TOKEN = 1.0, 16.0


class PromptTokenCounter(Protocol):
    """Counts the tokens of one piece of prompt text."""

    def count(self, text: str) -> int:
        """Tokens in `text` (0 for empty text)."""
        ...


class TokenizerCounter:
    """Exact counts from the served model's `tokenizer.json` (Hugging Face `tokenizers`)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    @classmethod
    def from_file(cls, path: Path) -> TokenizerCounter:
        """Load `tokenizer.json`; ImportError without the `tokenizers` package."""
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def count(self, text: str) -> int:
        """Tokens the engine's preprocessing would produce, special tokens included."""
        if not text:
            return 0
        return len(self._tokenizer.encode(text).ids)


class EstimateCounter:
    """`ceil(chars / chars_per_token)`; the ratio follows measurements as an EWMA."""

    def __init__(self, chars_per_token: float = DEFAULT_CHARS_PER_TOKEN, smoothing: float = 0.1) -> None:
        if not MIN_CHARS_PER_TOKEN <= chars_per_token <= MAX_CHARS_PER_TOKEN:
            raise ValueError(
                f"chars_per_token must be in [{MIN_CHARS_PER_TOKEN}, {MAX_CHARS_PER_TOKEN}], "
                f"got {chars_per_token}"
            )
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self.chars_per_token = chars_per_token
        self.smoothing = smoothing

    def count(self, text: str) -> int:
        """Estimated tokens of `text`."""
        return math.ceil(len(text) / self.chars_per_token)

    def observe(self, estimated_tokens: int, measured_tokens: int) -> None:
        """Prompts estimated at `estimated_tokens` took `measured_tokens`: move the ratio toward it.

        The estimate came from `estimated_tokens * chars_per_token` characters, so the measured
        ratio is that many characters over `measured_tokens`.
        """
        if estimated_tokens <= 0 or measured_tokens <= 0:
            return
        measured = estimated_tokens * self.chars_per_token / measured_tokens
        measured = min(MAX_CHARS_PER_TOKEN, max(MIN_CHARS_PER_TOKEN, measured))
        self.chars_per_token += self.smoothing * (measured - self.chars_per_token)


def build_prompt_counter(tokenizer_path: Path | None) -> PromptTokenCounter:
    """The tokenizer when one is given and loadable, else the estimate (with a warning why)."""
    if tokenizer_path is None:
        log.warning(
            "no tokenizer.json configured (THROTTLLEM_TOKENIZER): estimating prompt tokens as characters / 4"
        )
        return EstimateCounter()
    try:
        counter = TokenizerCounter.from_file(tokenizer_path)
    except ImportError:
        log.warning(
            "the 'tokenizers' package is not installed (pip install tokenizers): "
            "ignoring %s and estimating prompt tokens as characters / 4",
            tokenizer_path,
        )
        return EstimateCounter()
    except Exception as exc:  # the package raises a bare Exception for unreadable files
        log.warning(
            "cannot load tokenizer %s (%s): estimating prompt tokens as characters / 4", tokenizer_path, exc
        )
        return EstimateCounter()
    log.info("counting prompt tokens with %s", tokenizer_path)
    return counter
