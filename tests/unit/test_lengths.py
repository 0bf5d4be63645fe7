"""Generation-length predictors: contracts, the noisy error model, the shipped learned model, training."""

import json

import numpy as np
import pytest

from agent.domain import Request
from agent.modeling.lengths import (
    COVERAGE_TOLERANCE,
    LengthTrainConfig,
    conformal_inflation,
    fit_quantile_model,
    split_requests,
    train_length_model,
    training_rows,
)
from agent.modeling.onnx_export import PARITY_MAX_REL_ERROR, export_onnx, onnx_parity
from agent.predict.lengths import (
    LENGTH_FEATURES,
    Z_975,
    LearnedPredictor,
    LengthModelError,
    MaxTokensPredictor,
    NoisyPredictor,
    OraclePredictor,
    evaluate,
    parse_length_predictor,
)
from agent.shipped import SHIPPED_MODELS_DIR

MODELS = SHIPPED_MODELS_DIR
SHIPPED = MODELS / "lengths" / "azure"
SMALL = LengthTrainConfig(n_estimators=20, num_leaves=7)


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((SHIPPED / "card.json").read_text())


@pytest.fixture(scope="module")
def splits(card):
    return split_requests(card["split"]["seed"])


def predictors():
    return [
        OraclePredictor(),
        NoisyPredictor(0.3, seed=1),
        MaxTokensPredictor(),
        LearnedPredictor(SHIPPED, "conv"),
        LearnedPredictor(SHIPPED, "code"),
    ]


def edge_requests() -> list[Request]:
    """Tiny limits, outputs at the limit, huge prompts: where clipping must hold."""
    return [
        Request(0, 0.0, 1, 1, 1),
        Request(1, 0.0, 5000, 1, 1),
        Request(2, 0.0, 1000, 3, 3),
        Request(3, 0.0, 14000, 2048, 2000),
        Request(4, 0.0, 7, 40, 1),
        Request(5, 0.0, 1000, 600, 500),
    ]


@pytest.mark.parametrize("predictor", predictors(), ids=lambda p: p.name)
def test_predictions_are_int64_between_one_and_max_tokens(predictor, splits):
    requests = [*edge_requests(), *splits["conv"].test[:500], *splits["code"].test[:500]]
    predicted = predictor.predict(requests)
    limits = np.array([r.max_tokens for r in requests])
    assert predicted.dtype == np.int64
    assert predicted.shape == (len(requests),)
    assert predicted.min() >= 1
    assert np.all(predicted <= limits)
    assert predictor.predict([]).shape == (0,)


def test_oracle_is_exact_and_needs_the_true_length():
    requests = edge_requests()
    assert OraclePredictor().predict(requests).tolist() == [r.output_tokens for r in requests]
    with pytest.raises(ValueError, match="unknown"):
        OraclePredictor().predict([Request(9, 0.0, 10, 100)])


def test_max_tokens_predicts_the_limit():
    requests = edge_requests()
    assert MaxTokensPredictor().predict(requests).tolist() == [r.max_tokens for r in requests]
    with pytest.raises(ValueError, match="max_tokens"):
        MaxTokensPredictor().predict([Request(0, 0.0, 10, 0, 1)])


def test_noisy_prediction_depends_only_on_seed_and_request_id():
    requests = [Request(i, 0.0, 100, 10_000, 500 + i) for i in range(1000)]
    first = NoisyPredictor(0.3, seed=7).predict(requests)
    again = NoisyPredictor(0.3, seed=7).predict(requests[::-1])[::-1]
    alone = [NoisyPredictor(0.3, seed=7).predict([r])[0] for r in requests[:20]]
    other_seed = NoisyPredictor(0.3, seed=8).predict(requests)
    assert np.array_equal(first, again)
    assert alone == first[:20].tolist()
    assert np.mean(first != other_seed) > 0.9


def test_noisy_error_has_the_stated_p95_and_is_normal():
    n = 200_000
    true = 1_000_000
    requests = [Request(i, 0.0, 100, 10 * true, true) for i in range(n)]
    for p95 in (0.15, 0.3):
        error = NoisyPredictor(p95, seed=3).predict(requests) / true - 1.0
        assert np.percentile(np.abs(error), 95) == pytest.approx(p95, rel=0.02)
        assert abs(np.mean(error)) < 0.01 * p95
        sigma = p95 / Z_975
        assert np.mean(np.abs(error) <= sigma) == pytest.approx(0.6827, abs=0.005)
        assert np.mean(error > 0) == pytest.approx(0.5, abs=0.005)


def test_noisy_rejects_a_negative_error():
    with pytest.raises(ValueError, match="error_p95"):
        NoisyPredictor(-0.1)


def test_evaluate_reports_errors_against_the_true_lengths():
    requests = [Request(0, 0.0, 10, 400, 100), Request(1, 0.0, 10, 300, 200)]
    metrics = evaluate(MaxTokensPredictor(), requests)
    assert metrics == {
        "mae_tokens": 200.0,
        "mape": 175.0,  # (300% + 50%) / 2
        "p95_abs_pct_error": pytest.approx(300 - 0.05 * 250),
        "coverage": 1.0,
        "mean_overestimate_tokens": 200.0,
        "n": 2,
    }
    assert evaluate(OraclePredictor(), requests)["mae_tokens"] == 0.0
    with pytest.raises(ValueError, match="no requests"):
        evaluate(OraclePredictor(), [])
    with pytest.raises(ValueError, match="unknown"):
        evaluate(MaxTokensPredictor(), [Request(0, 0.0, 10, 400)])


