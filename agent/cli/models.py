"""`profile`, `train` and `train-lengths`: build the performance and length models."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from agent.cli.common import (
    add_setup_args,
    print_figures,
    print_json,
    progress_bar,
    setup_from_args,
)
from agent.config import Settings
from agent.modeling.dataset import DatasetWriter, file_sha256, read_dataset
from agent.modeling.profile import (
    DEFAULT_MIN_CLOCK_MHZ,
    SweepConfig,
    SweepProgress,
    TwinProfileTarget,
    run_sweep,
    sweep_meta,
)

PROFILE_NOISE = 0.02  # iteration-time jitter of the twin while profiling: models must face noise


def cmd_profile(args: argparse.Namespace) -> int:
    """Sweep batch sizes, KV occupancies and clocks; append one row per iteration to --out."""
    target = TwinProfileTarget(setup_from_args(args))
    config = SweepConfig(
        seed=args.seed,
        min_clock_mhz=args.min_clock,
        clocks_mhz=tuple(int(c) for c in args.clocks.split(",")) if args.clocks else None,
    )
    with (
        DatasetWriter(args.out, sweep_meta(target, config)) as writer,
        progress_bar(f"profile {args.gpu}/{args.model}/tp{args.tp}", not args.json) as progress,
    ):

        def report(state: SweepProgress) -> None:
            progress(min(state.rows / args.samples, 1.0))

        state = run_sweep(target, writer, config, rows=args.samples, progress=report)
    figures = {"out": str(args.out), "points": state.points, "rows": state.rows, "new_rows": state.new_rows}
    print_json(figures) if args.json else print_figures("profile", figures)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train an IPS model on profile datasets and export it with its card."""
    from agent.modeling.train import TrainConfig, train_ips_model  # lightgbm: slow to import

    dataset = read_dataset(args.data)
    data: list[dict[str, Any]] = [
        {"file": path.name, "sha256": file_sha256(path), "setup": meta}
        for path, meta in zip(dataset.files, dataset.meta, strict=True)
    ]
    card = train_ips_model(
        dataset.features(), dataset["ips"], Path(args.out), data, TrainConfig(seed=args.seed)
    )
    figures = {"out": str(args.out), "rows": card["rows"], "trees": card["model"]["trees"]}
    for split, metrics in card["metrics"].items():
        if isinstance(metrics, dict) and "r2" in metrics:
            figures |= {f"{split}.{key}": value for key, value in metrics.items()}
    figures["monotone_constraints"] = card["metrics"]["monotone_constraints_held_out"]["kept"]
    figures["onnx_max_rel_error"] = card["metrics"]["onnx_max_rel_error"]
    print_json(figures) if args.json else print_figures("IPS model", figures)
    return 0


def cmd_train_lengths(args: argparse.Namespace) -> int:
    """Train the learned generation-length predictor on the shipped Azure traces."""
    from agent.modeling.lengths import train_length_model  # lightgbm: slow to import

    card = train_length_model(args.out, seed=args.seed)
    figures = {
        f"{cls}.{name}.{key}": value
        for cls, predictors in card["metrics"].items()
        for name, metrics in predictors.items()
        for key, value in metrics.items()
        if key in ("coverage", "mae_tokens", "mean_overestimate_tokens")
    }
    print_json(card) if args.json else print_figures("length predictors (held-out test split)", figures)
    return 0


def register(sub: argparse._SubParsersAction, settings: Settings) -> None:
    """Add `profile`, `train` and `train-lengths`."""
    profile = sub.add_parser("profile", help="profile iterations per second on a target (the twin here)")
    profile.add_argument(
        "--target",
        choices=("twin",),
        default="twin",
        help="what to profile; a live GPU target arrives with the sidecar",
    )
    add_setup_args(profile)
    profile.set_defaults(noise=PROFILE_NOISE)
    profile.add_argument("--samples", type=int, default=20_000, help="rows (iterations) to collect")
    profile.add_argument("--out", type=Path, required=True, help="dataset CSV (resumed if it exists)")
    profile.add_argument("--min-clock", type=int, default=DEFAULT_MIN_CLOCK_MHZ, help="lowest clock to sweep")
    profile.add_argument("--clocks", default=None, help="comma-separated clocks to sweep instead of all")
    profile.add_argument("--json", action="store_true")
    profile.set_defaults(func=cmd_profile)

    train = sub.add_parser("train", help="train and export an IPS model from profile datasets")
    train.add_argument("--data", type=Path, action="append", required=True, help="dataset CSV (repeatable)")
    train.add_argument(
        "--out", type=Path, required=True, help="model directory, e.g. models/<gpu>/<model>-tp1"
    )
    train.add_argument("--seed", type=int, default=settings.seed)
    train.add_argument("--json", action="store_true")
    train.set_defaults(func=cmd_train)

    lengths = sub.add_parser("train-lengths", help="train the learned generation-length predictor")
    lengths.add_argument("--out", type=Path, default=settings.models_dir / "lengths" / "azure")
    lengths.add_argument("--seed", type=int, default=settings.seed)
    lengths.add_argument("--json", action="store_true")
    lengths.set_defaults(func=cmd_train_lengths)
