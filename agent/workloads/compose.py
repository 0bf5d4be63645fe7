"""Workloads built from others: bursts, burstier gaps, tenant mixes and superposed copies.

The controller must hold the SLO on workloads it was never tuned on (issue 13 §3), so these
reshape a trace without inventing lengths: every request keeps its prompt and output length.

    burst(T, K)     requests of T in groups of 1..K (sizes drawn uniformly), each group arriving at
                    its first request's time: up to K requests at one timestamp, same count
    gamma(T, CV)    T's requests in order, with gamma inter-arrival gaps of T's mean rate and CV
    mix(T1, T2..)   tenants on one timeline: every Ti's requests, each Ti from its own time 0
    shift(T, S)     T superposed on a copy of itself S seconds later, wrapped into T's period:
                    twice the rate, the same daily shape seen at two phases

Specs nest (`burst(gamma(azure-code,4),9)`); a leaf is anything `--trace` takes on its own: a
shipped trace, a trace file, or `synthetic:...`. Random choices come from the seed given, so a
spec with a seed is one workload.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from agent.workloads.synthetic import SYNTHETIC_SPEC_HELP, synthetic_from_spec
from agent.workloads.traces import load_trace
from agent.workloads.workload import Workload

COMPOSE_SPEC_HELP = "burst(T,K) | gamma(T,CV) | mix(T1,T2,...) | shift(T,S), nested"
_CALL = re.compile(r"^(\w+)\((.*)\)$", re.DOTALL)


class WorkloadSpecError(ValueError):
    """A workload spec that does not parse, or whose numbers are out of range."""


def workload_from_spec(spec: str, *, seed: int, synthetic_duration_s: float) -> Workload:
    """The workload `spec` names: a trace, `synthetic:...`, or a composition of them (COMPOSE_SPEC_HELP)."""
    spec = spec.strip()
    call = _CALL.match(spec)
    if call is None:
        if spec.startswith("synthetic:"):
            return synthetic_from_spec(spec, seed=seed, duration_s=synthetic_duration_s)
        return load_trace(spec)
    name, inner = call.groups()
    if name not in COMPOSERS:
        raise WorkloadSpecError(
            f"unknown workload function {name!r} in {spec!r}: expected {COMPOSE_SPEC_HELP}"
        )
    args = split_arguments(inner, spec)
    compose, arity = COMPOSERS[name]
    if arity is not None and len(args) != arity:
        raise WorkloadSpecError(f"{name}() takes {arity} arguments, got {len(args)} in {spec!r}")

    def resolve(sub: str, position: int) -> Workload:
        return workload_from_spec(sub, seed=seed + position, synthetic_duration_s=synthetic_duration_s)

    return compose(args, np.random.default_rng(seed), resolve)


def split_arguments(inner: str, spec: str) -> list[str]:
    """The top-level comma-separated arguments of a call (commas inside nested calls stay)."""
    args, depth, start = [], 0, 0
    for i, char in enumerate(inner):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise WorkloadSpecError(f"unbalanced parentheses in {spec!r}")
        elif char == "," and depth == 0:
            args.append(inner[start:i].strip())
            start = i + 1
    if depth:
        raise WorkloadSpecError(f"unbalanced parentheses in {spec!r}")
    args.append(inner[start:].strip())
    if any(not arg for arg in args):
        raise WorkloadSpecError(f"an empty argument in {spec!r}")
    return args


Resolve = Callable[[str, int], Workload]  # (sub-spec, its position) -> workload; seeds differ by position


def bursts(workload: Workload, max_size: int, rng: np.random.Generator) -> Workload:
    """Groups of 1..max_size consecutive requests, each arriving at its first request's time."""
    n = len(workload)
    sizes = rng.integers(1, max_size + 1, size=n)  # more than enough groups
    starts = np.cumsum(np.concatenate(([0], sizes)))
    starts = starts[starts < n]
    group_of = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, n)))
    arrival = workload.arrival_s[starts][group_of]
    return Workload(
        f"burst({workload.name},{max_size})",
        arrival,
        workload.prompt_tokens,
        workload.output_tokens,
        workload.duration_s,
    )


