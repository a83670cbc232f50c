"""In-process inference: onnxruntime as the service configures it (benchmarks/ceiling.py) against
torch eager, at batch 1 and 32, for both shipped models.

    .venv/bin/python -m benchmarks.inference [--quick]

Both runtimes get the intra-op threads the service would give one worker (cores / ROADSIGHT_WORKERS,
or ROADSIGHT_INTRA_OP_THREADS) and take turns on the same real images. The torch models are the
shipped weights in their ``training.nets`` architectures (``benchmarks.torch_twins``), checked
against onnxruntime first.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from serving import runtime

from .ceiling import BATCH_SIZES, DEHAZE_SIZE, classifier_batch, dehazer_batch, load_session, service_threads
from .common import MODELS, command_line, interleaved_medians, machine, save_result, utc_now
from .torch_twins import classifier_twin, dehazer_twin, parity


def compare(model: runtime.LoadedModel, torch_model: torch.nn.Module, batch: np.ndarray, repeats: int) -> dict:
    """Median milliseconds per batch of onnxruntime and of torch eager, taking turns."""
    tensor = torch.from_numpy(batch)

    def ort_run():
        model.session.run([model.output_name], {model.input_name: batch})

    @torch.no_grad()
    def torch_run():
        torch_model(tensor)

    # torch's oneDNN convolutions are set up over their first two calls at a shape (seconds each)
    seconds = interleaved_medians({"onnxruntime": ort_run, "torch": torch_run}, repeats, warmup=2)
    return {"batch": len(batch), "input_shape": list(batch.shape), "onnxruntime_ms": round(seconds["onnxruntime"] * 1000, 2),
            "torch_eager_ms": round(seconds["torch"] * 1000, 2),
            "onnxruntime_items_per_s": round(len(batch) / seconds["onnxruntime"], 2),
            "torch_items_per_s": round(len(batch) / seconds["torch"], 2),
            "torch_over_onnxruntime": round(seconds["torch"] / seconds["onnxruntime"], 2)}


def measure(quick: bool = False) -> dict:
    """Parity, then onnxruntime vs torch at batch 1 and 32 for each model."""
    threads = service_threads()
    torch.set_num_threads(threads)
    classifier, dehazer = load_session("classify", threads), load_session("dehaze", threads)
    classifier_torch, dehazer_torch = classifier_twin(MODELS), dehazer_twin(MODELS)
    spec = classifier.contract["input"]
    pad_multiple = int(dehazer.contract.get("pad_multiple", 1))
    dehaze_height, dehaze_width = (104, 136) if quick else DEHAZE_SIZE  # quick: a quarter
    repeats = {1: 3, 32: 1}  # times 5 (classifier) or 3 (dehazer) in a full run
    batches = {n: classifier_batch(n, spec) for n in BATCH_SIZES}
    hazy = {n: dehazer_batch(n, dehaze_height, dehaze_width, pad_multiple) for n in BATCH_SIZES}
    result = {
        "threads": threads, "provider": {"classifier": classifier.provider, "dehazer": dehazer.provider},
        "torch_models": {"classifier": classifier_torch.describe(), "dehazer": dehazer_torch.describe()},
        "parity_max_abs_diff": {"classifier_probabilities": parity(classifier_torch, classifier.session, batches[32][:8]),
                                "dehazer_pixels": parity(dehazer_torch, dehazer.session, hazy[1])},
        "dehazer_image_size": [dehaze_height, dehaze_width],
        "classifier": [compare(classifier, classifier_torch.model, batches[n], repeats[n] * (1 if quick else 5))
                       for n in BATCH_SIZES],
        "dehazer": [compare(dehazer, dehazer_torch.model, hazy[n], repeats[n] * (1 if quick else 3))
                    for n in BATCH_SIZES],
    }
    return result


def format_table(result: dict) -> str:
    lines = [f"{'model':<11}{'batch':>6}{'onnxruntime ms':>16}{'torch ms':>11}{'torch/ort':>11}{'ort items/s':>13}"]
    for name in ("classifier", "dehazer"):
        for row in result[name]:
            lines.append(f"{name:<11}{row['batch']:>6}{row['onnxruntime_ms']:>16}{row['torch_eager_ms']:>11}"
                         f"{row['torch_over_onnxruntime']:>11}{row['onnxruntime_items_per_s']:>13}")
    lines.append(f"({result['threads']} intra-op threads; dehazer at {result['dehazer_image_size'][0]}x"
                 f"{result['dehazer_image_size'][1]}; torch models: classifier {result['torch_models']['classifier']['weights']}; "
                 f"dehazer {result['torch_models']['dehazer']['weights']}; parity {result['parity_max_abs_diff']})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: few repeats, dehazer on quarter-size images")
    args = parser.parse_args()
    result = {"date": utc_now(), "command": command_line("benchmarks.inference"), "machine": machine(),
              **measure(args.quick)}
    print(format_table(result))
    print("saved", save_result("inference", result, args.quick))


if __name__ == "__main__":
    main()
