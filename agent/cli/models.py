"""`profile`, `train` and `train-lengths`: build the performance and length models."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import Any

from agent.cli.common import (
    JSON_HELP,
    CliError,
    add_setup_args,
    print_figures,
    print_json,
    progress_bar,
    setup_from_args,
)
from agent.config import Settings
from agent.engines.base import EngineError
from agent.gpus import GpuControlError
from agent.modeling.dataset import DatasetError, DatasetWriter, file_sha256, read_dataset, read_meta
from agent.modeling.live_points import APIS
from agent.modeling.live_profile import ACTUATORS, ENGINES, LiveConfig, LiveProfileError, LiveProfileTarget
from agent.modeling.profile import (
    DEFAULT_MIN_CLOCK_MHZ,
    SweepConfig,
    SweepProgress,
    TwinProfileTarget,
    run_sweep,
    sweep_meta,
)

PROFILE_NOISE = 0.02  # iteration-time jitter of the twin while profiling: models must face noise
LIVE_POINTS = 200  # default sweep points on a live engine: about 10^4 iterations
LIVE_ONLY = (
    "engine_url",
    "engine_metrics_url",
    "api",
    "model_name",
    "actuator",
    "gpu_uuid",
    "gpu_index",
    "twin_url",
    "points",
)


PROFILE_HINT = "throttllem profile --gpu G --model M --tp N --out FILE"  # how a dataset is made


def check_dataset_out(path: Path) -> None:
    """Refuse a `profile --out` that is a directory before the sweep starts, naming the flag."""
    if path.is_dir():
        raise CliError(
            f"--out {path} is a directory: give the dataset CSV's path, e.g. {path / 'profile.csv'}"
        )


def check_model_out(path: Path) -> None:
    """Refuse a model `--out` that is a file before training, which takes minutes, rather than after."""
    if path.exists() and not path.is_dir():
        raise CliError(f"--out {path} is a file: give a directory for the model and its card.json")


def check_datasets(paths: list[Path]) -> None:
    """Each `--data` file and the setup description profile writes beside it; one line per problem."""
    for path in paths:
        if not path.exists():
            raise CliError(
                f"--data {path}: no such file; make one with `{PROFILE_HINT.replace('FILE', str(path))}`"
            )
        if not path.is_file():
            raise CliError(f"--data {path} is a directory: give the dataset CSVs profile wrote")
        try:
            read_meta(path)
        except DatasetError as exc:
            if not isinstance(exc.__cause__, FileNotFoundError):
                raise
            raise CliError(
                f"--data {path} has no {exc.__cause__.filename} beside it: profile writes that description "
                f"of the setup with the CSV; keep them together, or make a new dataset with `{PROFILE_HINT}`"
            ) from None


def sweep_config_from_args(args: argparse.Namespace) -> SweepConfig:
    """The sweep the flags describe, for either target."""
    return SweepConfig(
        seed=args.seed,
        min_clock_mhz=args.min_clock,
        clocks_mhz=tuple(int(c) for c in args.clocks.split(",")) if args.clocks else None,
    )


def cmd_profile(args: argparse.Namespace) -> int:
    """Sweep batch sizes, KV occupancies and clocks; append one row per iteration to --out."""
    check_dataset_out(args.out)
    if args.target == "live":
        return profile_live(args)
    given = [f"--{name.replace('_', '-')}" for name in LIVE_ONLY if getattr(args, name) is not None]
    if given:
        raise CliError(f"{', '.join(given)} only apply to --target live")
    target = TwinProfileTarget(setup_from_args(args))
    config = sweep_config_from_args(args)
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


def live_config_from_args(args: argparse.Namespace) -> LiveConfig:
    """The live target the flags describe; refuses one that misses a URL or a GPU, naming the flag."""
    if not args.engine_url:
        raise CliError(
            "--target live needs --engine-url: the base URL the engine serves requests on, "
            "e.g. http://127.0.0.1:8000"
        )
    metrics_url = args.engine_metrics_url or (args.engine_url if args.engine == "trtllm-serve" else None)
    if metrics_url is None:
        raise CliError(
            "--engine triton needs --engine-metrics-url: Triton's metrics port, e.g. http://127.0.0.1:8002/metrics"
        )
    api = args.api or ("openai" if args.engine == "trtllm-serve" else "triton")
    model_name = args.model_name or ("ensemble" if api == "triton" else None)
    if model_name is None:
        raise CliError(
            "--api openai needs --model-name: the model trtllm-serve serves "
            "(GET <engine-url>/v1/models lists it)"
        )
    if args.actuator is None:
        raise CliError(
            "--target live needs --actuator: nvml (a real GPU, with --gpu-uuid or --gpu-index) or twin "
            "(the twin's GPU endpoint, with --twin-url)"
        )
    uuids = tuple(u.strip() for u in args.gpu_uuid.split(",")) if args.gpu_uuid else ()
    if args.actuator == "nvml" and bool(uuids) == (args.gpu_index is not None):
        raise CliError(
            "--actuator nvml needs exactly one of --gpu-uuid (preferred; `nvidia-smi -L` lists them) "
            "or --gpu-index: the GPUs the engine runs on"
        )
    if args.actuator == "nvml" and (len(uuids) or 1) != args.tp:
        raise CliError(
            f"--gpu-uuid names {len(uuids) or 1} GPU(s) but --tp is {args.tp}: a TP-N engine runs on N "
            "GPUs and every one must be locked; list all N, comma-separated"
        )
    if args.actuator == "twin" and not args.twin_url:
        raise CliError("--actuator twin needs --twin-url: the twin's HTTP port, e.g. http://127.0.0.1:8000")
    return LiveConfig(
        engine=args.engine,
        engine_url=args.engine_url,
        metrics_url=metrics_url,
        api=api,
        model_name=model_name,
        actuator=args.actuator,
        gpu_uuids=uuids,
        gpu_index=args.gpu_index,
        twin_url=args.twin_url,
        tp=args.tp,
        max_batch_size=args.max_batch_size,
        max_num_tokens=args.max_num_tokens,
        max_seq_len=args.max_seq_len,
        settle_s=args.settle_ms / 1000.0,
        poll_s=args.poll_ms / 1000.0,
        seed=args.seed,
    )


def profile_live(args: argparse.Namespace) -> int:
    """Profile a live engine: lock each point's clock, load the engine, keep its iterations."""
    live = live_config_from_args(args)
    config = sweep_config_from_args(args)
    points = LIVE_POINTS if args.points is None else args.points
    # SIGTERM (systemd, Kubernetes, `kill`) takes Ctrl-C's path, so the locked clock is reset on
    # the way out instead of outliving the process.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with LiveProfileTarget.open(live) as target:
            with (
                DatasetWriter(args.out, sweep_meta(target, config)) as writer,
                progress_bar(f"profile {target.setup_description()['gpu']}", not args.json) as progress,
            ):

                def report(state: SweepProgress) -> None:
                    progress(min(state.points / points, 1.0))

                state = run_sweep(target, writer, config, points=points, progress=report)
            kept, dropped, empty = target.kept, target.dropped, target.empty_points
    except (LiveProfileError, GpuControlError, EngineError) as exc:
        raise CliError(str(exc)) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    figures = {
        "out": str(args.out),
        "points": state.points,
        "rows": state.rows,
        "new_rows": state.new_rows,
        "iterations_kept": kept,
        "iterations_dropped": dropped,
        "points_without_rows": empty,
    }
    print_json(figures) if args.json else print_figures("live profile", figures)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train an IPS model on profile datasets and export it with its card."""
    check_datasets(args.data)
    check_model_out(args.out)
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
    check_model_out(args.out)
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
    profile = sub.add_parser(
        "profile", help="profile iterations per second on the twin, or on a live engine and GPU"
    )
    profile.add_argument(
        "--target",
        choices=("twin", "live"),
        default="twin",
        help="twin: the emulated engine in virtual time; live: an engine over HTTP, clocks locked by "
        "NVML (or the twin's GPU endpoint)",
    )
    add_setup_args(profile)
    profile.set_defaults(noise=PROFILE_NOISE)
    profile.add_argument("--samples", type=int, default=20_000, help="rows (iterations) to collect (twin)")
    profile.add_argument("--out", type=Path, required=True, help="dataset CSV (resumed if it exists)")
    profile.add_argument("--min-clock", type=int, default=DEFAULT_MIN_CLOCK_MHZ, help="lowest clock to sweep")
    profile.add_argument("--clocks", default=None, help="comma-separated clocks to sweep instead of all")
    profile.add_argument("--json", action="store_true", help=JSON_HELP)
    _add_live_args(profile)
    profile.set_defaults(func=cmd_profile)

    train = sub.add_parser("train", help="train and export an IPS model from profile datasets")
    train.add_argument("--data", type=Path, action="append", required=True, help="dataset CSV (repeatable)")
    train.add_argument(
        "--out",
        type=Path,
        required=True,
        help="directory for ips.onnx and card.json, e.g. agent/data/models/<gpu>/<model>-tp1 in a checkout",
    )
    train.add_argument(
        "--seed",
        type=int,
        default=settings.seed,
        help="seed of the splits and the trees (default %(default)s)",
    )
    train.add_argument("--json", action="store_true", help=JSON_HELP)
    train.set_defaults(func=cmd_train)

    lengths = sub.add_parser("train-lengths", help="train the learned generation-length predictor")
    lengths.add_argument(
        "--out",
        type=Path,
        default=settings.models_dir / "lengths" / "azure",
        help="directory for length.onnx and card.json (default: lengths/azure in THROTTLLEM_MODELS_DIR, "
        "else in the package's shipped models, which it replaces)",
    )
    lengths.add_argument(
        "--seed",
        type=int,
        default=settings.seed,
        help="seed of the splits and the trees (default %(default)s)",
    )
    lengths.add_argument("--json", action="store_true", help="print the whole model card as JSON")
    lengths.set_defaults(func=cmd_train_lengths)


def _add_live_args(profile: argparse.ArgumentParser) -> None:
    """Flags of `profile --target live`; --tp, --max-batch-size, --max-num-tokens and --seed are shared."""
    live = profile.add_argument_group(
        "live target",
        "--tp, --max-batch-size and --max-num-tokens must be the engine's build limits; the KV cache "
        "size and block size are read from the engine",
    )
    live.add_argument(
        "--engine",
        choices=tuple(ENGINES),
        default="trtllm-serve",
        help="where iteration stats come from: trtllm-serve's /metrics (every iteration, with its "
        "latency) or Triton's metrics port (decode windows only) (default %(default)s)",
    )
    live.add_argument("--engine-url", help="base URL requests go to, e.g. http://127.0.0.1:8000")
    live.add_argument(
        "--engine-metrics-url",
        help="iteration stats URL (trtllm-serve: default <engine-url>/metrics; triton: its metrics port, "
        "e.g. http://127.0.0.1:8002/metrics)",
    )
    live.add_argument(
        "--api", choices=APIS, help="request API (default: openai for trtllm-serve, triton for triton)"
    )
    live.add_argument(
        "--model-name", help="model the requests address (triton API default: ensemble; openai: required)"
    )
    live.add_argument("--actuator", choices=ACTUATORS, help="who locks the SM clock: nvml or twin")
    live.add_argument(
        "--gpu-uuid",
        help="nvml: the GPU's UUID (GPU-..., see `nvidia-smi -L`); a TP-N engine's N UUIDs, comma-separated",
    )
    live.add_argument("--gpu-index", type=int, help="nvml: the GPU's NVML index, instead of its UUID")
    live.add_argument("--twin-url", help="twin: base URL of the twin's GPU endpoint (its HTTP port)")
    live.add_argument(
        "--max-seq-len",
        type=int,
        default=2048,
        help="the engine's prompt + output limit (default %(default)s)",
    )
    live.add_argument(
        "--points", type=int, default=None, help=f"sweep points to run, resumable (default {LIVE_POINTS})"
    )
    live.add_argument(
        "--settle-ms",
        type=float,
        default=100.0,
        help="wait after each clock lock before loading the engine (default %(default)s)",
    )
    live.add_argument(
        "--poll-ms",
        type=float,
        default=20.0,
        help="iteration stats read interval; below Triton's stats_check_period_ms (default %(default)s)",
    )
