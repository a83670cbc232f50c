from __future__ import annotations

import os
from pathlib import Path

import pytest

from training.tracking import disable_telemetry

disable_telemetry()

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "tests" / "data"
FULL_DATA = REPO.parent / "shared" / "data"

needs_full_data = pytest.mark.skipif(
    not (FULL_DATA / "vehicles").is_dir(),
    reason=f"the full course datasets are not at {FULL_DATA} (tests use the in-repo sample otherwise)")


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A real, empty MLflow store (SQLite + local artifacts) for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # artifacts land in tmp_path/mlruns
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def tiny_config(tmp_path, **overrides):
    """A classifier run small enough for a test: two narrow conv layers, 32 px, one epoch."""
    from training.config import ClassifyConfig

    options = dict(data=str(SAMPLE / "vehicles"), net="cnn", net_options={"depth": 2, "width": 8}, image_size=32,
                   epochs=1, batch_size=8, val_fraction=0.2, checkpoint_dir=str(tmp_path / "ckpt"),
                   experiment="test-classify", log_model=False)
    options.update(overrides)
    return ClassifyConfig(**options)