@pytest.mark.parametrize("label", ["conv", "code"])
def test_shipped_learned_model_reaches_its_stated_coverage_on_the_test_split(label, card, splits):
    predictor = LearnedPredictor(SHIPPED, label)
    metrics = evaluate(predictor, splits[label].test)
    assert predictor.coverage == card["coverage"] == 0.9
    assert metrics["coverage"] >= predictor.coverage - COVERAGE_TOLERANCE
    assert metrics == pytest.approx(card["metrics"][label][f"learned:{label}"])
    # An upper bound far tighter than the fallback.
    fallback = card["metrics"][label]["max_tokens"]["mean_overestimate_tokens"]
    assert metrics["mean_overestimate_tokens"] < 0.05 * fallback


def test_learned_model_uses_the_configured_class(splits):
    requests = splits["conv"].test[:200]
    conv, code = LearnedPredictor(SHIPPED, "conv"), LearnedPredictor(SHIPPED, "code")
    assert LearnedPredictor(SHIPPED).name == "learned:conv"
    assert np.mean(conv.predict(requests)) > 2 * np.mean(code.predict(requests))


def test_learned_model_load_errors(tmp_path):
    with pytest.raises(LengthModelError, match="cannot load"):
        LearnedPredictor(tmp_path)
    with pytest.raises(LengthModelError, match="knows"):
        LearnedPredictor(SHIPPED, "chat")
    card = json.loads((SHIPPED / "card.json").read_text())
    card["input"]["columns"] = ["prompt_tokens", "class_id"]
    (tmp_path / "card.json").write_text(json.dumps(card))
    (tmp_path / card["file"]).write_bytes((SHIPPED / card["file"]).read_bytes())
    with pytest.raises(LengthModelError, match="inputs"):
        LearnedPredictor(tmp_path)


def test_conformal_inflation_covers_exchangeable_data():
    rng = np.random.default_rng(0)
    predicted = rng.uniform(10, 100, 4000)
    actual = predicted * rng.lognormal(0.0, 0.5, 4000)
    factor = conformal_inflation(actual[:2000], predicted[:2000], 0.9)
    assert np.mean(factor * predicted[2000:] >= actual[2000:]) == pytest.approx(0.9, abs=0.02)
    with pytest.raises(ValueError, match="cannot certify"):
        conformal_inflation(actual[:5], predicted[:5], 0.9)


def test_onnx_export_matches_lightgbm_on_a_retrained_model(tmp_path, splits):
    x, y = training_rows(splits["conv"].train, 0)
    model = fit_quantile_model(x, y, SMALL, seed=0)
    export_onnx(model, tmp_path / "length.onnx", len(LENGTH_FEATURES), "throttllem_length")
    test_x, _ = training_rows(splits["conv"].test, 0)
    assert onnx_parity(model, tmp_path / "length.onnx", test_x) <= PARITY_MAX_REL_ERROR


def test_training_is_reproducible_and_writes_a_loadable_card(tmp_path):
    first = train_length_model(tmp_path / "a", seed=5, cfg=SMALL)
    second = train_length_model(tmp_path / "b", seed=5, cfg=SMALL)
    assert (tmp_path / "a" / "length.onnx").read_bytes() == (tmp_path / "b" / "length.onnx").read_bytes()
    assert {**first, "created": None} == {**second, "created": None}
    assert first["onnx_max_rel_error"] <= PARITY_MAX_REL_ERROR
    assert first["split"]["requests"]["conv"] == {"train": 11620, "calibration": 3873, "test": 3873}
    assert set(first["metrics"]["code"]) == {"oracle", "noisy:15", "noisy:30", "max_tokens", "learned:code"}
    assert json.loads((tmp_path / "a" / "card.json").read_text()) == first
    assert LearnedPredictor(tmp_path / "a", "code").inflation == first["inflation"]["code"]


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ("oracle", "oracle"),
        ("max_tokens", "max_tokens"),
        ("noisy:30", "noisy:30"),
        ("noisy:7.5", "noisy:7.5"),
        ("learned", "learned:conv"),
        ("learned:code", "learned:code"),
    ],
)
def test_parse_length_predictor(spec, name):
    predictor = parse_length_predictor(spec, MODELS, seed=4)
    assert predictor.name == name
    assert parse_length_predictor(predictor.name, MODELS, seed=4).name == name


def test_parsed_noisy_uses_the_run_seed():
    predictor = parse_length_predictor("noisy:30", MODELS, seed=4)
    assert predictor == NoisyPredictor(0.3, seed=4)


@pytest.mark.parametrize("spec", ["", "bogus", "noisy", "noisy:", "oracle:1", "max_tokens:5", "learned:"])
def test_parse_length_predictor_lists_allowed_spellings(spec):
    with pytest.raises(ValueError, match=r"oracle, noisy:<pct> .* learned\[:<class>\] .* max_tokens"):
        parse_length_predictor(spec, MODELS)


@pytest.mark.parametrize("spec", ["noisy:abc", "noisy:-5", "noisy:inf"])
def test_parse_noisy_needs_a_non_negative_percentage(spec):
    with pytest.raises(ValueError, match="<pct> must be a number >= 0"):
        parse_length_predictor(spec, MODELS)


def test_parse_learned_with_an_unknown_class():
    with pytest.raises(LengthModelError, match="unknown workload class 'chat'"):
        parse_length_predictor("learned:chat", MODELS)
