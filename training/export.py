"""Export trained runs to the ONNX contract in ``models/`` (see models/README.md).

A run is named by its MLflow run id or a registered-model URI (``models:/name@alias`` or
``models:/name/3``); its ``checkpoint/`` artifacts (weights + options) rebuild the network, so no
pickle is ever loaded. Every export is checked (``onnx.checker`` full check, onnxruntime vs torch
parity on real images) before the JSON is written; a failed check raises and writes nothing.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.onnx
import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

from .tracking import disable_telemetry, resolve_run_id

log = logging.getLogger(__name__)

SCHEMA = "roadsight.model/1"
REGISTERED_NAMES = {"classify": "vehicle-classifier", "dehaze": "dehazer"}
FILE_STEMS = {"classify": "vehicle_classifier", "dehaze": "dehazer"}
PROBABILITY_TOLERANCE = 1e-4
PARITY_TRAINING_IMAGES = 256  # the parity check's images when the test split is not to be scored
DEHAZE_PARITY_PSNR_DB = 50.0


class ExportError(RuntimeError):
    """An export that failed one of its checks; nothing was written."""


@dataclass
class RunCheckpoint:
    run_id: str
    config: dict
    weights: dict[str, torch.Tensor]


def load_run_checkpoint(source: str) -> RunCheckpoint:
    run_id = resolve_run_id(source)
    try:
        folder = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint"))
    except Exception as exc:  # MLflow raises several types for unknown runs and missing artifacts
        raise ExportError(f"run {source}: cannot fetch its checkpoint/ artifacts from {mlflow.get_tracking_uri()} "
                          f"({exc})") from exc
    config = json.loads((folder / "config.json").read_text())
    weights = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
    return RunCheckpoint(run_id, config, weights)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def onnx_to_file(model: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str,
                 dynamic_dims: dict[int, object]) -> onnx.ModelProto:
    """torch.export-based ONNX export with the given dynamic input dimensions, fully checked."""
    program = torch.onnx.export(model.eval(), (example,), dynamo=True, external_data=False,
                                input_names=[input_name], output_names=[output_name],
                                dynamic_shapes=({i: d for i, d in dynamic_dims.items()},), verbose=False)
    program.save(str(path), external_data=False)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def cpu_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def write_metadata(onnx_path: Path, metadata: dict) -> Path:
    """The JSON beside the ONNX file, with the file's sha256 and the export time."""
    metadata = {"schema": SCHEMA, **metadata, "file": onnx_path.name, "sha256": sha256_of(onnx_path),
                "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    json_path = onnx_path.with_suffix(".json")
    json_path.write_text(json.dumps(metadata, indent=2, ensure_ascii=False) + "\n")
    return json_path


def finish_export(onnx_path: Path, metadata: dict, evaluate, run_id: str, alias: str | None, register: bool) -> Path:
    """Write the JSON, score the file through it (``evaluate(json_path)``), optionally register it,
    and record the metrics and the registered URI in the JSON."""
    json_path = write_metadata(onnx_path, metadata)
    metadata = json.loads(json_path.read_text())
    metadata["metrics"] = evaluate(json_path)
    if register:
        metadata["source"]["model_uri"] = register_onnx(metadata["task"], onnx_path, run_id, alias)
    json_path.write_text(json.dumps(metadata, indent=2, ensure_ascii=False) + "\n")
    return json_path


def register_onnx(task: str, onnx_path: Path, run_id: str, alias: str | None) -> str:
    """Log the ONNX file to its source run, register it and optionally point ``alias`` at it."""
    disable_telemetry()
    name = REGISTERED_NAMES[task]
    with mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="onnx", registered_model_name=name,
                                     pip_requirements=["onnxruntime-gpu==1.31.1", "onnx==1.23.2"],
                                     onnx_execution_providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                                     save_as_external_data=False)
    version = info.registered_model_version
    if alias:
        mlflow.MlflowClient().set_registered_model_alias(name, alias, str(version))
    return f"models:/{name}/{version}"


