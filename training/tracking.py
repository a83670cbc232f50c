"""MLflow tracking: where runs go, how runs end, and the plots every run logs.

With no ``MLFLOW_TRACKING_URI`` MLflow 3 uses ``sqlite:///mlflow.db`` with artifacts under
``./mlruns`` of the working directory, which is exactly what a plain ``mlflow ui`` started in
the same directory reads; so runs started from the repo root show up there with no setup.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import time
from pathlib import Path
from typing import Iterator, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402

from . import interrupts  # noqa: E402

TELEMETRY_OFF = {"ORT_DISABLE_TELEMETRY": "1", "BENTOML_DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
                 "DO_NOT_TRACK": "1"}


def disable_telemetry() -> None:
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def tracked_run(experiment: str, run_name: str | None = None, run_id: str | None = None,
                nested: bool = False, tags: dict[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run that ends FINISHED, KILLED on Ctrl-C, FAILED on any other error.

    ``run_id`` continues an earlier run (``--resume``) instead of starting a new one. Signals are
    deferred in the body (see ``interrupts``) so that none lands inside an MLflow write.
    """
    disable_telemetry()
    if run_id is None:
        mlflow.set_experiment(experiment)
    run = mlflow.start_run(run_id=run_id, run_name=run_name, nested=nested, tags=tags)
    try:
        with interrupts.deferred():
            yield run
    except KeyboardInterrupt:
        with interrupts.held():
            mlflow.end_run("KILLED")
        interrupts.clear()
        raise
    except BaseException:
        with interrupts.held():  # e.g. torchrun's SIGTERM right after another process failed
            mlflow.end_run("FAILED")
        raise
    with interrupts.deferred():
        mlflow.end_run("FINISHED")


def resolve_run_id(source: str) -> str:
    """A run id from a run id, ``runs:/<id>/...`` or a registered ``models:/name@alias|version`` URI."""
    if source.startswith("runs:/"):
        return source.split("/")[1]
    if source.startswith("models:/"):
        name, _, ref = source[len("models:/"):].partition("@")
        client = mlflow.MlflowClient()
        if ref:
            version = client.get_model_version_by_alias(name, ref)
        else:
            name, _, number = name.partition("/")
            version = client.get_model_version(name, number)
        return version.run_id
    return source


# Per-image predictions of the selection protocol's scorings, what `roadsight compare` pairs two runs on:
# file stem -> (what they score, the option that makes a run log them)
PREDICTION_SETS = {"cv_out_of_fold": ("blocked-CV out of fold", "--cv"), "other": ("other sources", "--validate-on")}


def log_predictions(name: str, paths: Sequence, labels: Sequence[int], predicted: Sequence[int],
                    classes: Sequence[str]) -> None:
    """``predictions/<name>.csv``: one row per image, keyed by its class folder and file name (the
    same image wherever a user keeps the data), with the label and the prediction."""
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")  # quotes a user's file name with a comma in it
    writer.writerow(["image", "label", "predicted"])
    writer.writerows([f"{Path(p).parent.name}/{Path(p).name}", classes[y], classes[q]]
                     for p, y, q in zip(paths, labels, predicted))
    mlflow.log_text(table.getvalue(), f"predictions/{name}.csv")


def load_predictions(run_id: str, name: str) -> dict[str, tuple[str, str]]:
    """``log_predictions``'s rows of a run: image -> (label, predicted)."""
    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/predictions/{name}.csv")
    except Exception as exc:  # MLflow raises several types for unknown runs and missing artifacts
        raise ValueError(f"run {run_id} has no predictions/{name}.csv in {mlflow.get_tracking_uri()} (a run logs it "
                         f"with {PREDICTION_SETS[name][1]}): {exc}") from exc
    return {image: (label, predicted) for image, label, predicted in list(csv.reader(io.StringIO(text)))[1:]}


def log_params(params: dict[str, object]) -> None:
    """Log parameters, flattening sequences to text (MLflow params are strings)."""
    mlflow.log_params({k: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in params.items()})


def log_steps(key: str, values: Sequence[float], first_step: int) -> None:
    """One value per training step (``first_step``, ``first_step + 1``, ...), in few writes."""
    timestamp = int(time.time() * 1000)
    metrics = [mlflow.entities.Metric(key, float(v), timestamp, first_step + i) for i, v in enumerate(values)]
    run_id = mlflow.active_run().info.run_id
    for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
        mlflow.MlflowClient().log_batch(run_id, metrics=metrics[start : start + 1000])


def curves_figure(history: Sequence[dict[str, float]], panels: dict[str, Sequence[str]]):
    """One panel per entry of ``panels`` (title -> metric keys), each metric against epoch."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels.items()):
        for key in keys:
            points = [(h["epoch"], h[key]) for h in history if key in h]  # some metrics skip epochs
            if points:
                ax.plot(*zip(*points), marker=".", label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def confusion_figure(cm: np.ndarray, classes: Sequence[str]):
    fig, ax = plt.subplots(figsize=(3.8, 3.4))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    fig.tight_layout()
    return fig


def image_grid_figure(images: Sequence[np.ndarray], titles: Sequence[str], columns: int = 8, size: float = 1.6):
    """Images (HWC uint8 or CHW uint8) in a grid with a title each; an empty grid says so."""
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * size, rows * (size + 0.3)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(image.transpose(1, 2, 0) if image.shape[0] == 3 else image)
        ax.set_title(title, fontsize=7)
    if not images:
        axes[0, 0].text(0, 0.5, "none", fontsize=12)
    fig.tight_layout()
    return fig


def band_figure(panels: Sequence[tuple[str, Sequence[tuple[str, Sequence[int], Sequence[float], Sequence[float]]]]]):
    """One panel per (title, lines); each line (label, epochs, mean, sd) drawn as the mean with a
    band of ± sd: repeated runs compared with their spread in view."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels):
        for label, epochs, mean, sd in lines:
            mean, sd = np.asarray(mean), np.asarray(sd)
            (line,) = ax.plot(epochs, mean, marker=".", label=label)
            ax.fill_between(epochs, mean - sd, mean + sd, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def reliability_figure(panels: dict[str, Sequence[dict[str, float]]]):
    """Reliability diagrams: accuracy against confidence per bin (``metrics.reliability_bins``), one
    panel per named set of predictions; the diagonal is perfect calibration."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.6), squeeze=False)
    for ax, (title, table) in zip(axes[0], panels.items()):
        used = [b for b in table if b["count"]]
        ax.bar([b["lower"] for b in used], [b["accuracy"] for b in used], width=[b["upper"] - b["lower"] for b in used],
               align="edge", alpha=0.7, edgecolor="black", label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.plot([b["confidence"] for b in used], [b["accuracy"] for b in used], "r.", label="mean confidence")
        ax.set(title=title, xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)


def log_figure(fig, path: str) -> None:
    mlflow.log_figure(fig, path)
    close(fig)
