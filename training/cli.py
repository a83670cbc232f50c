"""The ``roadsight`` command line."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing
from pathlib import Path

from . import interrupts
from .tracking import disable_telemetry

EXIT_INTERRUPTED = 130


def main_process() -> bool:
    """The process that reports: the only one, or rank 0 of those torchrun started (it sets RANK)."""
    return os.environ.get("RANK", "0") == "0"


def add_nproc_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="train in N processes on this machine (N GPUs, or CPU processes): runs this same command "
                             "under `torchrun --standalone --nproc-per-node N`; for several machines call torchrun "
                             "yourself (README, Training)")


def exec_torchrun(nproc: int, argv: list[str]) -> None:
    """Become ``torchrun`` running this same command, less ``--nproc``, in ``nproc`` processes: signals
    then reach torchrun, which forwards them to every process."""
    command, skip = [], False
    for token in argv:
        name = token.split("=")[0]
        if skip or (len(name) > 2 and "--nproc".startswith(name)):  # argparse takes abbreviations too
            skip = not skip and "=" not in token
            continue
        command.append(token)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc-per-node={nproc}", "-m", "training.cli", *command])


def add_config_arguments(parser: argparse.ArgumentParser, config_cls) -> None:
    """One flag per dataclass field, typed and documented by the field itself."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        meta, kind = f.metadata, hints[f.name]
        help_text = meta["help"]  # the parsers' ArgumentDefaultsHelpFormatter adds the default
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        elif meta.get("json"):
            parser.add_argument(flag, type=_json_object, default=f.default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=f.default, choices=meta.get("choices"), help=help_text)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"depth\": 5}}', got {text}")
    return value


def config_from_args(config_cls, args: argparse.Namespace):
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})


def cmd_nets(args: argparse.Namespace) -> int:
    from .nets import build_classifier, count_parameters, get_model, list_models, model_options, model_task

    width = max(map(len, list_models())) + 2
    print(f"{'network':<{width}}{'task':<10}{'parameters':>12}  options")
    for name in list_models():
        task = model_task(name)
        model = build_classifier(name, 3, (args.image_size, args.image_size)) if task == "classify" else get_model(name)
        options = ", ".join(f"{k}={v}" for k, v in model_options(name).items() if k not in ("num_classes", "image_size"))
        print(f"{name:<{width}}{task:<10}{count_parameters(model):>12,}  {options}")
    return 0


def cmd_train_classify(args: argparse.Namespace) -> int:
    from .config import ClassifyConfig
    from .engine import train_classifier

    result = train_classifier(config_from_args(ClassifyConfig, args))
    if not main_process():
        return 0
    m = result.metrics
    figures = [f"{name} accuracy {m[f'{key}_accuracy']:.4f}" + (f" +- {m[f'{key}_accuracy_std']:.4f}" if f"{key}_accuracy_std" in m else "")
               + f", macro-F1 {m[f'{key}_macro_f1']:.4f}" for name, key in
               (("blocked-CV", "cv"), ("other-source", "other"), ("test", "test")) if f"{key}_accuracy" in m]
    if "temperature" in m:
        figures.append(f"temperature {m['temperature']:.3f} (out-of-fold ECE {m['cv_ece_uncalibrated']:.3f} -> "
                       f"{m['cv_ece_calibrated']:.3f})")
    print(f"run {result.run_id}: {'; '.join(figures)}; {m['total_seconds']:.0f} s; checkpoint {result.checkpoint}")
    return 0


def cmd_train_dehaze(args: argparse.Namespace) -> int:
    from .config import DehazeConfig
    from .dehaze_engine import train_dehazer

    result = train_dehazer(config_from_args(DehazeConfig, args))
    if not main_process():
        return 0
    m = result.metrics
    print(f"run {result.run_id}: test PSNR {m['test_psnr']:.2f} dB, SSIM {m['test_ssim']:.4f} "
          f"(hazy input: {m['test_identity_psnr']:.2f} dB, {m['test_identity_ssim']:.4f}), "
          f"{m['total_seconds']:.0f} s; checkpoint {result.checkpoint}")
    return 0


