"""Evaluate a shipped ONNX model through its contract alone (its JSON), never through torch.

This is how the bars in the issues are measured: whatever the export did, the numbers come from
onnxruntime fed exactly as a client following models/README.md would feed it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.images import open_rgb, pad_to_multiple, stretch

from .data.vehicles import labelled_folder, source_group, split_vehicles
from .metrics import accuracy_by_lighting, classification_report, confusion_matrix, expected_calibration_error


def load_contract(json_path: str | Path) -> tuple[dict, Path]:
    json_path = Path(json_path)
    if json_path.suffix == ".onnx":
        json_path = json_path.with_suffix(".json")
    if not json_path.is_file():
        raise FileNotFoundError(f"model metadata {json_path} does not exist (expected beside the .onnx file)")
    contract = json.loads(json_path.read_text())
    return contract, json_path.parent / contract["file"]


def evaluate_classifier_onnx(model: str | Path, data: str, test_fraction: float = 0.2, batch_size: int = 64,
                             whole_folder: bool = False) -> dict:
    """Accuracy, macro-F1, per-class scores, calibration error and night/day accuracy on the lab's tail
    split, and onnxruntime's images/s at batch 1 and 32; with ``whole_folder``, the same scores on every
    image of ``data``'s class folders (images from other sources) with a breakdown per file-name prefix."""
    contract, onnx_path = load_contract(model)
    spec = contract["input"]
    labels = tuple(contract["labels"])
    samples = labelled_folder(data, labels) if whole_folder else split_vehicles(data, test_fraction, "tail", classes=labels).test
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    images = np.stack([stretch(open_rgb(s.path), spec["width"], spec["height"], spec["filter"]) for s in samples])
    truth = np.array([s.label for s in samples])
    run = lambda batch: session.run([contract["output"]["name"]], {spec["name"]: batch})[0]  # noqa: E731
    probabilities = np.concatenate([run(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    predictions = probabilities.argmax(1)
    report = classification_report(confusion_matrix(truth, predictions, len(labels)), labels)
    report["ece"] = expected_calibration_error(probabilities, truth)
    report.update(accuracy_by_lighting(images, truth, predictions))
    if whole_folder:
        groups = np.array([source_group(s.path) for s in samples])
        for group in sorted(set(groups) - {""}):
            report[f"{group}_accuracy"] = float((predictions == truth)[groups == group].mean())
        report.update({"images": int(len(truth)), "split": f"every image of {Path(data).name}"})
        return report
    for batch in (1, 32):
        seconds = min(timed(run, images[:batch]) for _ in range(5 if batch == 1 else 3))
        report[f"images_per_second_batch{batch}"] = batch / seconds
    report.update({"test_images": int(len(truth)), "split": f"tail {test_fraction:.0%} of each class by file name"})
    return report


def timed(call, *args) -> float:
    start = time.perf_counter()
    call(*args)
    return time.perf_counter() - start


def evaluate_onnx(model: str | Path, data: str, test_fraction: float = 0.2, whole_folder: bool = False) -> dict:
    """Dispatch on the contract's task."""
    contract, _ = load_contract(model)
    if contract["task"] == "classify":
        return evaluate_classifier_onnx(model, data, test_fraction, whole_folder=whole_folder)
    return evaluate_dehazer_onnx(model, data, test_fraction)


def evaluate_dehazer_onnx(model: str | Path, data: str, test_fraction: float = 0.2) -> dict:
    """PSNR/SSIM on the test pairs at full resolution, after 8-bit rounding, plus megapixels/s."""
    from .data.dehaze import load_pair, split_dehaze
    from .image_metrics import mean_scores, quantize

    contract, onnx_path = load_contract(model)
    multiple = int(contract["pad_multiple"])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    outputs, seconds, pixels = [], 0.0, 0
    for pair in split_dehaze(data, test_fraction).test:
        hazy, clear = load_pair(pair)
        height, width = hazy.shape[-2:]
        batch = pad_to_multiple(hazy, multiple)[None].astype(np.float32) / 255
        start = time.perf_counter()
        (restored,) = session.run([contract["output"]["name"]], {contract["input"]["name"]: batch})
        seconds += time.perf_counter() - start
        pixels += height * width
        outputs.append((quantize(restored[0, :, :height, :width]), clear))
    scores = mean_scores(outputs)
    scores.update({"megapixels_per_second": pixels / seconds / 1e6,
                   "split": f"last {test_fraction:.0%} of pairs by name, full resolution, output rounded to 8 bits"})
    return scores
