"""SLO presets: per-model latency targets read from `policies/*.toml`, and SLO attainment.

A preset file names its source, the share of requests that must meet the targets (`percentile`),
how a request's end-to-end deadline follows (`e2e`), and per model a TPOT target and, when TTFT is
a target, a TTFT target. `e2e` is one of:

- ``ttft+tpot``: deadline = arrival + ttft_s + tpot_s × (output_tokens − 1), i.e. meeting both
  TTFT and TPOT (the MLPerf presets);
- ``max-p99-saturated``: one deadline for every request, the p99 E2E of the `max` policy under
  saturating load on the same engine (the paper). It has to be measured, so such a preset loads
  unresolved (`slo` is None) until `resolve_e2e` is given the measurement;
- ``none``: no E2E target.

File reading stays in `load_slo_preset`; everything else is pure.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from agent.control.slo import SloTargets
from agent.domain import Slo
from agent.shipped import SHIPPED_POLICIES_DIR

E2eRule = Literal["ttft+tpot", "max-p99-saturated", "none"]
E2E_RULES: tuple[E2eRule, ...] = ("ttft+tpot", "max-p99-saturated", "none")
_TOP_KEYS = frozenset({"name", "source", "percentile", "e2e", "models"})
_MODEL_KEYS = frozenset({"ttft_s", "tpot_s", "basis"})


class SloPresetError(ValueError):
    """A preset that cannot be found, parsed or applied; the message says what is allowed."""


@dataclass(frozen=True, slots=True)
class SloPreset:
    """One model's targets from one preset file."""

    name: str
    model: str
    slo: Slo | None  # None until the E2E target is resolved (rule "max-p99-saturated")
    ttft_s: float | None  # None: TTFT is not a target
    tpot_s: float  # mean time between tokens of a request (MLPerf TPOT, the paper's mean TBT)
    e2e_rule: E2eRule
    percentile: float  # share of requests (in %) that must meet every target
    source: str  # where the numbers come from, including the per-model basis


def load_slo_preset(name_or_path: str, model: str, *, policies_dir: Path = SHIPPED_POLICIES_DIR) -> SloPreset:
    """Read a preset by name (a file in `policies_dir`) or by path, for one catalog model."""
    path = _preset_path(name_or_path, policies_dir)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SloPresetError(f"{path}: malformed TOML: {exc}") from None
    return _parse(data, model, path)


def _preset_path(name_or_path: str, policies_dir: Path) -> Path:
    given = Path(name_or_path)
    if given.suffix == ".toml" or len(given.parts) > 1:
        if not given.is_file():
            raise SloPresetError(f"SLO preset file {given} does not exist")
        return given
    path = policies_dir / f"{name_or_path}.toml"
    if path.is_file():
        return path
    known = sorted(p.stem for p in policies_dir.glob("*.toml"))
    raise SloPresetError(
        f"unknown SLO preset {name_or_path!r}; known in {policies_dir.resolve()}: "
        f"{', '.join(known) if known else 'none'} (or give a path to a .toml file)"
    )


def _number(table: dict[str, Any], key: str, where: str) -> float | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SloPresetError(f"{where}: {key} must be a number, got {value!r}")
    return float(value)