class _Probabilities(nn.Module):
    """The classifier as shipped: uint8 images in, softmax probabilities out."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier(images), dim=1)


def export_classifier(source: str, out_dir: Path, data: str | None = None, alias: str | None = "champion",
                      register: bool = True, validate_on: str | None = None, score_test: bool = True) -> Path:
    """Export a classification run to ``out_dir/vehicle_classifier.onnx`` + ``.json``.

    ``data`` (the vehicle folder; default: the run's own) supplies the real test images for the
    parity check and the metrics recorded in the JSON; with ``score_test`` False the parity check runs
    on training images and the JSON records no test metrics, so a candidate (or a model adapted to a
    user's camera) is exported without a look at the test split, which stays for the recipe chosen.
    The JSON's ``selection`` holds what the recipe was chosen on: the run's blocked-CV and calibration
    figures and, scored on the ONNX file, every image of ``validate_on`` (default: the run's own
    ``--validate-on``, if any).
    """
    from .data.vehicles import load_images, split_vehicles
    from .evaluate import evaluate_classifier_onnx
    from .nets import build_classifier

    ckpt = load_run_checkpoint(source)
    cfg = ckpt.config
    size = int(cfg["image_size"])
    classes = cfg["classes"]
    model = build_classifier(cfg["net"], len(classes), (size, size), cfg["normalization"], **(cfg.get("net_options") or {}))
    model.load_state_dict(ckpt.weights)
    wrapped = _Probabilities(model).eval()

    data = data or cfg["data"]
    split = split_vehicles(data, cfg["test_fraction"], cfg["split"], cfg["seed"])
    checked = "test" if score_test else "train"
    images, _ = load_images(split.test if score_test else split.train[:PARITY_TRAINING_IMAGES], (size, size))
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "vehicle_classifier.onnx"
        proto = onnx_to_file(wrapped, torch.from_numpy(images[:2]), staged, "images", "probabilities",
                             {0: torch.export.Dim("batch", min=1, max=4096)})
        session = cpu_session(staged)
        with torch.no_grad():
            expected = wrapped(torch.from_numpy(images)).numpy()
        got = np.concatenate([session.run(None, {"images": images[i : i + 64]})[0] for i in range(0, len(images), 64)])
        worst = float(np.abs(got - expected).max())
        if worst > PROBABILITY_TOLERANCE:
            raise ExportError(f"ONNX probabilities differ from torch by {worst:.2e} > {PROBABILITY_TOLERANCE} "
                              f"on {len(images)} {checked} images")
        log.info("parity: max |onnx - torch| = %.2e over %d %s images", worst, len(images), checked)
        target = out_dir / staged.name
        target.write_bytes(staged.read_bytes())
    metadata = {
        "task": "classify", "name": REGISTERED_NAMES["classify"], "opset": _opset(proto), "labels": classes,
        "input": {"name": "images", "dtype": "uint8", "layout": "NCHW", "color": "RGB", "height": size, "width": size,
                  "resize": "stretch", "filter": "bilinear"},
        "output": {"name": "probabilities", "dtype": "float32", "kind": "softmax"},
        "parity": {"max_abs_probability_difference": worst, "images": len(images), "split": checked},
        "source": {"mlflow_run_id": ckpt.run_id, "net": cfg["net"], "net_options": cfg.get("net_options") or {},
                   "training_config": cfg},
    }
    validate_on = validate_on or cfg.get("validate_on")
    selection = {k: v for k, v in mlflow.get_run(ckpt.run_id).data.metrics.items()
                 if k.startswith(("cv_", "other_", "temperature"))}
    if selection:
        metadata["selection"] = {"run_metrics": dict(sorted(selection.items()))}
    score = (lambda path: evaluate_classifier_onnx(path, data, cfg["test_fraction"])) if score_test else (lambda path: {})
    json_path = finish_export(target, metadata, score, ckpt.run_id, alias, register)
    if validate_on:
        contract = json.loads(json_path.read_text())
        contract.setdefault("selection", {})["other_source"] = {
            "data": Path(validate_on).name, **evaluate_classifier_onnx(json_path, validate_on, whole_folder=True)}
        json_path.write_text(json.dumps(contract, indent=2, ensure_ascii=False) + "\n")
    return json_path


def export_dehazer(source: str, out_dir: Path, data: str | None = None, alias: str | None = "champion",
                   register: bool = True) -> Path:
    """Export a dehazing run to ``out_dir/dehazer.onnx`` + ``.json`` (N, H, W dynamic; H and W
    multiples of the net's ``pad_multiple``, which the JSON tells clients to pad to)."""
    from serving.images import pad_to_multiple

    from .data.dehaze import load_pair, split_dehaze
    from .evaluate import evaluate_dehazer_onnx
    from .image_metrics import psnr
    from .nets import get_model

    ckpt = load_run_checkpoint(source)
    cfg = ckpt.config
    model = get_model(cfg["net"], **(cfg.get("net_options") or {}))
    model.load_state_dict(ckpt.weights)
    model.eval()
    multiple = int(getattr(model, "pad_multiple", 1))
    data = data or cfg["data"]
    split = split_dehaze(data, cfg.get("test_fraction", 0.2))
    hazy = [pad_to_multiple(load_pair(p)[0], multiple)[None].astype(np.float32) / 255 for p in split.test[:4]]
    blocks = {d: torch.export.Dim(f"{name}_blocks", min=1, max=4096 // multiple) for d, name in ((2, "height"), (3, "width"))}
    dims = {0: torch.export.Dim("batch", min=1, max=64), **{d: multiple * b for d, b in blocks.items()}}
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "dehazer.onnx"
        example = torch.from_numpy(np.concatenate([hazy[0], hazy[0]]))
        proto = onnx_to_file(model, example, staged, "hazy", "clear", dims)
        session = cpu_session(staged)
        worst = math.inf
        for image in hazy:
            with torch.no_grad():
                expected = model(torch.from_numpy(image)).numpy()
            worst = min(worst, psnr(session.run(None, {"hazy": image})[0], expected))
        if worst < DEHAZE_PARITY_PSNR_DB:
            raise ExportError(f"ONNX dehazer output is only {worst:.1f} dB from torch's (< {DEHAZE_PARITY_PSNR_DB} dB)")
        log.info("parity: PSNR(onnx, torch) >= %.1f dB on %d test images", worst, len(hazy))
        target = out_dir / staged.name
        target.write_bytes(staged.read_bytes())
    metadata = {
        "task": "dehaze", "name": REGISTERED_NAMES["dehaze"], "opset": _opset(proto), "pad_multiple": multiple,
        "pad_mode": "reflect",
        "input": {"name": "hazy", "dtype": "float32", "layout": "NCHW", "color": "RGB", "range": [0, 1]},
        "output": {"name": "clear", "dtype": "float32", "range": [0, 1]},
        "parity": {"min_psnr_db_onnx_vs_torch": worst, "images": len(hazy)},
        "source": {"mlflow_run_id": ckpt.run_id, "net": cfg["net"], "net_options": cfg.get("net_options") or {},
                   "training_config": cfg},
    }
    return finish_export(target, metadata, lambda path: evaluate_dehazer_onnx(path, data, cfg.get("test_fraction", 0.2)),
                         ckpt.run_id, alias, register)


def _opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
