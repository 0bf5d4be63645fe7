"""Train the learned generation-length predictor on the shipped Azure traces and score every predictor.

The paper plugs in an existing length predictor (§3.3); the Azure traces carry no prompt texts, so
the only per-request signal is the prompt length, plus the workload class the gateway is configured
with. Model: LightGBM quantile regression (alpha 0.9) on LENGTH_FEATURES, exported to ONNX, then a
split-conformal correction per class: the inflation is the finite-sample conformal quantile of
actual / predicted on a calibration split, so held-out coverage is ≈ the stated target whatever the
quantile model's own bias.

Each trace is split at random (seeded) into train / calibration / test; the card states how, and
reports every predictor (oracle, noisy 15/30, max_tokens, learned) on each class's test split.
Requests are scored with a client limit of EVAL_MAX_TOKENS, above every traced output, so neither
the limit leaks the true length nor any request is cut.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np

from agent.domain import Request
from agent.modeling.onnx_export import (
    PARITY_MAX_REL_ERROR,
    export_onnx,
    onnx_parity,
    onnx_predict,
    provenance,
)
from agent.predict.lengths import (
    LENGTH_FEATURES,
    LearnedPredictor,
    LengthPredictor,
    MaxTokensPredictor,
    NoisyPredictor,
    OraclePredictor,
    evaluate,
    length_features,
)
from agent.workloads import SHIPPED_TRACES, load_trace

CLASS_TRACES = {"conv": "azure-conv", "code": "azure-code"}  # class label (id = position) -> trace
DEFAULT_CLASS = "conv"
EVAL_MAX_TOKENS = 2048  # client limit for scoring: above every output in both traces (max 1,899)
COVERAGE_TOLERANCE = 0.02  # test coverage may fall this far below target (≈ 2-3 σ of a test split)
NOISY_ERRORS_P95 = (0.15, 0.30)


@dataclass(frozen=True, slots=True)
class LengthTrainConfig:
    """Model, calibration and split settings; small trees suffice for two features."""

    alpha: float = 0.9  # quantile the LightGBM objective targets
    coverage: float = 0.9  # stated P(predicted >= actual) the conformal step calibrates to
    n_estimators: int = 200
    num_leaves: int = 15
    learning_rate: float = 0.05
    min_child_samples: int = 50
    train_fraction: float = 0.6
    calibration_fraction: float = 0.2  # the rest is the test split


@dataclass(frozen=True, slots=True)
class ClassSplit:
    """One class's requests, split for training, conformal calibration and testing."""

    train: tuple[Request, ...]
    calibration: tuple[Request, ...]
    test: tuple[Request, ...]


def split_requests(seed: int, cfg: LengthTrainConfig | None = None) -> dict[str, ClassSplit]:
    """Each class's trace requests (limit EVAL_MAX_TOKENS), permuted by rng([seed, class id]) and cut."""
    cfg = cfg or LengthTrainConfig()
    splits = {}
    for class_id, (label, trace) in enumerate(CLASS_TRACES.items()):
        requests = load_trace(trace).requests(max_tokens=EVAL_MAX_TOKENS)
        order = np.random.default_rng([seed, class_id]).permutation(len(requests))
        n_train = round(cfg.train_fraction * len(requests))
        n_cal = round(cfg.calibration_fraction * len(requests))
        splits[label] = ClassSplit(
            train=tuple(requests[i] for i in order[:n_train]),
            calibration=tuple(requests[i] for i in order[n_train : n_train + n_cal]),
            test=tuple(requests[i] for i in order[n_train + n_cal :]),
        )
    return splits


def conformal_inflation(actual: np.ndarray, predicted: np.ndarray, coverage: float) -> float:
    """Smallest factor f with P(f·predicted ≥ actual) ≥ coverage for a new exchangeable request.

    Split conformal: the ⌈(n+1)·coverage⌉-th smallest ratio actual / predicted of n calibration
    requests.
    """
    ratios = np.sort(np.asarray(actual, dtype=np.float64) / np.asarray(predicted, dtype=np.float64))
    rank = math.ceil((len(ratios) + 1) * coverage)
    if rank > len(ratios):
        raise ValueError(f"{len(ratios)} calibration requests cannot certify coverage {coverage}")
    return float(ratios[rank - 1])


