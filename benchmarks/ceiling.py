"""The in-process ceiling the served figures are compared with: the shipped models in onnxruntime,
loaded by the service's own loader (same contract checks, provider, session options and intra-op
threads per worker), on real images prepared as the service prepares them. Torch-free, so the GPU
check (benchmarks/gpu_check.py) runs it with the serving install alone.

    .venv/bin/python -m benchmarks.ceiling [--quick]
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from serving import processing, runtime
from serving.images import encode, open_rgb, stretch

from .common import MODELS, command_line, data_root, interleaved_medians, machine, save_result, utc_now, vehicle_images

BATCH_SIZES = (1, 32)
DEHAZE_SIZE = (413, 550)  # height, width: the course's dehazing photos


def service_threads() -> int:
    """Intra-op threads of one service worker, by the service's own rule (serving/service.py)."""
    configured = os.environ.get("ROADSIGHT_INTRA_OP_THREADS", "").strip()
    workers = int(os.environ.get("ROADSIGHT_WORKERS", "").strip() or 1)
    return int(configured) if configured else max(1, runtime.available_cores() // max(1, workers))


def provider_preference() -> str:
    return os.environ.get("ROADSIGHT_PROVIDER", "auto").strip().lower() or "auto"


def load_session(task: str, threads: int, preference: str | None = None) -> runtime.LoadedModel:
    """The model through the service's loader: same contract checks, provider choice and session options."""
    return runtime.load_model(MODELS, task, threads, preference or provider_preference())


def classifier_batch(size: int, spec: dict) -> np.ndarray:
    """``size`` real photos prepared as the service prepares them."""
    paths = vehicle_images(size)
    paths = (paths * size)[:size]
    return np.stack([stretch(open_rgb(path), spec["width"], spec["height"], spec.get("filter", "bilinear"))
                     for path in paths])


def dehazer_batch(size: int, height: int, width: int, pad_multiple: int) -> np.ndarray:
    """``size`` real hazy photos, resized to ``height`` x ``width`` and padded per the contract."""
    from PIL import Image

    paths = sorted((data_root("dehaze") / "hazy").glob("*.jpg"))
    images = [open_rgb(paths[i % len(paths)]).resize((width, height), Image.Resampling.BICUBIC) for i in range(size)]
    return np.concatenate([processing.dehazer_input(image, pad_multiple) for image in images])


def request_costs(spec: dict, dehazer: runtime.LoadedModel, clear: np.ndarray, height: int, width: int,
                  repeats: int) -> dict:
    """Milliseconds of one request's work outside the model, done as the service does it (in one
    thread): decoding and resizing a real vehicle upload; decoding and padding a ``width`` x
    ``height`` hazy JPEG, and cropping and PNG-encoding the dehazer's answer (``clear``, one output row)."""
    from .serving_load import classify_uploads, dehaze_uploads

    vehicles = classify_uploads()
    hazy, _, _ = dehaze_uploads(4, (width, height))
    multiple = int(dehazer.contract.get("pad_multiple", 1))

    def prepare_vehicles():
        for upload in vehicles:
            processing.classifier_input(processing.decode_image(upload.data), spec)

    def prepare_hazy():
        for upload in hazy:
            processing.dehazer_pixels(processing.decode_image(upload.data), multiple)

    def encode_clear():
        encode(processing.dehazer_output(clear, height, width), "png")

    seconds = interleaved_medians({"classify": prepare_vehicles, "dehaze": prepare_hazy, "encode": encode_clear},
                                  repeats)
    return {"classify_decode_resize_ms": round(seconds["classify"] * 1000 / len(vehicles), 2),
            "dehaze_decode_pad_ms": round(seconds["dehaze"] * 1000 / len(hazy), 2),
            "dehaze_crop_encode_png_ms": round(seconds["encode"] * 1000, 2)}


def runner(model: runtime.LoadedModel, batch: np.ndarray):
    return lambda: model.session.run([model.output_name], {model.input_name: batch})


def timing_row(batch: np.ndarray, seconds: float, megapixels: float = 0.0) -> dict:
    row = {"batch": len(batch), "input_shape": list(batch.shape), "onnxruntime_ms": round(seconds * 1000, 2),
           "onnxruntime_items_per_s": round(len(batch) / seconds, 2)}
    if megapixels:
        row["megapixels_per_s"] = round(len(batch) * megapixels / seconds, 3)
    return row


def measure(quick: bool = False, preference: str | None = None) -> dict:
    """onnxruntime alone: the classifier at batch 1 and 32, the dehazer at batch 1 on 550x413 photos
    (quick: a quarter of that size). ``classifier_batch32_images_per_s`` is P1's ceiling,
    ``classifier_batch32_over_batch1`` the most batching can give, ``dehazer_megapixels_per_s`` P5's."""
    threads = service_threads()
    classifier, dehazer = load_session("classify", threads, preference), load_session("dehaze", threads, preference)
    spec = classifier.contract["input"]
    batches = {n: classifier_batch(n, spec) for n in BATCH_SIZES}
    height, width = (104, 136) if quick else DEHAZE_SIZE
    hazy = dehazer_batch(1, height, width, int(dehazer.contract.get("pad_multiple", 1)))
    repeats = 3 if quick else 15
    seconds = interleaved_medians({**{f"classifier-{n}": runner(classifier, batches[n]) for n in BATCH_SIZES},
                                   "dehazer-1": runner(dehazer, hazy)}, repeats, warmup=2)
    rows = [timing_row(batches[n], seconds[f"classifier-{n}"]) for n in BATCH_SIZES]
    dehaze_row = timing_row(hazy, seconds["dehazer-1"], height * width / 1e6)
    (clear,) = runner(dehazer, hazy)()
    return {"threads": threads, "provider": {"classifier": classifier.provider, "dehazer": dehazer.provider},
            "request_costs_ms": request_costs(spec, dehazer, clear[0], height, width, repeats),
            "classifier": rows, "dehazer": [dehaze_row], "dehazer_image_size": [height, width],
            "classifier_batch1_images_per_s": rows[0]["onnxruntime_items_per_s"],
            "classifier_batch32_images_per_s": rows[-1]["onnxruntime_items_per_s"],
            "classifier_batch32_over_batch1": round(rows[-1]["onnxruntime_items_per_s"]
                                                    / rows[0]["onnxruntime_items_per_s"], 3),
            "dehazer_megapixels_per_s": dehaze_row["megapixels_per_s"]}


def format_table(result: dict) -> str:
    lines = [f"{'model':<11}{'batch':>6}{'onnxruntime ms':>16}{'items/s':>10}"]
    for name in ("classifier", "dehazer"):
        for row in result[name]:
            lines.append(f"{name:<11}{row['batch']:>6}{row['onnxruntime_ms']:>16}{row['onnxruntime_items_per_s']:>10}")
    lines.append(f"per request outside the model: {result['request_costs_ms']} ms")
    lines.append(f"({result['threads']} intra-op threads on {result['provider']}; dehazer at "
                 f"{result['dehazer_image_size'][0]}x{result['dehazer_image_size'][1]}: "
                 f"{result['dehazer_megapixels_per_s']} MP/s; batch 32 / batch 1: {result['classifier_batch32_over_batch1']})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: few repeats, dehazer on quarter-size images")
    args = parser.parse_args()
    result = {"date": utc_now(), "command": command_line("benchmarks.ceiling"), "machine": machine(),
              **measure(args.quick)}
    print(format_table(result))
    print("saved", save_result("ceiling", result, args.quick))


if __name__ == "__main__":
    main()
