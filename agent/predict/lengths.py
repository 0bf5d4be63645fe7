"""Generation-length predictors: each request's total output tokens, for the batch and KV projection.

throttLL'eM projects future batch size and KV use from a predicted output length per request
(paper §3.3). The predictors here span the range the evaluation needs: the `oracle` (true
lengths, the limit), `noisy:<pct>` (true lengths with the paper's "p95 error" injected),
`max_tokens` (the safe fallback a client limit gives) and `learned` (an ONNX quantile model with a
conformal inflation, trained by `agent.modeling.lengths`). Every prediction is an integer in
[1, max_tokens]: an engine emits at least one token and stops at the client's limit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from agent.domain import Request

# Inputs of the learned length model, in column order (ONNX input and training columns).
LENGTH_FEATURES = ("log_prompt_tokens", "class_id")
# Where the learned model lives under the models root (models/README.md).
LEARNED_MODEL_SUBDIR = Path("lengths") / "azure"
Z_975 = 1.959963984540054  # P(|N(0, 1)| <= Z_975) = 0.95
SPECS = "oracle, noisy:<pct> (e.g. noisy:30), learned[:<class>] (e.g. learned:conv), max_tokens"


class LengthModelError(ValueError):
    """A length-model directory without a usable length.onnx / card.json, or an unknown class."""


class LengthPredictor(Protocol):
    """Predicts each request's total output tokens: int64, in [1, max_tokens] per request."""

    @property
    def name(self) -> str:
        """The spec that builds this predictor (`parse_length_predictor`)."""
        ...

    def predict(self, requests: Sequence[Request]) -> np.ndarray:
        """Predicted output tokens, one per request, in order."""
        ...


def _limits(requests: Sequence[Request]) -> np.ndarray:
    """Each request's max_tokens; the upper clip of every prediction."""
    limits = np.fromiter((r.max_tokens for r in requests), dtype=np.int64, count=len(requests))
    if len(limits) and limits.min() < 1:
        raise ValueError("every request needs max_tokens >= 1")
    return limits


def _true_lengths(requests: Sequence[Request]) -> np.ndarray:
    """Each request's true output tokens; an error when any is unknown (a live request)."""
    unknown = [r.request_id for r in requests if r.output_tokens is None]
    if unknown:
        raise ValueError(f"true output length unknown for request(s) {unknown[:5]} (live requests)")
    return np.fromiter((r.output_tokens for r in requests), dtype=np.int64, count=len(requests))


def _bounded(predicted: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """Round up and clip to [1, max_tokens] as int64."""
    return np.minimum(np.maximum(np.ceil(predicted), 1), limits).astype(np.int64)


@dataclass(frozen=True, slots=True)
class OraclePredictor:
    """The true output length: the best any predictor can do, for measuring the limit."""

    @property
    def name(self) -> str:
        """Spec name."""
        return "oracle"

    def predict(self, requests: Sequence[Request]) -> np.ndarray:
        """True lengths (clipped to max_tokens, where an engine would stop)."""
        return _bounded(_true_lengths(requests), _limits(requests))


@dataclass(frozen=True, slots=True)
class MaxTokensPredictor:
    """The client's limit: never underestimates, so never needs a misprediction fix-up."""

    @property
    def name(self) -> str:
        """Spec name."""
        return "max_tokens"

    def predict(self, requests: Sequence[Request]) -> np.ndarray:
        """Each request's max_tokens."""
        return _limits(requests)


@dataclass(frozen=True, slots=True)
class NoisyPredictor:
    """True length × (1 + e), e ~ N(0, σ) with P(|e| ≤ error_p95) = 0.95: the paper's "p95 error".

    The error of a request is a hash of (seed, request_id), not a draw from a stream, so a request
    gets the same prediction however often and in whatever company it is asked about.
    """

    error_p95: float  # e.g. 0.3 for "30% p95 error"
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.error_p95) and self.error_p95 >= 0):
            raise ValueError(f"error_p95 must be finite and >= 0, got {self.error_p95}")

    @property
    def name(self) -> str:
        """Spec name, e.g. noisy:30."""
        return f"noisy:{100 * self.error_p95:g}"

    def relative_errors(self, request_ids: np.ndarray) -> np.ndarray:
        """The error e of each request id."""
        return self.error_p95 / Z_975 * _hashed_normal(self.seed, request_ids)

    def predict(self, requests: Sequence[Request]) -> np.ndarray:
        """True lengths with each request's fixed relative error, rounded."""
        ids = np.fromiter((r.request_id for r in requests), dtype=np.int64, count=len(requests))
        noisy = _true_lengths(requests) * (1.0 + self.relative_errors(ids))
        return np.minimum(np.maximum(np.rint(noisy), 1), _limits(requests)).astype(np.int64)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 arrays (wrapping arithmetic): a well-mixed hash."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hashed_normal(seed: int, keys: np.ndarray) -> np.ndarray:
    """One standard normal per key, a pure function of (seed, key): two hashed uniforms, Box–Muller."""
    mixed_seed = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    base = _splitmix64(np.asarray(keys, dtype=np.int64).astype(np.uint64) ^ mixed_seed)
    scale = 2.0**-53  # top 53 bits of a hash -> a uniform double in [0, 1)
    u1 = (_splitmix64(base) >> np.uint64(11)).astype(np.float64) * scale
    u2 = (_splitmix64(base ^ np.uint64(0xD1B54A32D192ED03)) >> np.uint64(11)).astype(np.float64) * scale
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)