def _text(table: dict[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise SloPresetError(f"{where}: {key} must be a non-empty string, got {value!r}")
    return value


def _parse(data: dict[str, Any], model: str, path: Path) -> SloPreset:
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise SloPresetError(f"{path}: unknown keys {unknown}; allowed: {sorted(_TOP_KEYS)}")
    name, source = _text(data, "name", str(path)), _text(data, "source", str(path))
    percentile = _number(data, "percentile", str(path))
    if percentile is None or not 0 < percentile <= 100:
        raise SloPresetError(f"{path}: percentile must be in (0, 100], got {data.get('percentile')!r}")
    rule = data.get("e2e")
    if rule not in E2E_RULES:
        raise SloPresetError(f"{path}: e2e must be one of {', '.join(E2E_RULES)}, got {rule!r}")
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise SloPresetError(f"{path}: needs a [models.<name>] table per model")
    if model not in models:
        raise SloPresetError(
            f"SLO preset {name!r} ({path}) has no targets for model {model!r}; "
            f"models: {', '.join(sorted(models))}"
        )
    entry, where = models[model], f"{path} [models.{model}]"
    if not isinstance(entry, dict):
        raise SloPresetError(f"{where}: must be a table")
    unknown = sorted(set(entry) - _MODEL_KEYS)
    if unknown:
        raise SloPresetError(f"{where}: unknown keys {unknown}; allowed: {sorted(_MODEL_KEYS)}")
    ttft, tpot = _number(entry, "ttft_s", where), _number(entry, "tpot_s", where)
    if tpot is None or tpot <= 0:
        raise SloPresetError(f"{where}: tpot_s must be a positive number of seconds")
    if ttft is not None and ttft <= 0:
        raise SloPresetError(f"{where}: ttft_s must be a positive number of seconds")
    if rule == "ttft+tpot" and ttft is None:
        raise SloPresetError(f"{where}: e2e = 'ttft+tpot' needs a ttft_s")
    basis = _text(entry, "basis", where) if "basis" in entry else None
    rule = cast(E2eRule, rule)
    return SloPreset(
        name=name,
        model=model,
        slo=None if rule == "max-p99-saturated" else Slo(ttft_s=ttft, tbt_s=tpot, e2e_s=None),
        ttft_s=ttft,
        tpot_s=tpot,
        e2e_rule=rule,
        percentile=percentile,
        source=f"{source}; {model}: {basis}" if basis else source,
    )


def resolve_e2e(preset: SloPreset, p99_e2e_s: float) -> Slo:
    """The preset's SLO with its E2E target set to the measured p99 E2E of `max` at saturation."""
    if preset.e2e_rule != "max-p99-saturated":
        raise SloPresetError(
            f"SLO preset {preset.name!r} has e2e = {preset.e2e_rule!r}: its E2E needs no measurement"
        )
    if not math.isfinite(p99_e2e_s) or p99_e2e_s <= 0:
        raise SloPresetError(f"the measured p99 E2E must be a positive number of seconds, got {p99_e2e_s!r}")
    return Slo(ttft_s=preset.ttft_s, tbt_s=preset.tpot_s, e2e_s=float(p99_e2e_s))


def control_targets(preset: SloPreset, resolved: Slo | None = None) -> SloTargets:
    """What the controller holds requests to: the preset's TTFT/TPOT and, once known, its E2E."""
    slo = resolved or preset.slo
    return SloTargets(tpot_s=preset.tpot_s, ttft_s=preset.ttft_s, e2e_s=slo.e2e_s if slo else None)


def _slo_of(target: SloPreset | Slo) -> Slo:
    if isinstance(target, Slo):
        return target
    if target.slo is None:
        raise SloPresetError(
            f"SLO preset {target.name!r} has an unresolved E2E target ({target.e2e_rule}); "
            "pass the Slo that resolve_e2e() returns"
        )
    return target.slo


def e2e_budget_s(target: SloPreset | Slo, output_tokens: np.ndarray) -> np.ndarray:
    """Seconds from arrival each request may take end to end (inf: no E2E target).

    A request's deadline is its arrival plus this; the decision core and attainment share it.
    """
    tokens = np.asarray(output_tokens, dtype=float)
    if isinstance(target, SloPreset) and target.e2e_rule == "ttft+tpot" and target.ttft_s is not None:
        return target.ttft_s + target.tpot_s * np.maximum(tokens - 1.0, 0.0)
    e2e = _slo_of(target).e2e_s
    return np.full(tokens.shape, math.inf if e2e is None else e2e)


def meets_slo(
    target: SloPreset | Slo,
    ttft_s: np.ndarray,
    tpot_s: np.ndarray,
    e2e_s: np.ndarray,
    output_tokens: np.ndarray,
) -> np.ndarray:
    """Per request, whether it met every target that applies to it.

    TPOT does not apply to 1-token outputs (it is undefined there). Otherwise NaN means not
    measured (the request never got its first token or never finished) and counts as a violation,
    also for a TTFT that is not a target.
    """
    ttft, tpot, e2e = (np.asarray(a, dtype=float) for a in (ttft_s, tpot_s, e2e_s))
    tokens = np.asarray(output_tokens, dtype=float)
    if ttft.ndim != 1 or not ttft.shape == tpot.shape == e2e.shape == tokens.shape:
        raise ValueError(
            "ttft_s, tpot_s, e2e_s and output_tokens must be 1-D arrays of one length, got shapes "
            f"{ttft.shape}, {tpot.shape}, {e2e.shape}, {tokens.shape}"
        )
    if np.any(tokens < 1) or np.any(np.isnan(tokens)):
        raise ValueError("output_tokens must be at least 1 for every request")
    slo = _slo_of(target)
    ok = ~np.isnan(ttft) if slo.ttft_s is None else ttft <= slo.ttft_s
    ok &= (tokens == 1) | (tpot <= slo.tbt_s)
    ok &= e2e <= e2e_budget_s(target, tokens)
    return ok


def attainment(
    target: SloPreset | Slo,
    ttft_s: np.ndarray,
    tpot_s: np.ndarray,
    e2e_s: np.ndarray,
    output_tokens: np.ndarray,
) -> float:
    """Share (0..1) of requests meeting every applicable target; NaN when there are no requests."""
    ok = meets_slo(target, ttft_s, tpot_s, e2e_s, output_tokens)
    return float(ok.mean()) if ok.size else math.nan
