"""Per-request energy: conservation, proportionality and finality, against an independent replay."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.sidecar.request_energy import (
    MAX_LABEL_CHARS,
    OVERFLOW_LABEL,
    LabelCap,
    RequestEnergyLedger,
    label_value,
)

REQUESTS = [f"{i:032x}" for i in range(5)]

step = st.one_of(
    st.tuples(st.just("tokens"), st.sampled_from(REQUESTS), st.integers(1, 500)),
    st.tuples(st.just("finish"), st.sampled_from(REQUESTS)),
    # A reading's increase; 0.0: the meter has not updated; None: the read failed.
    st.tuples(st.just("tick"), st.one_of(st.none(), st.just(0.0), st.floats(1e-3, 1e4))),
)


def with_readings(steps: list[tuple], first_reading_j: float) -> list[tuple]:
    """The steps with each tick's increase turned into the meter's reading (None stays None)."""
    reading, resolved = first_reading_j, []
    for kind, *args in steps:
        if kind == "tick" and args[0] is not None:
            reading += args[0]
            args = [reading]
        resolved.append((kind, *args))
    return resolved


def replay(steps: list[tuple]) -> tuple[dict[str, float], dict[str, bool], float, float]:
    """The rule written out window by window: each window's energy over its tokens; idle otherwise.

    Returns each request's energy and finality, the idle energy and the metered energy.
    """
    energy: dict[str, float] = defaultdict(float)
    final: dict[str, bool] = dict.fromkeys(REQUESTS, False)
    finished: set[str] = set()
    window: dict[str, int] = defaultdict(int)
    readings: list[float] = []  # those that closed a window
    idle = 0.0
    for kind, *args in steps:
        if kind == "tokens" and args[0] not in finished:
            window[args[0]] += args[1]
        elif kind == "finish":
            finished.add(args[0])
        elif kind == "tick" and args[0] is not None:
            if not readings:  # the first reading: what came before it is not metered
                window.clear()
            elif args[0] > readings[-1]:
                window_j = args[0] - readings[-1]
                tokens = sum(window.values())
                if tokens == 0:
                    idle += window_j
                for request, count in window.items():
                    energy[request] += window_j * count / tokens
                window.clear()
            else:
                continue  # not updated: the window stays open
            readings.append(args[0])
            for request in finished:
                final[request] = True
    metered = readings[-1] - readings[0] if readings else 0.0
    return dict(energy), final, idle, metered


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(step, max_size=60), first_reading_j=st.floats(0.0, 1e6))
def test_energy_is_conserved_non_negative_and_proportional_to_tokens(steps, first_reading_j):
    steps = with_readings(steps, first_reading_j)
    ledger = RequestEnergyLedger(settle_within_s=1e9)  # no request waits long enough to be settled early
    for request in REQUESTS:
        ledger.open(request, "m", "t")
    for now_s, (kind, *args) in enumerate(steps):
        if kind == "tokens":
            ledger.add_tokens(*args)
        elif kind == "finish":
            ledger.finish(args[0], float(now_s))
        else:
            ledger.tick(args[0], float(now_s))

    expected, final, idle, metered = replay(steps)
    known = {request: ledger.lookup(request) for request in REQUESTS}
    assert all(energy is not None and energy.energy_j >= 0.0 for energy in known.values())
    for request, energy in known.items():
        assert energy is not None
        assert math.isclose(energy.energy_j, expected.get(request, 0.0), rel_tol=1e-9, abs_tol=1e-9)
        assert energy.final is final[request]
    assert math.isclose(ledger.idle_j, idle, rel_tol=1e-9, abs_tol=1e-9)
    # Summed window by window vs last minus first reading: float rounding of readings up to ~1e6 J.
    assert math.isclose(ledger.metered_j, metered, rel_tol=1e-9, abs_tol=1e-6)
    charged = sum(energy.energy_j for energy in known.values() if energy is not None)
    assert math.isclose(charged, ledger.attributed_j, rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(charged + ledger.idle_j, ledger.metered_j, rel_tol=1e-9, abs_tol=1e-6)


def test_energy_is_final_at_the_first_reading_that_advances_after_the_request_finished():
    ledger = RequestEnergyLedger()
    ledger.tick(500.0, 0.0)
    ledger.open("a", "llama", "acme")
    ledger.add_tokens("a", 30)
    assert ledger.tick(560.0, 1.0) == []  # still running: 60 J charged, not final
    ledger.finish("a", 1.5)
    ledger.add_tokens("a", 99)  # after it finished: nothing
    assert ledger.tick(None, 2.0) == [] and ledger.tick(560.0, 3.0) == []  # failed, then not updated
    running = ledger.lookup("a")
    assert running is not None and (running.energy_j, running.tokens, running.final) == (60.0, 30, False)
    (settled,) = ledger.tick(600.0, 4.0)  # a window without tokens: idle, and "a" is final
    assert (settled.request_id, settled.energy_j, settled.tokens, settled.final) == ("a", 60.0, 30, True)
    assert (settled.model, settled.tenant) == ("llama", "acme")
    assert ledger.lookup("a") == settled and (ledger.idle_j, ledger.attributed_j) == (40.0, 60.0)


def test_a_meter_that_stops_updating_settles_finished_requests_after_settle_within_s():
    ledger = RequestEnergyLedger(settle_within_s=10.0)
    ledger.tick(0.0, 0.0)
    for request in ("a", "b"):
        ledger.open(request)
        ledger.add_tokens(request, 10)
    ledger.finish("a", 1.0)
    assert ledger.tick(0.0, 10.9) == []
    (settled,) = ledger.tick(None, 11.0)  # waited 10 s: final with what it has (nothing)
    assert (settled.request_id, settled.energy_j, settled.final) == ("a", 0.0, True)
    ledger.tick(50.0, 12.0)  # its tokens left the window: all 50 J go to "b"
    b = ledger.lookup("b")
    assert b is not None and b.energy_j == 50.0 and ledger.attributed_j == 50.0


def test_memory_is_bounded_by_max_finished():
    ledger = RequestEnergyLedger(max_finished=3, settle_within_s=1e9)
    ledger.tick(0.0, 0.0)
    for i in range(5):
        ledger.open(str(i))
        ledger.add_tokens(str(i), 1)
        ledger.finish(str(i), float(i))
    # The meter is stuck: the two oldest beyond the bound are settled with what they have.
    assert [energy.request_id for energy in ledger.tick(0.0, 5.0)] == ["0", "1"]
    assert len(ledger.tick(10.0, 6.0)) == 3
    assert ledger.lookup("0") is None and ledger.lookup("1") is None  # the LRU keeps 3
    assert ledger.lookup("2") is not None  # looking up keeps an entry: "3" is now the oldest
    ledger.open("5")
    ledger.finish("5", 7.0)
    ledger.tick(11.0, 8.0)
    assert ledger.lookup("3") is None and all(ledger.lookup(r) is not None for r in ("2", "4", "5"))


def test_a_meter_restart_charges_nobody_for_the_unknown_window():
    ledger = RequestEnergyLedger()
    ledger.open("a")
    ledger.add_tokens("a", 5)  # before the first reading: never charged
    ledger.tick(100.0, 0.0)
    ledger.add_tokens("a", 5)
    ledger.tick(20.0, 1.0)  # lower than before: the meter restarted; this window is unknown
    ledger.add_tokens("a", 5)
    ledger.tick(30.0, 2.0)
    a = ledger.lookup("a")
    assert a is not None and (a.energy_j, a.tokens) == (10.0, 15)
    assert ledger.metered_j == 10.0 and ledger.idle_j == 0.0


def test_unknown_requests_are_ignored_and_not_found():
    ledger = RequestEnergyLedger()
    ledger.add_tokens("ghost", 10)
    ledger.finish("ghost", 0.0)
    assert ledger.lookup("ghost") is None and ledger.tick(1.0, 0.0) == []


def test_label_values_are_cut_and_capped():
    assert label_value(None) == "" and label_value("x" * 1000) == "x" * MAX_LABEL_CHARS
    cap = LabelCap(2)
    assert [cap.label(v) for v in ("a", "b", "c", "a", "d", "b")] == [
        "a",
        "b",
        OVERFLOW_LABEL,
        "a",
        "other",
        "b",
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"max_finished": 0}, "max_finished"), ({"settle_within_s": 0}, "settle")]
)
def test_bad_bounds_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RequestEnergyLedger(**kwargs)