def length_features(prompt_tokens: np.ndarray, class_id: int) -> np.ndarray:
    """Rows of LENGTH_FEATURES as float32: the one place training and serving build them.

    The log keeps the prompt feature in a small range, where ONNX's float32 thresholds separate
    every distinct prompt length (interfaces.md §6.2).
    """
    prompt = np.asarray(prompt_tokens, dtype=np.float64)
    if len(prompt) and prompt.min() < 1:
        raise ValueError("prompt_tokens must be >= 1")
    return np.column_stack([np.log(prompt), np.full(len(prompt), class_id)]).astype(np.float32)


def _session(path: Path) -> ort.InferenceSession:
    """A single-threaded CPU session: the sidecar must not steal cores from the inference server."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class LearnedPredictor:
    """An upper bound on the output length at a stated coverage, from the prompt length and class.

    ONNX quantile model × the class's conformal inflation, rounded up: on held-out requests of
    that class, P(predicted ≥ actual) ≈ `coverage` (card.json states both). The class ("conv",
    "code", ...) comes from the gateway's configuration, not from the request.
    """

    def __init__(self, model_dir: Path | str, workload_class: str | None = None) -> None:
        model_dir = Path(model_dir)
        try:
            self.card: dict[str, Any] = json.loads((model_dir / "card.json").read_text())
            columns = tuple(self.card["input"]["columns"])
            classes = [str(c) for c in self.card["classes"]]
            inflation = {c: float(self.card["inflation"][c]) for c in classes}
            chosen = workload_class or str(self.card["default_class"])
            self.coverage = float(self.card["coverage"])
            self._session = _session(model_dir / self.card["file"])
        except (
            OSError,
            KeyError,
            TypeError,
            json.JSONDecodeError,
            ort.capi.onnxruntime_pybind11_state.Fail,
        ) as exc:
            raise LengthModelError(f"cannot load the length model in {model_dir}: {exc}") from exc
        if columns != LENGTH_FEATURES:
            raise LengthModelError(
                f"{model_dir}: model inputs {list(columns)} are not {list(LENGTH_FEATURES)}"
            )
        if chosen not in classes:
            raise LengthModelError(f"unknown workload class {chosen!r}; the model knows {classes}")
        self.workload_class = chosen
        self.class_id = classes.index(chosen)
        self.inflation = inflation[chosen]

    @property
    def name(self) -> str:
        """Spec name, e.g. learned:conv."""
        return f"learned:{self.workload_class}"

    def raw(self, requests: Sequence[Request]) -> np.ndarray:
        """The model's quantile prediction before the conformal inflation (float64)."""
        if not requests:
            return np.zeros(0)
        prompts = np.fromiter((r.prompt_tokens for r in requests), dtype=np.int64, count=len(requests))
        x = length_features(prompts, self.class_id)
        return self._session.run(None, {"input": x})[0].ravel().astype(np.float64)

    def predict(self, requests: Sequence[Request]) -> np.ndarray:
        """Inflated quantile, rounded up, clipped to [1, max_tokens]."""
        return _bounded(self.raw(requests) * self.inflation, _limits(requests))


def evaluate(predictor: LengthPredictor, requests: Sequence[Request]) -> dict[str, float | int]:
    """Error of `predictor` against the true lengths of `requests`.

    Percentages are of the true length. `coverage` is the share never underestimated (what the
    KV projection needs); `mean_overestimate_tokens` is the mean of max(predicted − actual, 0)
    over all requests: the KV a projection reserves beyond need, per request.
    """
    if not requests:
        raise ValueError("no requests to evaluate")
    actual = _true_lengths(requests).astype(np.float64)
    predicted = predictor.predict(requests).astype(np.float64)
    abs_pct = 100.0 * np.abs(predicted - actual) / actual
    return {
        "mae_tokens": float(np.mean(np.abs(predicted - actual))),
        "mape": float(np.mean(abs_pct)),
        "p95_abs_pct_error": float(np.percentile(abs_pct, 95)),
        "coverage": float(np.mean(predicted >= actual)),
        "mean_overestimate_tokens": float(np.mean(np.maximum(predicted - actual, 0.0))),
        "n": len(requests),
    }


def parse_length_predictor(spec: str, models_dir: Path | str, seed: int = 0) -> LengthPredictor:
    """Build a predictor from its spec (SPECS); `models_dir` is the models root, `seed` feeds noisy."""
    kind, _, arg = spec.partition(":")
    if spec == "oracle":
        return OraclePredictor()
    if spec == "max_tokens":
        return MaxTokensPredictor()
    if kind == "noisy" and arg:
        try:
            pct = float(arg)
        except ValueError:
            pct = math.nan
        if not (math.isfinite(pct) and pct >= 0):
            raise ValueError(f"length predictor {spec!r}: <pct> must be a number >= 0, e.g. noisy:30")
        return NoisyPredictor(pct / 100.0, seed)
    if kind == "learned" and (arg or ":" not in spec):
        return LearnedPredictor(Path(models_dir) / LEARNED_MODEL_SUBDIR, arg or None)
    raise ValueError(f"unknown length predictor {spec!r}; expected one of: {SPECS}")
