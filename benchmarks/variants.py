"""Do the optional ONNX variants pay? Speed and accuracy of each beside the shipped fp32 models.

    .venv/bin/python -m benchmarks.variants [--quick]

Variants, built in a temporary folder from the shipped files (nothing in models/ changes):
- ``ort-offline``: the graph onnxruntime optimises at session start (ORT_ENABLE_EXTENDED, the
  portable level), saved once, so start-up skips the work.
- ``int8``: static QDQ quantisation (per-channel int8 weights, uint8 activations, MinMax
  calibration on training images, never test ones) of the convolutions and matrix products.
- fp16 is a GPU format (the CPU provider runs most fp16 kernels through casts); it is skipped
  unless CUDA is active.

Accuracy comes from the same evaluator as the shipped figures (``training.evaluate``: the test
split through the contract), speed from the service's own session options, variants taking turns.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from serving import processing, runtime
from serving.images import open_rgb
from training.evaluate import evaluate_onnx, load_contract

from .ceiling import classifier_batch, dehazer_batch, service_threads
from .common import MODELS, command_line, data_root, interleaved_medians, machine, save_result, utc_now

TASK_DATA = {"classify": "vehicles", "dehaze": "dehaze"}  # data_root's kind of each task's dataset
CALIBRATION_IMAGES = {"classify": 128, "dehaze": 8}


def calibration_batches(task: str, contract: dict, count: int) -> list[dict[str, np.ndarray]]:
    """Training-side images in the contract's input format: the first 80% of files by name."""
    name = contract["input"]["name"]
    if task == "classify":
        from training.data.vehicles import split_vehicles

        spec = contract["input"]
        samples = split_vehicles(data_root(TASK_DATA[task]), 0.2, "tail", classes=tuple(contract["labels"])).train
        chosen = samples[:: max(1, len(samples) // count)][:count]
        images = np.stack([processing.classifier_input(open_rgb(s.path), spec) for s in chosen])
        return [{name: images[i : i + 16]} for i in range(0, len(images), 16)]
    from training.data.dehaze import split_dehaze

    pairs = split_dehaze(data_root(TASK_DATA[task]), 0.2).train
    chosen = pairs[:: max(1, len(pairs) // count)][:count]
    return [{name: processing.dehazer_input(open_rgb(p.hazy), int(contract["pad_multiple"]))} for p in chosen]


def build_variants(task: str, folder: Path, calibration_count: int) -> dict[str, Path]:
    """Each variant as a model folder of its own (ONNX + a JSON naming it), for the evaluator."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    json_name = runtime.MODEL_FILES[task]
    contract = json.loads((MODELS / json_name).read_text())
    onnx_name = contract["file"]
    shipped = MODELS / onnx_name
    folders = {name: folder / task / name for name in ("fp32", "ort-offline", "int8")}
    for path in folders.values():
        path.mkdir(parents=True)
        (path / json_name).write_text(json.dumps(contract))
    shutil.copy(shipped, folders["fp32"] / onnx_name)

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(folders["ort-offline"] / onnx_name)
    ort.InferenceSession(str(shipped), options, providers=["CPUExecutionProvider"])

    batches = iter(calibration_batches(task, contract, calibration_count))

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(batches, None)

    prepared = folder / f"{task}-prepared.onnx"
    quant_pre_process(str(shipped), str(prepared), skip_symbolic_shape=True)  # dynamic H, W defeat it
    quantize_static(str(prepared), str(folders["int8"] / onnx_name), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["Conv", "Gemm", "MatMul"])
    return {name: path / onnx_name for name, path in folders.items()}


def speed(task: str, files: dict[str, Path], threads: int, quick: bool) -> dict[str, dict]:
    """Session start seconds and median items/s per variant, on the service's session options."""
    sessions, started = {}, {}
    for name, path in files.items():
        tick = time.perf_counter()
        sessions[name] = runtime.create_session(path, task, threads, "cpu")[0]
        started[name] = time.perf_counter() - tick
    contract, _ = load_contract(files["fp32"])
    input_name = contract["input"]["name"]
    if task == "classify":
        inputs = {n: classifier_batch(n, contract["input"]) for n in (1, 32)}
    else:
        height, width = (104, 136) if quick else (413, 550)
        inputs = {1: dehazer_batch(1, height, width, int(contract["pad_multiple"]))}
    result = {name: {"session_start_s": round(started[name], 3), "bytes": files[name].stat().st_size}
              for name in files}
    for batch, array in inputs.items():
        calls = {name: (lambda s=session: s.run(None, {input_name: array})) for name, session in sessions.items()}
        seconds = interleaved_medians(calls, repeats=3 if quick else 10, warmup=2)
        for name, value in seconds.items():
            items = batch if task == "classify" else array.shape[-1] * array.shape[-2] / 1e6
            result[name][f"batch{batch}_ms"] = round(value * 1000, 2)
            result[name][f"batch{batch}_{'images' if task == 'classify' else 'megapixels'}_per_s"] = round(items / value, 2)
    return result


def accuracy(task: str, files: dict[str, Path]) -> dict[str, dict]:
    data = data_root(TASK_DATA[task])
    keys = ("accuracy", "macro_f1") if task == "classify" else ("psnr", "ssim")
    out = {}
    for name, path in files.items():
        report = evaluate_onnx(path, str(data))
        out[name] = {key: round(report[key], 4) for key in keys}
    return out


def measure(quick: bool) -> dict:
    threads = service_threads()
    result = {"threads": threads, "data": {task: str(data_root(kind)) for task, kind in TASK_DATA.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        for task in TASK_DATA:
            files = build_variants(task, Path(tmp), CALIBRATION_IMAGES[task] // (4 if quick else 1))
            figures = speed(task, files, threads, quick)
            for name, scores in accuracy(task, files).items():
                figures[name].update(scores)
            result[task] = figures
    return result


def format_table(result: dict) -> str:
    lines = []
    for task, columns in (("classify", ("batch1_images_per_s", "batch32_images_per_s", "accuracy", "macro_f1")),
                          ("dehaze", ("batch1_megapixels_per_s", "psnr", "ssim"))):
        lines.append(f"{task:<10}{'variant':<13}{'start s':>9}{'MB':>7}" + "".join(f"{c:>24}" for c in columns))
        for name, row in result[task].items():
            lines.append(f"{'':<10}{name:<13}{row['session_start_s']:>9}{row['bytes'] / 1e6:>7.1f}"
                         + "".join(f"{row.get(c, '-'):>24}" for c in columns))
    lines.append(f"({result['threads']} intra-op threads, CPU provider; accuracy on {result['data']})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: fewer calibration images and repeats")
    args = parser.parse_args()
    result = {"date": utc_now(), "command": command_line("benchmarks.variants"), "machine": machine(), **measure(args.quick)}
    print(format_table(result))
    print("saved", save_result("variants", result, args.quick))


if __name__ == "__main__":
    main()
