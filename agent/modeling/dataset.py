"""Profiling datasets: one CSV row per engine iteration, plus a JSON sidecar describing the setup.

The CSV is what the IPS model trains on; the sidecar (`<file>.json`) says where the rows came
from (GPU, model, TP, engine limits, target, noise, seeds) so a model card can cite them and a
resumed sweep can refuse to mix rows from a different setup.

Rows are appended one sweep point at a time and flushed, so a killed sweep loses at most one
point. A CSV cannot tell whether its last point was cut short, so a resumed sweep drops that
point's rows and runs it again; points are deterministic, so the file ends up the same.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from agent.domain import IPS_FEATURES

COLUMNS = (
    "point",
    "tp",
    "batch",
    "kv_blocks",
    "tokens_per_block",
    "prefill_tokens",
    "clock_mhz",
    "iteration_ms",
    "ips",
)
TPB = COLUMNS.index("tokens_per_block")
FLOAT_COLUMNS = frozenset({"iteration_ms", "ips"})
HEADER = ",".join(COLUMNS)
UNCOMPARED_META = frozenset({"created"})  # sidecar keys that may differ when a sweep resumes
IPS_CONSISTENCY = 1e-9  # relative: ips must be 1000 / iteration_ms up to float formatting


class DatasetError(ValueError):
    """A dataset file that cannot be read or does not belong with the others."""


class DatasetMismatchError(DatasetError):
    """An existing dataset whose sidecar describes a different setup than the one asked for."""


@dataclass(frozen=True, slots=True)
class Row:
    """One engine iteration as the IPS model sees it."""

    point: int  # index of the sweep point that produced it
    tp: int
    batch: int  # requests in the iteration's batch (decoding + context)
    kv_blocks: int  # KV blocks in use after the iteration (TRT-LLM usedNumBlocks)
    tokens_per_block: int
    prefill_tokens: int  # context tokens processed in the iteration
    clock_mhz: int  # locked SM clock
    iteration_ms: float

    def __post_init__(self) -> None:
        if not (self.iteration_ms > 0 and math.isfinite(self.iteration_ms)):
            raise ValueError(f"iteration_ms must be positive and finite, got {self.iteration_ms}")
        if min(self.point, self.kv_blocks, self.prefill_tokens) < 0 or min(self.tp, self.batch) < 1:
            raise ValueError(f"row out of range: {self}")

    @property
    def ips(self) -> float:
        """Iterations per second: the IPS model's target."""
        return 1000.0 / self.iteration_ms

    def csv_line(self) -> str:
        """The row in COLUMNS order; floats as repr so they read back bit for bit."""
        return (
            f"{self.point},{self.tp},{self.batch},{self.kv_blocks},{self.tokens_per_block},"
            f"{self.prefill_tokens},{self.clock_mhz},{self.iteration_ms!r},{self.ips!r}\n"
        )


def _sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _parse_line(line: str, where: str) -> tuple[int | float, ...]:
    """One CSV data line as numbers in COLUMNS order, or an error naming `where` (file:line)."""
    texts = line.split(",")
    if len(texts) != len(COLUMNS):
        raise DatasetError(f"{where}: expected {len(COLUMNS)} fields, got {len(texts)}: {line!r}")
    values: list[int | float] = []
    for name, text in zip(COLUMNS, texts, strict=True):
        try:
            values.append(float(text) if name in FLOAT_COLUMNS else int(text))
        except ValueError:
            raise DatasetError(f"{where}: {name} is not a number: {text!r}") from None
    *numbers, ips = values
    try:
        row = Row(*numbers)
    except ValueError as exc:
        raise DatasetError(f"{where}: {exc}") from None
    if abs(ips - row.ips) > IPS_CONSISTENCY * row.ips:
        raise DatasetError(f"{where}: ips {ips} is not 1000 / iteration_ms {row.iteration_ms}")
    return tuple(values)


