"""The in-process ceiling the served figures are compared with: the shipped models in onnxruntime,
loaded by the service's own loader (same contract checks, provider and session options), on real
images prepared as the service prepares them, run the two ways a service worker could run them: one
run with all of the worker's cores as intra-op threads, and, where the service runs several at once
on the CPU (serving.runtime.cpu_layout), that many runs side by side with their own threads. The
goals take the faster of the two. Torch-free, so the GPU check (benchmarks/gpu_check.py) runs it
with the serving install alone.

    .venv/bin/python -m benchmarks.ceiling [--quick]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import time
from typing import Callable

import numpy as np

from serving import processing, runtime
from serving.images import encode, open_rgb, stretch

from .common import MODELS, command_line, data_root, interleaved_medians, machine, save_result, utc_now, vehicle_images

BATCH_SIZES = (1, 32)
DEHAZE_SIZE = (413, 550)  # height, width: the course's dehazing photos


def _setting(name: str, default: int = 0) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def service_threads() -> int:
    """CPU cores of one service worker (its usable cores over ROADSIGHT_WORKERS, as serving/service.py
    shares them out): the intra-op threads of one onnxruntime run that has the whole worker."""
    return max(1, runtime.available_cores() // max(1, _setting("ROADSIGHT_WORKERS", 1)))


def service_layout() -> tuple[int, int]:
    """(runs at once, intra-op threads of each) of one service worker on the CPU, by the service's rule."""
    return runtime.cpu_layout(service_threads(), _setting("ROADSIGHT_PARALLEL_RUNS"), _setting("ROADSIGHT_INTRA_OP_THREADS"))


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


def timing_row(batch: np.ndarray, seconds: float, megapixels: float = 0.0, runs: int = 1) -> dict:
    row = {"batch": len(batch), "runs_at_once": runs, "input_shape": list(batch.shape),
           "onnxruntime_ms": round(seconds * 1000, 2), "onnxruntime_items_per_s": round(runs * len(batch) / seconds, 2)}
    if megapixels:
        row["megapixels_per_s"] = round(runs * len(batch) * megapixels / seconds, 3)
    return row


