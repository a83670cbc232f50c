"""One process against two under torchrun (gloo, CPU) on the same runs: wall time, first-step loss
and final test figures, same seed and global batch.

    .venv/bin/python -m benchmarks.distributed [--quick] [--data-root tests/data]

Runs: a from-scratch CNN (BatchNorm: its statistics are taken per process, so the losses may part),
an MLP without BatchNorm or dropout and the dehazer, all on the in-repo sample by default; one
process with one thread, one with two (the machine's 2 cores) and ``--nproc 2 --threads 1``.
MLflow runs go to a temporary store.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow

from .common import command_line, machine, save_result, utc_now

REPO = Path(__file__).resolve().parent.parent
RUNS = {
    "cnn": ["classify", "--net", "cnn", "--net-options", '{"depth": 2, "width": 8}', "--image-size", "32",
            "--batch-size", "8", "--augment", "none", "--val-fraction", "0.2", "--epochs", "10"],
    "mlp": ["classify", "--net", "mlp", "--net-options", '{"hidden": [32], "pool_to": 8, "dropout": 0}',
            "--image-size", "32", "--batch-size", "8", "--augment", "none", "--val-fraction", "0.2", "--epochs", "10"],
    "dehazer": ["dehaze", "--net-options", '{"width": 8}', "--crop-size", "64", "--crops-per-image", "4",
                "--batch-size", "4", "--eval-subset", "0", "--epochs", "10"],
}
FIGURES = {"classify": ("test_accuracy", "test_macro_f1", "test_loss"), "dehaze": ("test_psnr", "test_ssim")}
SETTINGS = ((1, 1), (1, 2), (2, 1))  # processes, threads per process


def train(store: Path, name: str, data_root: Path, nproc: int, threads: int, epochs: int) -> dict:
    task, *options = RUNS[name]
    options[options.index("--epochs") + 1] = str(epochs)
    label = f"{name}-{nproc}x{threads}"
    data = data_root / ("vehicles" if task == "classify" else "dehaze")
    command = [sys.executable, "-m", "training.cli", "train", task, "--data", str(data), *options, "--nproc", str(nproc),
               "--threads", str(threads), "--experiment", name, "--run-name", label,
               "--checkpoint-dir", str(store / "checkpoints"), "--no-log-model"]
    tick = time.perf_counter()
    subprocess.run(command, cwd=store, check=True, capture_output=True, text=True,
                   env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"})
    wall = time.perf_counter() - tick
    (run,) = mlflow.search_runs(experiment_names=[name], filter_string=f"run_name = '{label}'", output_format="list")
    first = min(mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_step_loss"), key=lambda m: m.step)
    return {"run": name, "processes": nproc, "threads": threads, "wall_seconds": wall, "run_seconds": run.data.metrics["total_seconds"],
            "first_step_loss": first.value, **{k: run.data.metrics[k] for k in FIGURES[task]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs instead of 10")
    parser.add_argument("--data-root", type=Path, default=REPO / "tests" / "data", help="vehicles/ and dehaze/ below it")
    args = parser.parse_args()
    started, rows = utc_now(), []
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        for name in RUNS:
            for nproc, threads in SETTINGS:
                rows.append(train(Path(tmp), name, args.data_root, nproc, threads, 2 if args.quick else 10))
                print("  ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()))
    path = save_result("distributed", {"started": started, "command": command_line("benchmarks.distributed"),
                                       "machine": machine(), "data_root": str(args.data_root), "rows": rows},
                       quick=args.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