def _read_lines(path: Path) -> list[str]:
    """Data lines of a dataset CSV after checking its header; the last is "" unless the file was cut."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise DatasetError(f"cannot read dataset {path}: {exc}") from exc
    header, newline, body = text.partition("\n")
    if header != HEADER or not newline:
        raise DatasetError(f"{path}:1: header must be the line {HEADER!r}, got {header!r}")
    return body.split("\n")


def read_meta(path: Path | str) -> dict[str, Any]:
    """The sidecar of dataset `path`."""
    sidecar = _sidecar_path(Path(path))
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read the sidecar {sidecar}: {exc}") from exc
    if not isinstance(meta, dict) or tuple(meta.get("columns", ())) != COLUMNS:
        raise DatasetError(f"{sidecar}: not a throttllem profile sidecar with columns {list(COLUMNS)}")
    return meta


def mismatched_keys(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """Keys of `wanted` whose value differs in `existing` (ignoring UNCOMPARED_META)."""
    return sorted(k for k in wanted if k not in UNCOMPARED_META and existing.get(k) != wanted.get(k))


def describe_mismatch(path: Path, existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
    """An error message naming each differing sidecar key with both values."""
    diffs = "; ".join(
        f"{k}: file has {existing.get(k)!r}, asked for {wanted.get(k)!r}"
        for k in mismatched_keys(existing, wanted)
    )
    return f"{path} was written by a different setup ({diffs}); use another file or the same setup"


class DatasetWriter:
    """Appends a sweep's rows point by point; opening an existing dataset resumes it.

    `meta` describes the setup (the caller's keys); the writer adds `columns`, `throttllem`
    (version) and `created`. An existing file must have been written with the same description.
    Opening never changes an existing file: its last point is left out of `completed_points`
    and its rows are cut only when the first new point is written.
    """

    def __init__(self, path: Path | str, meta: Mapping[str, Any]) -> None:
        self.path = Path(path)
        wanted = {**meta, "columns": list(COLUMNS), "throttllem": version("throttllem")}
        sidecar = _sidecar_path(self.path)
        self._keep_bytes: int | None = None  # where to cut the file before the first new point
        if self.path.exists():
            if not sidecar.exists():
                raise DatasetError(f"{self.path} exists without its sidecar {sidecar.name}; cannot resume it")
            existing = read_meta(self.path)
            if mismatched_keys(existing, wanted):
                raise DatasetMismatchError(describe_mismatch(self.path, existing, wanted))
            self.meta = existing
            self._scan()
        else:
            self.meta = {
                **wanted,
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            }
            self.path.parent.mkdir(parents=True, exist_ok=True)
            sidecar.write_text(json.dumps(self.meta, indent=2) + "\n")
            self.path.write_text(HEADER + "\n")
            self.completed_points, self.rows = frozenset(), 0
        self._file: TextIO | None = None

    def _scan(self) -> None:
        """Find the complete points, leaving out the last one (a kill may have cut it short)."""
        lines = _read_lines(self.path)[:-1]  # the text after the last newline is "" or a torn line
        points = [int(_parse_line(line, f"{self.path}:{n}")[0]) for n, line in enumerate(lines, start=2)]
        keep = len(points)
        while keep and points[keep - 1] == points[-1]:
            keep -= 1
        self.completed_points, self.rows = frozenset(points[:keep]), keep
        self._keep_bytes = sum(len(line.encode()) + 1 for line in [HEADER, *lines[:keep]])

    def write_point(self, rows: Sequence[Row]) -> None:
        """Append all rows of one new point and flush them."""
        points = {row.point for row in rows}
        if len(points) != 1:
            raise ValueError(f"a point's rows must share one point index, got {sorted(points)}")
        (point,) = points
        if point in self.completed_points:
            raise ValueError(f"point {point} is already in {self.path}")
        if self._file is None:
            if self._keep_bytes is not None:
                os.truncate(self.path, self._keep_bytes)
            self._file = self.path.open("a")
        self._file.write("".join(row.csv_line() for row in rows))
        self._file.flush()
        self.completed_points |= {point}
        self.rows += len(rows)

    def close(self) -> None:
        """Close the file; the rows already written stay."""
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class Dataset:
    """Rows of one or more dataset files as numpy columns, with each file's sidecar."""

    columns: dict[str, np.ndarray]  # COLUMNS -> int64 or float64 array
    meta: tuple[dict[str, Any], ...]  # one sidecar per file, in the order given
    files: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.columns["ips"])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def features(self) -> np.ndarray:
        """The IPS model's inputs, (rows, len(IPS_FEATURES)) in IPS_FEATURES order."""
        return np.column_stack([self.columns[name] for name in IPS_FEATURES]).astype(np.float64)


def read_dataset(paths: Path | str | Sequence[Path | str]) -> Dataset:
    """Read and concatenate dataset files; they must share tokens_per_block (TP may differ)."""
    files = (Path(paths),) if isinstance(paths, str | Path) else tuple(Path(p) for p in paths)
    if not files:
        raise DatasetError("no dataset files given")
    metas, values = [], []
    for path in files:
        meta = read_meta(path)
        tpb = meta.get("engine", {}).get("tokens_per_block")
        first_tpb = metas[0]["engine"]["tokens_per_block"] if metas else tpb
        if tpb != first_tpb:
            raise DatasetError(
                f"{path} has tokens_per_block {tpb}, {files[0]} has {first_tpb}; "
                "KV blocks of different sizes cannot share a model"
            )
        lines = _read_lines(path)
        if lines[-1]:
            raise DatasetError(f"{path}:{len(lines) + 1}: last line is not terminated (file cut short?)")
        for n, line in enumerate(lines[:-1], start=2):
            row = _parse_line(line, f"{path}:{n}")
            if row[TPB] != tpb:
                raise DatasetError(
                    f"{path}:{n}: tokens_per_block {row[TPB]} differs from the sidecar's {tpb}"
                )
            values.append(row)
        metas.append(meta)
    table = np.array(values, dtype=np.float64).reshape(len(values), len(COLUMNS))
    columns = {
        name: table[:, i] if name in FLOAT_COLUMNS else table[:, i].astype(np.int64)
        for i, name in enumerate(COLUMNS)
    }
    return Dataset(columns, tuple(metas), files)


def file_sha256(path: Path | str) -> str:
    """Hex sha256 of a file's bytes, so a model card pins exactly the data it was trained on."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