def training_rows(requests: Sequence[Request], class_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Feature rows (float32 values held as float64, so ONNX sees LightGBM's exact inputs) and lengths."""
    prompts = np.array([r.prompt_tokens for r in requests], dtype=np.int64)
    lengths = np.array([r.output_tokens for r in requests], dtype=np.float64)
    return length_features(prompts, class_id).astype(np.float64), lengths


def fit_quantile_model(x: np.ndarray, y: np.ndarray, cfg: LengthTrainConfig, seed: int) -> lgb.LGBMRegressor:
    """LightGBM regressor for the cfg.alpha quantile of y; single-threaded and deterministic."""
    model = lgb.LGBMRegressor(
        objective="quantile",
        alpha=cfg.alpha,
        n_estimators=cfg.n_estimators,
        num_leaves=cfg.num_leaves,
        learning_rate=cfg.learning_rate,
        min_child_samples=cfg.min_child_samples,
        random_state=seed,
        deterministic=True,
        n_jobs=1,
        verbose=-1,
    )
    return model.fit(x, y)


def _sha256(trace: str) -> str:
    data = (resources.files("agent.workloads") / "data" / SHIPPED_TRACES[trace]).read_bytes()
    return hashlib.sha256(data).hexdigest()


def train_length_model(
    out_dir: Path | str, seed: int = 0, cfg: LengthTrainConfig | None = None
) -> dict[str, Any]:
    """Train, export, calibrate and score the learned length model; returns the card written beside it.

    The same seed and config give the same length.onnx and card (apart from `created`).
    """
    cfg = cfg or LengthTrainConfig()
    out_dir = Path(out_dir)
    splits = split_requests(seed, cfg)
    classes = list(CLASS_TRACES)
    train = [training_rows(split.train, k) for k, split in enumerate(splits.values())]
    model = fit_quantile_model(
        np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), cfg, seed
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "length.onnx"
    export_onnx(model, onnx_path, len(LENGTH_FEATURES), "throttllem_length")
    test_x = np.concatenate([training_rows(split.test, k)[0] for k, split in enumerate(splits.values())])
    parity = onnx_parity(model, onnx_path, test_x)
    if parity > PARITY_MAX_REL_ERROR:
        raise RuntimeError(
            f"ONNX export differs from LightGBM by {parity:.2e} (limit {PARITY_MAX_REL_ERROR})"
        )

    # Calibrate on the exported model's float32 output: the inflation must fit what serves.
    inflation = {}
    for k, (label, split) in enumerate(splits.items()):
        x, actual = training_rows(split.calibration, k)
        inflation[label] = conformal_inflation(actual, onnx_predict(onnx_path, x), cfg.coverage)

    card: dict[str, Any] = {
        "kind": "generation_length",
        "file": onnx_path.name,
        "input": {"name": "input", "dtype": "float32", "columns": list(LENGTH_FEATURES)},
        "output": {
            "name": "variable",
            "unit": "output tokens: the alpha-quantile estimate, before the conformal inflation",
        },
        "features": {
            "log_prompt_tokens": "natural log of the prompt length in tokens",
            "class_id": "position of the workload class in `classes`",
        },
        "classes": classes,
        "default_class": DEFAULT_CLASS,
        "alpha": cfg.alpha,
        "coverage": cfg.coverage,
        "prediction": "ceil(onnx output * inflation[class]), clipped to [1, max_tokens]",
        "inflation": inflation,
        "split": {
            "method": "per trace: numpy default_rng([seed, class id]).permutation of the requests in"
            " arrival order, then the first train_fraction, the next calibration_fraction, the rest test",
            "seed": seed,
            "train_fraction": cfg.train_fraction,
            "calibration_fraction": cfg.calibration_fraction,
            "requests": {
                label: {"train": len(s.train), "calibration": len(s.calibration), "test": len(s.test)}
                for label, s in splits.items()
            },
        },
        "evaluation": {"split": "test", "max_tokens": EVAL_MAX_TOKENS, "noisy_seed": seed},
        "metrics": {},
        "onnx_max_rel_error": parity,
        "model": {"objective": "quantile", "trees": int(model.booster_.num_trees()), **asdict(cfg)},
        "data": [
            {"class": label, "trace": trace, "file": SHIPPED_TRACES[trace], "sha256": _sha256(trace)}
            for label, trace in CLASS_TRACES.items()
        ],
        **provenance(),
    }
    _write(out_dir, card)  # the learned predictor below loads it

    for label, split in splits.items():
        predictors: list[LengthPredictor] = [
            OraclePredictor(),
            *(NoisyPredictor(p95, seed) for p95 in NOISY_ERRORS_P95),
            MaxTokensPredictor(),
            LearnedPredictor(out_dir, label),
        ]
        card["metrics"][label] = {p.name: evaluate(p, split.test) for p in predictors}
        achieved = card["metrics"][label][f"learned:{label}"]["coverage"]
        if achieved < cfg.coverage - COVERAGE_TOLERANCE:
            raise RuntimeError(f"{label}: test coverage {achieved:.3f} is below the target {cfg.coverage}")
    _write(out_dir, card)
    return card


def _write(out_dir: Path, card: dict[str, Any]) -> None:
    (out_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")