class Models:
    """The shipped models loaded once for the in-process figures: each as one run with the whole
    worker's threads, and (on the CPU, where the service runs ``runs`` at once) as ``runs`` runs side
    by side. ``calls()`` are what is timed; ``rates`` measures some of them in a short window, for
    benchmarks.run_all to alternate with served windows."""

    def __init__(self, quick: bool = False, preference: str | None = None):
        self.threads = service_threads()
        self.classifier = load_session("classify", self.threads, preference)
        self.dehazer = load_session("dehaze", self.threads, preference)
        runs, self.run_threads = service_layout()
        self.runs = runs if self.classifier.provider == "CPUExecutionProvider" else 1  # the service's rule
        self.spec = self.classifier.contract["input"]
        self.batches = {n: classifier_batch(n, self.spec) for n in BATCH_SIZES}
        self.height, self.width = (104, 136) if quick else DEHAZE_SIZE
        self.hazy = dehazer_batch(1, self.height, self.width, int(self.dehazer.contract.get("pad_multiple", 1)))
        self.megapixels = self.height * self.width / 1e6
        self._calls: dict[str, tuple[Callable[[], object], np.ndarray, float, int]] = {
            **{f"classifier-{n}": (runner(self.classifier, self.batches[n]), self.batches[n], 0.0, 1) for n in BATCH_SIZES},
            "dehazer-1": (runner(self.dehazer, self.hazy), self.hazy, self.megapixels, 1)}
        if self.runs > 1:
            classifier = load_session("classify", self.run_threads, preference)
            dehazer = load_session("dehaze", self.run_threads, preference)
            self._pool = concurrent.futures.ThreadPoolExecutor(self.runs)
            for n in BATCH_SIZES:
                self._calls[f"classifier-{n}-parallel"] = (self._side_by_side(runner(classifier, self.batches[n])),
                                                           self.batches[n], 0.0, self.runs)
            self._calls["dehazer-1-parallel"] = (self._side_by_side(runner(dehazer, self.hazy)), self.hazy,
                                                 self.megapixels, self.runs)

    def _side_by_side(self, call: Callable[[], object]) -> Callable[[], object]:
        return lambda: [future.result() for future in [self._pool.submit(call) for _ in range(self.runs)]]

    def names(self, prefix: str) -> list[str]:
        """The timed calls of one figure (e.g. "classifier-32"): one run, and side by side where the service does that."""
        return [name for name in self._calls if name == prefix or name == prefix + "-parallel"]

    def rates(self, names: list[str], seconds: float) -> dict[str, float]:
        """Items (images, or megapixels for the dehazer) per second of each call, taking turns for
        about ``seconds`` in all after one untimed call each."""
        spent, done = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
        for name in names:
            self._calls[name][0]()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            for name in names:
                call, batch, megapixels, runs = self._calls[name]
                began = time.perf_counter()
                call()
                spent[name] += time.perf_counter() - began
                done[name] += runs * len(batch) * (megapixels or 1)
        return {name: round(done[name] / spent[name], 3) for name in names}

    def measure(self, repeats: int) -> dict:
        """Every call, interleaved (``repeats`` rounds), and the request costs outside the model."""
        seconds = interleaved_medians({name: call for name, (call, *_rest) in self._calls.items()}, repeats, warmup=2)
        rows = {name: timing_row(batch, seconds[name], megapixels, runs)
                for name, (_call, batch, megapixels, runs) in self._calls.items()}

        def best(prefix: str, key: str = "onnxruntime_items_per_s") -> float:
            return max(rows[name][key] for name in self.names(prefix))

        (clear,) = runner(self.dehazer, self.hazy)()
        return {"threads": self.threads, "parallel_runs": self.runs, "threads_per_parallel_run": self.run_threads,
                "provider": {"classifier": self.classifier.provider, "dehazer": self.dehazer.provider},
                "request_costs_ms": request_costs(self.spec, self.dehazer, clear[0], self.height, self.width, repeats),
                "classifier": [rows[name] for name in rows if name.startswith("classifier")],
                "dehazer": [rows[name] for name in rows if name.startswith("dehazer")],
                "dehazer_image_size": [self.height, self.width],
                "classifier_batch1_images_per_s": best("classifier-1"),
                "classifier_batch32_images_per_s": best("classifier-32"),
                "classifier_batch32_over_batch1": round(best("classifier-32") / best("classifier-1"), 3),
                "dehazer_megapixels_per_s": best("dehazer-1", "megapixels_per_s")}


def measure(quick: bool = False, preference: str | None = None) -> dict:
    """onnxruntime alone: the classifier at batch 1 and 32, the dehazer at batch 1 on 550x413 photos
    (quick: a quarter of that size), each one run and side by side. ``classifier_batch32_images_per_s``
    (the faster way) is P1's ceiling, ``classifier_batch32_over_batch1`` the most batching can give,
    ``dehazer_megapixels_per_s`` P5's."""
    return Models(quick, preference).measure(3 if quick else 15)


def format_table(result: dict) -> str:
    lines = [f"{'model':<11}{'batch':>6}{'runs':>5}{'onnxruntime ms':>16}{'items/s':>10}"]
    for name in ("classifier", "dehazer"):
        for row in result[name]:
            lines.append(f"{name:<11}{row['batch']:>6}{row.get('runs_at_once', 1):>5}{row['onnxruntime_ms']:>16}"
                         f"{row['onnxruntime_items_per_s']:>10}")
    lines.append(f"per request outside the model: {result['request_costs_ms']} ms")
    lines.append(f"({result['threads']} intra-op threads for one run, {result.get('threads_per_parallel_run')} for each "
                 f"of {result.get('parallel_runs', 1)} side by side, on {result['provider']}; dehazer at "
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
