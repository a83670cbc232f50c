"""One-shot check of the service on an NVIDIA GPU, run by ``benchmarks/gpu_check.sh`` (which installs
the serving and CUDA extras first; no torch). In about 6 minutes it:

1. refuses at once, exit status 2, on a machine without an NVIDIA GPU;
2. measures the in-process ceiling with CUDA (classifier at batch 1 and 32, dehazer at batch 1);
3. starts ``bentoml serve`` with ``ROADSIGHT_PROVIDER=cuda`` (the service refuses to start when a
   model would fall back to the CPU) and fails unless ``/info`` reports CUDA for both models;
4. compares the served answers with the CPU provider in process, on real images: classifier
   probabilities within ``--max-probability-difference`` and the same labels, dehazed pixels within
   ``--min-psnr-db``;
5. measures P1 and P2 at 32 and 128 connections (wrk; batching off: ROADSIGHT_MAX_BATCH_SIZE=1) and
   /dehaze megapixels per second at 4 clients;

and writes everything to benchmarks/results/gpu_check-<time>.json. Exit status 1 when CUDA is not
used or the answers differ; the performance figures are reported, not judged.

``--dry-run-on-cpu`` goes through the same steps on the CPU provider with 2 s windows and small
images, so the script itself is tested on machines without a GPU (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from serving import processing, runtime
from serving.images import open_rgb

from . import ceiling
from .common import command_line, data_root, machine, save_result, utc_now, vehicle_images
from .serving_load import DEHAZE_SIZE, classify_uploads, dehaze_uploads, format_row
from .server import bentoml_serve
from .wrk import ensure_wrk, measure

EXPECTED_PROVIDER = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def classify_parity(url: str, cpu: runtime.LoadedModel, images: int) -> dict:
    """Served probabilities (GPU) against the CPU provider in process, on ``images`` real photos."""
    spec, labels = cpu.contract["input"], list(cpu.contract["labels"])
    worst, label_mismatches = 0.0, []
    for path in vehicle_images(images):
        response = httpx.post(url + "/classify", files={"image": (path.name, path.read_bytes(), "image/jpeg")},
                              timeout=60)
        response.raise_for_status()
        served = np.array([response.json()["probabilities"][label] for label in labels])
        (expected,) = cpu.session.run([cpu.output_name],
                                      {cpu.input_name: processing.classifier_input(open_rgb(path), spec)[None]})
        worst = max(worst, float(np.abs(served - expected[0]).max()))
        if labels[int(served.argmax())] != labels[int(expected[0].argmax())]:
            label_mismatches.append(path.name)
    return {"images": images, "max_abs_probability_difference": worst, "label_mismatches": label_mismatches}


def dehaze_parity(url: str, cpu: runtime.LoadedModel, images: int) -> dict:
    """Served dehazed pixels (GPU) against the CPU provider in process: the lowest PSNR over ``images``."""
    multiple = int(cpu.contract.get("pad_multiple", 1))
    psnrs = []
    for path in sorted((data_root("dehaze") / "hazy").glob("*.jpg"))[:images]:
        response = httpx.post(url + "/dehaze", files={"image": (path.name, path.read_bytes(), "image/jpeg")},
                              timeout=120)
        response.raise_for_status()
        served = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), np.float64)
        picture = open_rgb(path)
        (clear,) = cpu.session.run([cpu.output_name], {cpu.input_name: processing.dehazer_input(picture, multiple)})
        expected = processing.dehazer_output(clear[0], picture.height, picture.width).transpose(1, 2, 0)
        mse = float(np.mean((served - expected) ** 2))
        psnrs.append(float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse))
    return {"images": images, "min_psnr_db": min(psnrs)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=float, default=15, help="measured seconds per load level (default 15)")
    parser.add_argument("--warmup", type=float, default=5, help="unmeasured seconds before each (default 5)")
    parser.add_argument("--connections", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--max-probability-difference", type=float, default=2e-3)
    parser.add_argument("--min-psnr-db", type=float, default=40.0)
    parser.add_argument("--out", type=Path, help="where the JSON goes (default benchmarks/results/gpu_check-<time>.json)")
    parser.add_argument("--dry-run-on-cpu", action="store_true",
                        help="the same steps on the CPU provider, 2 s windows, small images: tests the script without a GPU")
    args = parser.parse_args()
    if args.dry_run_on_cpu:
        args.window, args.warmup, provider = 2, 0, "cpu"
    elif not runtime.gpu_present():
        print("gpu_check: no NVIDIA GPU on this machine (no /proc/driver/nvidia, no /dev/nvidia*): this check "
              "measures the service on CUDA and needs one; nothing was run. (--dry-run-on-cpu tests the "
              "script itself on the CPU.)", file=sys.stderr)
        return 2
    else:
        provider = "cuda"
    started = time.monotonic()
    ensure_wrk()
    settings = {"ROADSIGHT_PROVIDER": provider}
    result = {"date": utc_now(), "command": command_line("benchmarks.gpu_check"), "machine": machine(),
              "provider": provider, "dry_run_on_cpu": args.dry_run_on_cpu, "checks": {}}
    print(f"in-process ceiling on {provider} ...", flush=True)
    result["ceiling"] = ceiling.measure(quick=args.dry_run_on_cpu, preference=provider)
    print(ceiling.format_table(result["ceiling"]), flush=True)
    cpu_classifier = ceiling.load_session("classify", 1, "cpu")
    cpu_dehazer = ceiling.load_session("dehaze", 1, "cpu")
    ceiling32 = result["ceiling"]["classifier_batch32_images_per_s"]
    result["served"], result["batching_off"] = [], []
    with bentoml_serve(env=settings) as server:
        info = httpx.get(server.url + "/info", timeout=30).json()
        providers = {name: model["provider"] for name, model in info["models"].items()}
        result["served_providers"] = providers
        result["checks"]["both_models_on_" + provider] = set(providers.values()) == {EXPECTED_PROVIDER[provider]}
        classify = classify_parity(server.url, cpu_classifier, 8 if args.dry_run_on_cpu else 64)
        dehaze = dehaze_parity(server.url, cpu_dehazer, 2 if args.dry_run_on_cpu else 6)
        result["parity"] = {"classifier": classify, "dehazer": dehaze}
        result["checks"]["classifier_matches_cpu"] = (classify["max_abs_probability_difference"]
                                                      <= args.max_probability_difference
                                                      and not classify["label_mismatches"])
        result["checks"]["dehazer_matches_cpu"] = dehaze["min_psnr_db"] >= args.min_psnr_db
        print(f"providers {providers}; parity {result['parity']}", flush=True)
        for connections in args.connections:
            row = measure(server.url, "/classify", classify_uploads(), connections, args.warmup, args.window, server.pid)
            result["served"].append({**row, "p1": round(row["throughput_rps"] / ceiling32, 3)})
            print(format_row(row), f"P1 {result['served'][-1]['p1']}", flush=True)
        hazy, megapixels, _ = dehaze_uploads(size=(136, 104) if args.dry_run_on_cpu else DEHAZE_SIZE)
        result["dehaze"] = measure(server.url, "/dehaze", hazy, 4, args.warmup, args.window, server.pid, megapixels,
                                   "dehazer")
        result["dehaze"]["p5"] = round(result["dehaze"]["megapixels_per_s"]
                                       / result["ceiling"]["dehazer_megapixels_per_s"], 3)
        print(format_row(result["dehaze"]), f"P5 {result['dehaze']['p5']}", flush=True)
    with bentoml_serve(env={**settings, "ROADSIGHT_MAX_BATCH_SIZE": "1"}) as server:
        for connections, on in zip(args.connections, result["served"]):
            row = measure(server.url, "/classify", classify_uploads(), connections, args.warmup, args.window, server.pid)
            on_off = on["throughput_rps"] / row["throughput_rps"] if row["throughput_rps"] else None
            result["batching_off"].append({**row, "on_over_off": on_off and round(on_off, 3),
                                           "p2": on_off and round(on_off / result["ceiling"]["classifier_batch32_over_batch1"], 3)})
            print(format_row(row), "[batching off]", f"P2 {result['batching_off'][-1]['p2']}", flush=True)
    result["seconds"] = round(time.monotonic() - started, 1)
    result["passed"] = all(result["checks"].values())
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    path = args.out or save_result("gpu_check", result, quick=args.dry_run_on_cpu)
    print(f"checks: {result['checks']}; {'PASSED' if result['passed'] else 'FAILED'} in {result['seconds']} s; saved {path}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
