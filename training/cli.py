"""The ``roadsight`` command line."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing

from .tracking import disable_telemetry

EXIT_INTERRUPTED = 130


def add_config_arguments(parser: argparse.ArgumentParser, config_cls) -> None:
    """One flag per dataclass field, typed and documented by the field itself."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        meta, kind = f.metadata, hints[f.name]
        help_text = f"{meta['help']} (default: {f.default})"
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

    print(f"{'network':<14}{'task':<10}{'parameters':>12}  options")
    for name in list_models():
        task = model_task(name)
        model = build_classifier(name, 3, (args.image_size, args.image_size)) if task == "classify" else get_model(name)
        options = ", ".join(f"{k}={v}" for k, v in model_options(name).items() if k not in ("num_classes", "image_size"))
        print(f"{name:<14}{task:<10}{count_parameters(model):>12,}  {options}")
    return 0


def cmd_train_classify(args: argparse.Namespace) -> int:
    from .config import ClassifyConfig
    from .engine import train_classifier

    result = train_classifier(config_from_args(ClassifyConfig, args))
    m = result.metrics
    print(f"run {result.run_id}: test accuracy {m['test_accuracy']:.4f}, macro-F1 {m['test_macro_f1']:.4f}, "
          f"{m['total_seconds']:.0f} s; checkpoint {result.checkpoint}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import ClassifyConfig

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
    classify.set_defaults(handler=cmd_train_classify)
    return parser


def main(argv: list[str] | None = None) -> int:
    disable_telemetry()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow.store", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted: the MLflow run is marked KILLED; continue with --resume <checkpoint>", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, FileNotFoundError) as exc:
        print(f"roadsight: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
