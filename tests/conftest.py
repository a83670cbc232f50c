from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from live_server import running_server
from serving.images import stretch
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
                   experiment="test-classify", log_model=False, feature_cache=str(tmp_path / "features"))
    options.update(overrides)
    return ClassifyConfig(**options)


def tiny_dehaze_config(tmp_path, **overrides):
    """A dehazer run small enough for a test: width 8, 32 px crops, two epochs."""
    from training.config import DehazeConfig

    options = dict(data=str(SAMPLE / "dehaze"), net_options={"width": 8}, crop_size=32, crops_per_image=2, batch_size=4,
                   epochs=2, eval_subset=1, checkpoint_dir=str(tmp_path / "ckpt"), experiment="test-dehaze",
                   log_model=False, threads=1)
    options.update(overrides)
    return DehazeConfig(**options)


SHIPPED = REPO / "models"
SHIPPED_FILES = ("vehicle_classifier.json", "vehicle_classifier.onnx", "dehazer.json", "dehazer.onnx")
DEHAZE_LIMIT = 25_000  # pixels, set small for the test server so the limit is exercised cheaply
UPLOAD_TIMEOUT_S = 5  # the test server's, so a stalled upload is answered quickly


def serving_models(tmp_path_factory) -> Path:
    """The models the test server serves: models/ (or a fresh export), stand-ins only while it is empty."""
    if os.environ.get("ROADSIGHT_TEST_MODELS_DIR"):  # e.g. a fresh export, before it is copied to models/
        return Path(os.environ["ROADSIGHT_TEST_MODELS_DIR"])
    if any((SHIPPED / name).exists() for name in SHIPPED_FILES):
        return SHIPPED
    from standin_models import write_standin_models

    warnings.warn("models/ holds no shipped model yet: the service tests ran on generated stand-in models")
    return write_standin_models(tmp_path_factory.mktemp("standin-models"))


@pytest.fixture(scope="session")
def audit_log(tmp_path_factory) -> Path:
    """Where the test server's processes log unpickling and model-file reads (tests/pickle_audit)."""
    return tmp_path_factory.mktemp("audit") / "audit.jsonl"


@pytest.fixture(scope="session")
def server(tmp_path_factory, audit_log):
    """One real `bentoml serve` on 127.0.0.1 for every service test module (starting one costs more
    than most of their tests), with small limits so they are cheap to exercise."""
    settings = {
        "ROADSIGHT_DEHAZE_MAX_PIXELS": str(DEHAZE_LIMIT),
        "ROADSIGHT_UPLOAD_TIMEOUT_S": str(UPLOAD_TIMEOUT_S), "ROADSIGHT_TEST_AUDIT_LOG": str(audit_log),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests" / "pickle_audit"),
                                                    os.environ.get("PYTHONPATH")]))}
    home = tmp_path_factory.mktemp("bentoml-home")
    with running_server(serving_models(tmp_path_factory), home, settings) as running:
        yield running


@pytest.fixture(scope="session")
def direct(server):
    """The models called directly with onnxruntime, fed as models/README.md says (no service code)."""
    import onnxruntime as ort

    def load(stem):
        contract = json.loads((server.models_dir / f"{stem}.json").read_text())
        session = ort.InferenceSession(str(server.models_dir / contract["file"]), providers=["CPUExecutionProvider"])
        return contract, session

    return {"classify": load("vehicle_classifier"), "dehaze": load("dehazer")}


def expected_probabilities(direct, images) -> np.ndarray:
    """The classifier's probabilities for RGB ``images``, fed as its JSON contract says."""
    contract, session = direct["classify"]
    spec = contract["input"]
    batch = np.stack([stretch(image, spec["width"], spec["height"], spec["filter"]) for image in images])
    return session.run([contract["output"]["name"]], {spec["name"]: batch})[0]


def expected_dehazed(direct, image) -> np.ndarray:
    """The dehazer's uint8 HWC output for an RGB image, padded and cropped as its contract says."""
    contract, session = direct["dehaze"]
    multiple = contract["pad_multiple"]
    x = np.asarray(image, np.float32).transpose(2, 0, 1) / 255
    height, width = x.shape[1:]
    x = np.pad(x, [(0, 0), (0, -height % multiple), (0, -width % multiple)], mode="reflect")
    (y,) = session.run([contract["output"]["name"]], {contract["input"]["name"]: x[None]})
    return np.round(np.clip(y[0, :, :height, :width], 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)


def assert_same_pixels(served: np.ndarray, expected: np.ndarray):
    """Equal up to 8-bit rounding of float noise between two onnxruntime sessions (padding, crop or
    orientation mistakes differ by far more)."""
    assert served.shape == expected.shape
    difference = np.abs(served.astype(int) - expected.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.001, (difference.max(), (difference > 0).mean())
