"""Reading Prometheus text exposition: pure functions over what `prometheus_client` parses.

Samples are indexed by *sample* name (`vllm:prompt_tokens_total`, `..._count`), not family name:
the parser renames counter families (it strips `_total`) and a family without a TYPE line
becomes an untyped one named after its sample, so sample names are what stays stable across
exporters (prometheus-cpp in Triton, prometheus_client in vLLM).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from agent.engines.base import MAX_COUNT, EngineConfigError, MalformedMetricsError

Samples = Mapping[str, list[Sample]]  # sample name -> its samples, in exposition order


def only_families(text: str, prefix: str) -> str:
    """The lines of `text` about metrics whose names start with `prefix` (HELP/TYPE included).

    Triton's page carries dozens of per-model histograms the adapter never reads; dropping them
    before the (pure Python) parser runs was a third of the sidecar's CPU at a 100 ms poll.
    """
    kept = []
    for line in text.splitlines():
        name = (
            line.split(" ", 3)[2]
            if line.startswith(("# HELP ", "# TYPE ")) and line.count(" ") >= 2
            else line
        )
        if name.startswith(prefix):
            kept.append(line)
    return "\n".join(kept) + "\n" if kept else ""


def samples_by_name(text: str) -> dict[str, list[Sample]]:
    """Every sample in `text`, by sample name; the parser's ValueError (or IndexError) if it is not text."""
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def parse_samples(text: str) -> dict[str, list[Sample]]:
    """Every sample in `text`, by sample name; `MalformedMetricsError` if it is not exposition text."""
    try:
        return samples_by_name(text)
    # The parser signals bad input with ValueError; IndexError covers its unguarded slicing.
    except (ValueError, IndexError) as exc:
        excerpt = text[:80].replace("\n", "\\n")
        raise MalformedMetricsError(
            f"not Prometheus text exposition ({exc or type(exc).__name__}; starts {excerpt!r}); check the"
            " URL points at the engine's metrics endpoint"
        ) from exc


def label_choices(samples: Samples, names: Iterable[str], keys: tuple[str, ...]) -> set[tuple[str, ...]]:
    """Distinct values of the label `keys` over the named samples (samples lacking a key are skipped)."""
    choices: set[tuple[str, ...]] = set()
    for name in names:
        for sample in samples.get(name, ()):
            if all(key in sample.labels for key in keys):
                choices.add(tuple(sample.labels[key] for key in keys))
    return choices


def select(
    choices: set[tuple[str, ...]], wanted: tuple[str | None, ...], keys: tuple[str, ...], source: str
) -> tuple[str, ...]:
    """The one label combination to read: the only one matching `wanted` (None matches anything).

    `EngineConfigError` lists what is present when nothing or more than one combination matches.
    """
    matching = sorted(c for c in choices if all(w is None or w == v for w, v in zip(wanted, c, strict=True)))
    if len(matching) == 1:
        return matching[0]

    def show(combos: Iterable[tuple[str | None, ...]]) -> str:
        return "; ".join(", ".join(f"{k}={v!r}" for k, v in zip(keys, c, strict=True)) for c in combos)

    present = show(sorted(choices)) or "none"
    if not matching:
        raise EngineConfigError(f"{source}: no series with {show([wanted])}; present: {present}")
    raise EngineConfigError(
        f"{source}: {len(matching)} series match {show([wanted])}: {show(matching)}; set "
        f"{' and '.join(keys)} to choose one"
    )


def values_by_label(samples: Samples, name: str, label: str, match: Mapping[str, str]) -> dict[str, float]:
    """{value of `label`: sample value} over samples called `name` whose labels include `match`."""
    return {
        s.labels[label]: float(s.value)
        for s in samples.get(name, ())
        if label in s.labels and all(s.labels.get(k) == v for k, v in match.items())
    }


def value(samples: Samples, name: str, match: Mapping[str, str]) -> float | None:
    """The value of the first sample called `name` whose labels include `match`; None if none is."""
    for s in samples.get(name, ()):
        if all(s.labels.get(k) == v for k, v in match.items()):
            return float(s.value)
    return None


def count(raw: float, series: str, limit: int = MAX_COUNT) -> int:
    """A gauge or counter that holds a count, as an int; `MalformedMetricsError` if it cannot be one.

    `limit`: the most it may plausibly hold (`agent.engines.base`: `MAX_COUNT` for what one
    iteration or cache holds, `MAX_COUNTER` for what accumulates).
    """
    if not math.isfinite(raw) or not 0 <= raw <= limit:
        raise MalformedMetricsError(f"{series} is {raw:g}, not a count (0..{limit})")
    return round(raw)