def regapped(workload: Workload, cv: float, rng: np.random.Generator) -> Workload:
    """The same requests in order, gaps redrawn from a gamma of the same mean rate and `cv`."""
    n = len(workload)
    mean_gap = workload.duration_s / max(n - 1, 1)
    shape = 1.0 / cv**2
    gaps = rng.gamma(shape, mean_gap / shape, size=max(n - 1, 0))
    arrival = np.concatenate(([0.0], np.cumsum(gaps)))[:n]
    return Workload.from_arrivals(
        f"gamma({workload.name},{cv:g})", arrival, workload.prompt_tokens, workload.output_tokens
    )


def mixed(workloads: Sequence[Workload]) -> Workload:
    """Every workload's requests on one timeline, each from its own time 0; the longest period."""
    arrival = np.concatenate([w.arrival_s for w in workloads])
    order = np.argsort(arrival, kind="stable")
    return Workload(
        f"mix({','.join(w.name for w in workloads)})",
        arrival[order],
        np.concatenate([w.prompt_tokens for w in workloads])[order],
        np.concatenate([w.output_tokens for w in workloads])[order],
        max(w.duration_s for w in workloads),
    )


def shifted(workload: Workload, shift_s: float) -> Workload:
    """`workload` superposed on a copy of itself `shift_s` later, wrapped into its period."""
    if workload.duration_s <= 0:
        raise WorkloadSpecError(f"shift() needs a workload with a period, {workload.name!r} has none")
    wrapped = (workload.arrival_s + shift_s) % workload.duration_s
    order = np.argsort(wrapped, kind="stable")
    copy = Workload(
        workload.name,
        wrapped[order],
        workload.prompt_tokens[order],
        workload.output_tokens[order],
        workload.duration_s,
    )
    return _renamed(mixed([workload, copy]), f"shift({workload.name},{shift_s:g})")


def _renamed(workload: Workload, name: str) -> Workload:
    return Workload(
        name, workload.arrival_s, workload.prompt_tokens, workload.output_tokens, workload.duration_s
    )


def _number(text: str, what: str, spec_name: str, *, integer: bool = False, minimum: float = 0.0) -> float:
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise WorkloadSpecError(f"{spec_name}(): {what} must be {kind}, got {text!r}") from None
    if not value > minimum or not np.isfinite(value):
        raise WorkloadSpecError(f"{spec_name}(): {what} must be > {minimum:g}, got {text!r}")
    return value


def _burst(args: list[str], rng: np.random.Generator, resolve: Resolve) -> Workload:
    return bursts(resolve(args[0], 0), int(_number(args[1], "K", "burst", integer=True)), rng)


def _gamma(args: list[str], rng: np.random.Generator, resolve: Resolve) -> Workload:
    return regapped(resolve(args[0], 0), _number(args[1], "CV", "gamma"), rng)


def _mix(args: list[str], rng: np.random.Generator, resolve: Resolve) -> Workload:
    if len(args) < 2:
        raise WorkloadSpecError("mix() takes two workloads or more")
    return mixed([resolve(arg, k) for k, arg in enumerate(args)])


def _shift(args: list[str], rng: np.random.Generator, resolve: Resolve) -> Workload:
    return shifted(resolve(args[0], 0), _number(args[1], "S", "shift"))


COMPOSERS: dict[str, tuple[Callable[[list[str], np.random.Generator, Resolve], Workload], int | None]] = {
    "burst": (_burst, 2),
    "gamma": (_gamma, 2),
    "mix": (_mix, None),
    "shift": (_shift, 2),
}
WORKLOAD_SPEC_HELP = (
    "azure-conv | azure-code | path to an Azure or BurstGPT CSV | "
    f"{SYNTHETIC_SPEC_HELP} | {COMPOSE_SPEC_HELP}"
)