def cmd_dehaze_baseline(args: argparse.Namespace) -> int:
    from .config import DehazeBaselineConfig
    from .dehaze_engine import run_baselines

    m = run_baselines(config_from_args(DehazeBaselineConfig, args)).metrics
    print(f"identity (hazy input): PSNR {m['identity_psnr']:.2f} dB, SSIM {m['identity_ssim']:.4f}")
    print(f"dark-channel prior:    PSNR {m['dcp_psnr']:.2f} dB, SSIM {m['dcp_ssim']:.4f}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from . import export

    if args.task == "classify":
        json_path = export.export_classifier(args.run, Path(args.out), data=args.data, alias=args.alias,
                                             register=args.register, validate_on=args.validate_on,
                                             score_test=args.score_test)
    elif not args.score_test:
        raise ValueError("--no-score-test is for classifier exports: a dehazer's export scores its test pairs")
    else:
        json_path = export.export_dehazer(args.run, Path(args.out), data=args.data, alias=args.alias, register=args.register)
    contract = json.loads(json_path.read_text())
    print(f"wrote {json_path.with_suffix('.onnx')} and {json_path} (sha256 {contract['sha256'][:12]}...); "
          f"registered as {contract['source'].get('model_uri', '-')}")
    print(json.dumps(contract["metrics"], indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_onnx

    print(json.dumps(evaluate_onnx(args.model, args.data, args.test_fraction, args.whole_folder), indent=2))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare_runs

    rows = compare_runs(args.run_a, args.run_b)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"A = {args.run_a}, B = {args.run_b}")
        for row in rows:
            unpaired = f" ({row['only_in_a']} images only in A's, {row['only_in_b']} only in B's: left out)" \
                if row["only_in_a"] or row["only_in_b"] else ""
            print(f"{row['verdict']}{unpaired}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from .experiments import run_study

    run_id = run_study(args.name, args.data, quick=args.quick, epochs=args.epochs, seeds=args.seeds, threads=args.threads,
                       validate_on=args.validate_on)
    print(f"study {args.name}: MLflow parent run {run_id} (experiment lab-studies)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report

    print(f"wrote {build_report(args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import ClassifyConfig, DehazeBaselineConfig, DehazeConfig

    parser = argparse.ArgumentParser(prog="roadsight", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    nets = commands.add_parser("nets", help="list every registered network with its parameter count")
    nets.add_argument("--image-size", type=int, default=96, help="input size the counts are taken at")
    nets.set_defaults(handler=cmd_nets)

    train = commands.add_parser("train", help="train a model as one MLflow run")
    tasks = train.add_subparsers(dest="task", required=True)
    classify = tasks.add_parser("classify", help="vehicle classifier (bus/car/truck)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(classify, ClassifyConfig)
    add_nproc_argument(classify)
    classify.set_defaults(handler=cmd_train_classify)
    dehaze = tasks.add_parser("dehaze", help="dehazer (hazy -> clear image pairs)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(dehaze, DehazeConfig)
    add_nproc_argument(dehaze)
    dehaze.set_defaults(handler=cmd_train_dehaze)

    baseline = commands.add_parser("dehaze-baseline", help="score identity and dark-channel-prior dehazing (MLflow run)",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(baseline, DehazeBaselineConfig)
    baseline.set_defaults(handler=cmd_dehaze_baseline)

    export = commands.add_parser("export", help="export a run to the ONNX contract in models/ (checked, registered)")
    export.add_argument("task", choices=("classify", "dehaze"))
    export.add_argument("--run", required=True, help="MLflow run id, runs:/<id> or models:/name@alias")
    export.add_argument("--out", default="models", help="output folder")
    export.add_argument("--data", help="dataset for the parity check and metrics (default: the run's own)")
    export.add_argument("--validate-on", help="classify: a {bus,car,truck}/ folder of other-source images scored on "
                                              "the ONNX file for the JSON's selection figures (default: the run's own)")
    export.add_argument("--score-test", action=argparse.BooleanOptionalAction, default=True,
                        help="classify: score the test split into the JSON's metrics (the chosen recipe's one "
                             "scoring); --no-score-test checks parity on training images and scores nothing")
    export.add_argument("--alias", default="champion", help="registered-model alias to point at the export")
    export.add_argument("--register", action=argparse.BooleanOptionalAction, default=True,
                        help="log the ONNX model to the run and register it in MLflow")
    export.set_defaults(handler=cmd_export)

    evaluate = commands.add_parser("evaluate", help="score an ONNX model through its JSON contract (no torch)")
    evaluate.add_argument("model", help="models/<name>.onnx or its .json")
    evaluate.add_argument("--data", required=True, help="dataset folder (vehicles or dehaze pairs)")
    evaluate.add_argument("--test-fraction", type=float, default=0.2, help="the tail split's test share")
    evaluate.add_argument("--whole-folder", action="store_true",
                          help="classify: score every image of DATA's {bus,car,truck}/ (images from other sources, "
                               "per file-name prefix too) instead of the tail split")
    evaluate.set_defaults(handler=cmd_evaluate)

    compare = commands.add_parser("compare", help="pair two classifier runs image by image (out of fold, other "
                                                  "sources): exact McNemar test of the images one gets right")
    compare.add_argument("run_a", help="MLflow run id, runs:/<id> or models:/name@alias")
    compare.add_argument("run_b", help="the same, for the run to compare against")
    compare.add_argument("--json", action="store_true", help="print the figures as JSON")
    compare.set_defaults(handler=cmd_compare)

    from .experiments import STUDIES

    experiment = commands.add_parser("experiment", help="run one lab study as nested MLflow runs (seeds x settings x "
                                                        "splits; finished runs with the same options are reused)")
    experiment.add_argument("name", choices=list(STUDIES))
    experiment.add_argument("--quick", action="store_true", help="tiny images, one epoch: a smoke run of minutes")
    experiment.add_argument("--data", help="dataset folder (default: the course's vehicles, or dehaze pairs for "
                                           "the dehaze study, in ../shared/data)")
    experiment.add_argument("--epochs", type=int, help="override the study's epochs")
    experiment.add_argument("--seeds", type=int, help="seeds 1..N per setting and split (default: the study's, 3 or 5)")
    experiment.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    experiment.add_argument("--validate-on", help="recipes: the {bus,car,truck}/ folder of other-source photos every "
                                                  "recipe is scored on (default: vehicles-other beside the data)")
    experiment.set_defaults(handler=cmd_experiment)

    report = commands.add_parser("report", help="build the lab report (HTML + Markdown) from the MLflow store")
    report.add_argument("--out", default="report", help="output folder")
    report.set_defaults(handler=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    disable_telemetry()
    interrupts.install()  # Ctrl-C and `kill` end runs as KILLED and resumable
    args = build_parser().parse_args(argv)
    nproc = getattr(args, "nproc", 1)
    if nproc > 1 and "LOCAL_WORLD_SIZE" in os.environ:
        print("roadsight: error: --nproc starts torchrun; under torchrun leave it out", file=sys.stderr)
        return 2
    if nproc > 1:
        exec_torchrun(nproc, sys.argv[1:] if argv is None else argv)
    level = logging.DEBUG if args.verbose else logging.INFO if main_process() else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)  # imports may add handlers
    for noisy in ("alembic", "mlflow.store", "urllib3", "matplotlib", "PIL", "onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        if main_process():
            print("interrupted: the MLflow run is marked KILLED; continue with --resume <checkpoint>", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        rank = f" (rank {os.environ['RANK']})" if "RANK" in os.environ else ""
        print(f"roadsight: error{rank}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
