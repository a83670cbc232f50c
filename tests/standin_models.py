"""Tiny stand-in models that follow models/README.md exactly, for testing the service's mechanics.

Built with onnx.helper in a temporary directory (never in models/): a classifier whose
probabilities are a softmax of the image's mean colour (non-square input, so width/height mix-ups
show), and a dehazer ``clip(1.25 x - 0.1, 0, 1)`` that, like a real U-Net, only accepts sizes that
are multiples of its ``pad_multiple`` (SpaceToDepth/DepthToSpace), so missing padding fails loudly.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import numpy as np

LABELS = ["bus", "car", "truck"]
HEIGHT, WIDTH = 40, 56
PAD_MULTIPLE = 8
WEIGHTS = np.array([[0.03, -0.02, 0.0], [-0.01, 0.03, -0.02], [-0.02, -0.01, 0.03]], np.float32)


def standin_dehaze(image_chw_uint8: np.ndarray) -> np.ndarray:
    """What the stand-in dehazer computes, in NumPy (before 8-bit rounding)."""
    return np.clip(image_chw_uint8.astype(np.float32) / 255 * 1.25 - 0.1, 0, 1)


def _write(directory: Path, stem: str, proto, metadata: dict) -> Path:
    import onnx

    onnx.checker.check_model(proto, full_check=True)
    onnx_path = directory / f"{stem}.onnx"
    onnx.save(proto, str(onnx_path))
    metadata.update({"schema": "roadsight.model/1", "file": onnx_path.name,
                     "sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
                     "metrics": {}, "source": {"net": "stand-in", "note": "test fixture, not a trained model"},
                     "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "opset": 17})
    json_path = directory / f"{stem}.json"
    json_path.write_text(json.dumps(metadata, indent=2))
    return json_path


def write_standin_models(directory: Path) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    opset = [helper.make_opsetid("", 17)]

    nodes = [helper.make_node("Cast", ["images"], ["pixels"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["pixels"], ["mean"], axes=[2, 3], keepdims=0),
             helper.make_node("MatMul", ["mean", "weights"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)]
    graph = helper.make_graph(
        nodes, "standin_classifier",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 3, HEIGHT, WIDTH])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(LABELS)])],
        [numpy_helper.from_array(WEIGHTS, "weights")])
    classifier = helper.make_model(graph, opset_imports=opset, ir_version=8)
    _write(directory, "vehicle_classifier", classifier, {
        "task": "classify", "name": "vehicle-classifier", "labels": LABELS,
        "input": {"name": "images", "dtype": "uint8", "layout": "NCHW", "color": "RGB", "height": HEIGHT,
                  "width": WIDTH, "resize": "stretch", "filter": "bilinear"},
        "output": {"name": "probabilities", "dtype": "float32", "kind": "softmax"}})

    nodes = [helper.make_node("SpaceToDepth", ["hazy"], ["blocks"], blocksize=PAD_MULTIPLE),
             helper.make_node("DepthToSpace", ["blocks"], ["same"], blocksize=PAD_MULTIPLE, mode="DCR"),
             helper.make_node("Mul", ["same", "gain"], ["scaled"]),
             helper.make_node("Sub", ["scaled", "offset"], ["shifted"]),
             helper.make_node("Clip", ["shifted", "low", "high"], ["clear"])]
    constants = [numpy_helper.from_array(np.array(v, np.float32), n)
                 for n, v in (("gain", 1.25), ("offset", 0.1), ("low", 0.0), ("high", 1.0))]
    graph = helper.make_graph(
        nodes, "standin_dehazer",
        [helper.make_tensor_value_info("hazy", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("clear", TensorProto.FLOAT, ["N", 3, "H", "W"])], constants)
    dehazer = helper.make_model(graph, opset_imports=opset, ir_version=8)
    _write(directory, "dehazer", dehazer, {
        "task": "dehaze", "name": "dehazer", "pad_multiple": PAD_MULTIPLE, "pad_mode": "reflect",
        "input": {"name": "hazy", "dtype": "float32", "layout": "NCHW", "color": "RGB", "range": [0, 1]},
        "output": {"name": "clear", "dtype": "float32", "range": [0, 1]}})
    return directory
